"""NeMo multimodal_conversation manifests: import, export, round trip, and bad lines named by file:line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from data_ops.nemo_manifest import read_nemo_manifest, write_nemo_manifest
from data_ops.schema import SchemaError, cut_to_conversation


def _manifest(tmp_path, lines):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return p


def test_import_merges_same_speaker_entries_and_resamples(tmp_path, audio):
    (tmp_path / "a").mkdir()
    wave = audio(1.0, 3)
    sf.write(tmp_path / "a" / "x.wav", wave, 16000, subtype="FLOAT")
    t = np.arange(8000) / 8000
    sf.write(tmp_path / "a" / "y8k.wav", (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 8000)
    p = _manifest(tmp_path, [
        {"id": "ex1", "conversations": [
            {"from": "User", "type": "text", "value": "Compare"},
            {"from": "User", "type": "audio", "value": "a/x.wav", "duration": 1.0},
            {"from": "User", "type": "audio", "value": "a/y8k.wav", "duration": 1.0},
            {"from": "Assistant", "type": "text", "value": "different"}]},
        {"id": "skip", "custom": {"_skipme": True}, "conversations": []},
    ])
    cuts = list(read_nemo_manifest(p, data_type="sqa", task="sqa", langs=["en"]))
    assert [c.id for c in cuts] == ["ex1"]
    conv = cut_to_conversation(cuts[0])
    assert [t.role for t in conv.turns] == ["user", "assistant"]
    user = conv.turns[0].parts
    assert user[0].text == "Compare"
    np.testing.assert_array_equal(user[1].audio, wave)
    assert len(user[2].audio) == 16000  # 1 s at 8 kHz came back as 1 s at 16 kHz


def test_export_then_import_round_trips(tmp_path, audio):
    (tmp_path / "a").mkdir()
    wave = audio(0.6, 5)
    sf.write(tmp_path / "a" / "x.wav", wave, 16000, subtype="FLOAT")
    p = _manifest(tmp_path, [{"id": "e", "conversations": [
        {"from": "User", "type": "audio", "value": "a/x.wav"}, {"from": "User", "type": "text", "value": "what?"},
        {"from": "Assistant", "type": "text", "value": "noise"}]}])
    cuts = list(read_nemo_manifest(p, data_type="sqa", task="sqa", langs=["en"]))
    out = tmp_path / "out"
    out.mkdir()
    assert write_nemo_manifest(cuts, out / "m.jsonl", out / "audio") == 1
    line = json.loads((out / "m.jsonl").read_text())
    assert [e["type"] for e in line["conversations"]] == ["audio", "text", "text"]
    assert line["conversations"][0]["value"] == "audio/e-0.wav"
    again = cut_to_conversation(next(read_nemo_manifest(out / "m.jsonl", data_type="sqa", task="sqa", langs=["en"])))
    np.testing.assert_array_equal(again.audio_parts[0].audio, wave)
    assert again.turns[0].parts[1].text == "what?" and again.turns[1].text_only == "noise"


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", r"m.jsonl:1: not JSON"),
        ({"id": "x"}, r"m.jsonl:1: needs a non-empty 'conversations' list"),
        ({"conversations": [{"from": "Robot", "value": "hi"}]}, r"m.jsonl:1: entry 0 'from' must be"),
        ({"conversations": [{"from": "User", "type": "audio", "value": "missing.wav"}]}, r"missing.wav does not exist"),
        ({"conversations": [{"from": "User", "type": "video", "value": "v"}]}, r"type must be 'text' or 'audio'"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path, line, message):
    p = _manifest(tmp_path, [line])
    with pytest.raises(SchemaError, match=message):
        list(read_nemo_manifest(p, data_type="sqa", task="sqa", langs=["en"]))


def test_undecodable_audio_is_named(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    p = _manifest(tmp_path, [{"conversations": [{"from": "User", "type": "audio", "value": "bad.wav"}]}])
    with pytest.raises(SchemaError, match=r"bad.wav cannot be decoded"):
        list(read_nemo_manifest(p, data_type="sqa", task="sqa", langs=["en"]))
