"""The conversation schema on Lhotse cuts survives a Lhotse Shar round trip with its audio in place."""

from __future__ import annotations

import numpy as np
import pytest
from lhotse import CutSet

from data_ops.schema import SchemaError, conversation_to_cut, cut_to_conversation
from models.conversation import AudioPart, Conversation, TextPart, Turn


def _mixed(audio):
    a1, a2 = audio(0.8, 1), audio(1.3, 2)
    return Conversation([
        Turn("user", [TextPart("Compare"), AudioPart(a1), TextPart("and"), AudioPart(a2), TextPart("please.")]),
        Turn.text("assistant", "They differ."),
    ]), [a1, a2]


def test_cut_round_trip_in_memory_is_exact(audio):
    conv, segs = _mixed(audio)
    cut = conversation_to_cut(conv, cut_id="c1", data_type="mixed_modal", task="mixed_modal", langs=["en"])
    assert cut.duration == pytest.approx(sum(len(s) for s in segs) / 16000)
    back = cut_to_conversation(cut)
    assert [p.text for p in back.turns[0].parts if isinstance(p, TextPart)] == ["Compare", "and", "please."]
    for got, want in zip(back.audio_parts, segs):
        np.testing.assert_array_equal(got.audio, want)
    assert back.turns[1].text_only == "They differ."


def test_shar_round_trip_keeps_conversations_and_audio(audio, tmp_path):
    conv, segs = _mixed(audio)
    audio_cut = conversation_to_cut(conv, cut_id="a", data_type="mixed_modal", task="mixed_modal", langs=["en"])
    (tmp_path / "mixed").mkdir()
    (tmp_path / "text").mkdir()
    CutSet.from_cuts([audio_cut]).to_shar(tmp_path / "mixed", fields={"recording": "flac"}, shard_size=10)
    text = Conversation([Turn.text("user", "2+2?"), Turn.text("assistant", "4"), Turn.text("user", "and 3+3?"),
                         Turn.text("assistant", "6")])
    text_cut = conversation_to_cut(text, cut_id="t", data_type="text", task="text", langs=["en"])
    CutSet.from_cuts([text_cut]).to_shar(tmp_path / "text", fields={}, shard_size=10)

    (back_a,) = list(CutSet.from_shar(in_dir=tmp_path / "mixed"))
    got = cut_to_conversation(back_a)
    assert back_a.custom["data_type"] == "mixed_modal" and back_a.custom["langs"] == ["en"]
    for g, w in zip(got.audio_parts, segs):
        assert len(g.audio) == len(w)
        # FLAC stores 16-bit PCM: equal up to one quantization step
        np.testing.assert_allclose(g.audio, w, atol=1 / 2**15 + 1e-7)
    (back_t,) = list(CutSet.from_shar(in_dir=tmp_path / "text"))
    assert [t.text_only for t in cut_to_conversation(back_t).turns] == ["2+2?", "4", "and 3+3?", "6"]


@pytest.mark.parametrize(
    "custom,message",
    [
        ({}, "no 'conversation'"),
        ({"conversation": {"turns": [{"role": "robot", "parts": []}]}}, "role must be one of"),
        ({"conversation": {"turns": [{"role": "user", "parts": [{"type": "audio", "source": "0.5:1.0"}]}]}},
         "is not 'samples:START:END'"),
        ({"conversation": {"turns": [{"role": "user", "parts": [{"type": "audio", "source": "samples:0:999999"}]}]}},
         "outside the cut"),
    ],
)
def test_malformed_cut_names_the_cut_and_problem(audio, custom, message):
    conv, _ = _mixed(audio)
    cut = conversation_to_cut(conv, cut_id="bad-cut", data_type="mixed_modal", task="mixed_modal", langs=["en"])
    cut.custom = custom
    with pytest.raises(SchemaError, match=f"cut bad-cut: .*{message}"):
        cut_to_conversation(cut)


def test_unknown_data_type_is_rejected(audio):
    conv, _ = _mixed(audio)
    with pytest.raises(SchemaError, match="data_type must be one of"):
        conversation_to_cut(conv, cut_id="x", data_type="speech", task="asr", langs=["en"])
