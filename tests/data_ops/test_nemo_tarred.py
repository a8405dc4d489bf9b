"""NeMo's dataset forms in: a tarred audio dataset (manifest + `audio_{0..1}.tar`, as NeMo's tarred ASR datasets
are laid out, with a Canary-style translation entry) and a Lhotse Shar directory with supervisions. Entries whose
audio is missing or broken are skipped and named; the rest stream back sample for sample."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from lhotse import CutSet, MonoCut, Recording, SupervisionSegment
from lhotse.shar import SharWriter

from data_ops.importers import ImportReport, expand_nemo_shards, read_lhotse_shar, read_nemo_tarred
from data_ops.shar_datasource import is_error_row, iter_corpus_rows, row_to_conversation
from jobs.data import main as data_main
from tests.data_ops.user_datasets import wav_bytes as _wav


def test_brace_patterns_expand_as_nemo_writes_them():
    assert expand_nemo_shards("audio_{0..2}.tar") == ["audio_0.tar", "audio_1.tar", "audio_2.tar"]
    assert expand_nemo_shards("audio__OP_0..1_CL_.tar") == ["audio_0.tar", "audio_1.tar"]
    assert expand_nemo_shards("one.tar") == ["one.tar"]


def test_a_nemo_tarred_dataset_imports_and_streams_back(tmp_path, pcm_audio, capsys):
    clips = {f"utt{i}.wav": pcm_audio(0.4 + 0.1 * i, 50 + i) for i in range(4)}
    payload = {**{k: _wav(v) for k, v in clips.items()}, "broken.wav": b"RIFF....not really"}
    shards = {0: ["utt0.wav", "utt1.wav", "broken.wav"], 1: ["utt2.wav", "utt3.wav"]}
    for shard, names in shards.items():
        with tarfile.open(tmp_path / f"audio_{shard}.tar", "w") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = len(payload[name])
                tar.addfile(info, io.BytesIO(payload[name]))
    lines = [
        {"audio_filepath": "utt0.wav", "text": "Hello there.", "duration": 0.4, "shard_id": 0, "source_lang": "en"},
        {"audio_filepath": "utt1.wav", "text": "Good morning.", "duration": 0.5, "shard_id": 0},
        {"audio_filepath": "broken.wav", "text": "Broken.", "duration": 0.5, "shard_id": 0},
        {"audio_filepath": "utt2.wav", "text": "See you.", "answer": "Bis bald.", "source_lang": "en",
         "target_lang": "de", "taskname": "s2t_translation", "shard_id": 1},
        {"audio_filepath": "utt3.wav", "text": "Thank you.", "shard_id": 1},
        {"audio_filepath": "lost.wav", "text": "Nowhere.", "shard_id": 1},
    ]
    (tmp_path / "tarred_audio_manifest.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = ImportReport()
    cuts = list(read_nemo_tarred(tmp_path / "tarred_audio_manifest.json", "audio_{0..1}.tar", lang="en",
                                 report=report))
    assert report.kept == 5 and len(report.skipped) == 2  # 4 ASR + 1 AST; broken and lost named
    assert any("tarred_audio_manifest.json:3" in m and "broken.wav" in m for m in report.skipped)
    assert any("tarred_audio_manifest.json:6" in m and "lost.wav is in no tar file" in m for m in report.skipped)
    assert sorted(c.custom["task"] for c in cuts) == ["asr"] * 4 + ["ast"]

    out = tmp_path / "corpus"
    assert data_main(["import-asr", "--out", str(out), "--nemo-tarred", str(tmp_path / "tarred_audio_manifest.json"),
                      "--tars", "audio_{0..1}.tar", "--lang", "en"]) in (0, None)
    assert "kept 5 cuts, skipped 2" in capsys.readouterr().out
    rows = [r for r in iter_corpus_rows(str(out), "asr_ast") if not is_error_row(r)]
    by_answer = {row_to_conversation(r).turns[1].text_only: row_to_conversation(r) for r in rows}
    assert set(by_answer) == {"Hello there.", "Good morning.", "See you.", "Thank you.", "Bis bald."}
    np.testing.assert_array_equal(by_answer["Bis bald."].audio_parts[0].audio, clips["utt2.wav"])
    assert "German" in by_answer["Bis bald."].turns[0].text_only


def test_a_lhotse_shar_directory_imports(tmp_path, pcm_audio):
    cuts = []
    for i in range(3):
        audio = pcm_audio(0.5, 70 + i)
        rec = Recording.from_bytes(_wav(audio), recording_id=f"rec{i}")
        sup = SupervisionSegment(id=f"sup{i}", recording_id=f"rec{i}", start=0, duration=rec.duration,
                                 text=f"Sentence {i}.", language="en")
        cuts.append(MonoCut(id=f"cut{i}", start=0, duration=rec.duration, channel=0, recording=rec,
                            supervisions=[sup]))
    (tmp_path / "shar").mkdir()
    with SharWriter(str(tmp_path / "shar"), fields={"recording": "wav"}, shard_size=2) as w:
        for c in CutSet.from_cuts(cuts):
            w.write(c)
    report = ImportReport()
    got = list(read_lhotse_shar(tmp_path / "shar", report=report))
    assert report.kept == 3 and not report.skipped
    assert sorted(c.custom["conversation"]["turns"][1]["parts"][0]["text"] for c in got) == \
        ["Sentence 0.", "Sentence 1.", "Sentence 2."]
