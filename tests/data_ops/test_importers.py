"""ASR/AST importers (table, Lhotse manifests) with the paper's fixed instructions; OpenAI messages JSONL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet

from data_ops.importers import (ImportReport, read_audio_table, read_lhotse_manifests, read_messages_jsonl,
                                write_messages_jsonl)
from data_ops.schema import SchemaError, cut_to_conversation
from models.conversation import AudioPart, TextPart


def _wav(path, audio, sr=16000):
    sf.write(path, audio, sr, subtype="FLOAT")
    return path


def test_table_import_asr_and_ast_with_paper_instructions(tmp_path, audio):
    a, b = audio(0.5, 1), audio(0.7, 2)
    _wav(tmp_path / "a.wav", a)
    _wav(tmp_path / "b.wav", b)
    (tmp_path / "t.tsv").write_text(
        "audio_path\ttext\ttranslation\tlang\ttarget_lang\n"
        "a.wav\tGuten Morgen.\tGood morning.\tde\ten\n"
        "b.wav\tHello there.\t\ten\t\n")
    cuts = list(read_audio_table(tmp_path / "t.tsv"))
    assert [c.custom["task"] for c in cuts] == ["asr", "ast", "asr"]
    asr_de, ast_de, asr_en = (cut_to_conversation(c) for c in cuts)
    assert asr_de.turns[0].parts[1].text == "Transcribe the content to German, with punctuations and capitalizations."
    assert ast_de.turns[0].parts[1].text == \
        "Translate the German content to English, with punctuations and capitalizations."
    assert asr_en.turns[0].parts[1].text == "Transcribe the content to English, with punctuations and capitalizations."
    assert [c.turns[1].text_only for c in (asr_de, ast_de, asr_en)] == ["Guten Morgen.", "Good morning.", "Hello there."]
    assert cuts[1].custom["langs"] == ["de", "en"] and cuts[2].custom["langs"] == ["en"]
    np.testing.assert_array_equal(asr_de.audio_parts[0].audio, a)
    np.testing.assert_array_equal(ast_de.audio_parts[0].audio, a)
    assert isinstance(asr_en.turns[0].parts[0], AudioPart) and isinstance(asr_en.turns[0].parts[1], TextPart)


def test_table_resamples_and_reports_bad_rows(tmp_path, audio):
    _wav(tmp_path / "hi.wav", audio(1.0, 3)[:8000], sr=8000)  # 1 s at 8 kHz
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "t.csv").write_text(
        "audio_path,text\nhi.wav,Hello.\nmissing.wav,Gone.\nempty.wav,Nothing.\nhi.wav,\n")
    report = ImportReport()
    cuts = list(read_audio_table(tmp_path / "t.csv", lang="en", report=report))
    assert len(cuts) == 1 and report.kept == 1
    assert cut_to_conversation(cuts[0]).audio_parts[0].num_samples == 16000  # resampled to 16 kHz
    assert len(report.skipped) == 3
    assert "t.csv:3: audio file" in report.skipped[0] and "does not exist" in report.skipped[0]
    assert "t.csv:4: audio file" in report.skipped[1] and "cannot be decoded" in report.skipped[1]
    assert "t.csv:5:" in report.skipped[2] and "empty transcript" in report.skipped[2]
    with pytest.raises(SchemaError, match="t.csv:3: audio file .* does not exist"):
        list(read_audio_table(tmp_path / "t.csv", lang="en"))  # without a report the first bad row raises
    (tmp_path / "bad.csv").write_text("path,words\nx.wav,hi\n")
    with pytest.raises(SchemaError, match="header needs columns audio_path and text"):
        list(read_audio_table(tmp_path / "bad.csv", lang="en"))


def test_lhotse_recipe_manifests(tmp_path, audio):
    long = audio(3.0, 4)
    _wav(tmp_path / "r1.wav", long)
    recs = RecordingSet.from_recordings([Recording.from_file(tmp_path / "r1.wav", recording_id="r1")])
    sups = SupervisionSet.from_segments([
        SupervisionSegment("s1", "r1", start=0.0, duration=1.0, text="Bonjour.", language="French",
                           custom={"translation": "Hello.", "target_lang": "en"}),
        SupervisionSegment("s2", "r1", start=1.5, duration=1.0, text="Merci.", language="fr"),
    ])
    recs.to_file(tmp_path / "recs.jsonl.gz")
    sups.to_file(tmp_path / "sups.jsonl.gz")
    cuts = list(read_lhotse_manifests(recordings=tmp_path / "recs.jsonl.gz", supervisions=tmp_path / "sups.jsonl.gz"))
    assert sorted((c.custom["task"], tuple(c.custom["langs"])) for c in cuts) == \
        [("asr", ("fr",)), ("asr", ("fr",)), ("ast", ("fr", "en"))]
    by_text = {cut_to_conversation(c).turns[1].text_only: cut_to_conversation(c) for c in cuts}
    np.testing.assert_allclose(by_text["Merci."].audio_parts[0].audio, long[24000:40000], atol=1e-6)
    assert by_text["Hello."].turns[0].parts[1].text.startswith("Translate the French content to English")


def test_messages_jsonl_round_trip_and_errors(tmp_path):
    good = {"id": "c1", "messages": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
        {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}
    lines = [json.dumps(good), "not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                                      {"role": "assistant", "content": "x"}]})]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    report = ImportReport()
    cuts = list(read_messages_jsonl(tmp_path / "sft.jsonl", report=report))
    assert [c.id for c in cuts] == ["c1"] and cuts[0].custom["data_type"] == "text"
    conv = cut_to_conversation(cuts[0])
    assert [(t.role, t.text_only) for t in conv.turns] == [
        ("system", "Be kind."), ("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"), ("assistant", "6")]
    assert [m.split(": ", 1)[1].split(" ")[0] for m in report.skipped] == ["not", "no", "message", "message"]
    assert "sft.jsonl:2" in report.skipped[0] and "no assistant message" in report.skipped[1]
    assert "role must be system, user or assistant, got 'tool'" in report.skipped[2]
    assert "non-text content part" in report.skipped[3]

    write_messages_jsonl([("c1", conv)], tmp_path / "back.jsonl")
    (again,) = read_messages_jsonl(tmp_path / "back.jsonl")
    assert [(t.role, t.text_only) for t in cut_to_conversation(again).turns] == [(t.role, t.text_only) for t in conv.turns]
