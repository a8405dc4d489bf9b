"""Hugging Face datasets as users hold them: parquet (the Hub's files) and arrow (`save_to_disk`) with an `Audio`
column of bytes or paths, Common Voice's and CoVoST 2's column names, text SFT with a messages column. Bad rows are
skipped and named; what is kept streams back from the shards sample for sample."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from data_ops.importers import ImportReport, read_hf_speech_dataset, read_hf_text_dataset
from data_ops.schema import SchemaError
from data_ops.shar_datasource import is_error_row, iter_corpus_rows, row_to_conversation
from data_ops.shards import ShardWriter
from jobs.data import main as data_main
from tests.data_ops.user_datasets import wav_bytes as _wav


def _audio_type():
    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture
def common_voice(tmp_path, pcm_audio):
    """A Common Voice layout in two parquet files: audio bytes, audio by relative path, and three bad rows."""
    root = tmp_path / "cv"
    (root / "data").mkdir(parents=True)
    (root / "clips").mkdir()
    sf.write(root / "clips" / "by-path.wav", pcm_audio(0.8, 9), 16000, subtype="PCM_16")
    rows = [
        {"audio": {"bytes": _wav(pcm_audio(0.5, 1)), "path": "a.mp3"}, "sentence": "Guten Morgen.", "locale": "de", "path": "a.mp3"},
        {"audio": {"bytes": _wav(pcm_audio(0.6, 2)), "path": "b.mp3"}, "sentence": "Hallo Welt.", "locale": "de", "path": "b.mp3"},
        {"audio": {"bytes": b"not audio at all", "path": "c.mp3"}, "sentence": "Kaputt.", "locale": "de", "path": "c.mp3"},
        {"audio": {"bytes": _wav(pcm_audio(0.4, 3)), "path": "d.mp3"}, "sentence": "", "locale": "de", "path": "d.mp3"},
    ]
    more = [
        {"audio": {"bytes": None, "path": "../clips/by-path.wav"}, "sentence": "Wie geht es?", "locale": "de", "path": "e.mp3"},
        {"audio": {"bytes": None, "path": "missing.wav"}, "sentence": "Fehlt.", "locale": "de", "path": "f.mp3"},
    ]
    schema = pa.schema([("audio", _audio_type()), ("sentence", pa.string()), ("locale", pa.string()),
                        ("path", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(more, schema=schema), root / "data" / "train-00001-of-00002.parquet")
    return root


def test_common_voice_parquet_imports_with_bad_rows_named_and_streams_back(common_voice, tmp_path, pcm_audio):
    report = ImportReport()
    out = tmp_path / "corpus"
    with ShardWriter(str(out), shard_size=2, progress=False) as w:
        w.write("asr_ast", read_hf_speech_dataset(common_voice, layout="commonvoice", report=report))
    assert report.kept == 3 and len(report.skipped) == 3
    assert any("train-00000-of-00002.parquet:2" in m and "cannot be decoded" in m for m in report.skipped)
    assert any("train-00000-of-00002.parquet:3" in m and "empty transcript" in m for m in report.skipped)
    assert any("train-00001-of-00002.parquet:1" in m and "missing.wav" in m for m in report.skipped)
    rows = [r for r in iter_corpus_rows(str(out), "asr_ast") if not is_error_row(r)]
    got = {row_to_conversation(r).turns[1].text_only: row_to_conversation(r) for r in rows}
    assert set(got) == {"Guten Morgen.", "Hallo Welt.", "Wie geht es?"}
    assert "German" in got["Hallo Welt."].turns[0].text_only  # the paper's instruction in the row's language
    np.testing.assert_array_equal(got["Hallo Welt."].audio_parts[0].audio, pcm_audio(0.6, 2))
    np.testing.assert_array_equal(got["Wie geht es?"].audio_parts[0].audio, pcm_audio(0.8, 9))


@pytest.mark.integration
def test_the_same_dataset_on_object_storage_imports_alike(common_voice, s3_endpoint):
    """The dataset folder uploaded as it is (parquet files and the clip a row names by relative path) to the S3
    endpoint: the same rows kept, the same rows named, by their s3:// address."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="hf-import")
    for f in common_voice.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "hf-import", f"cv/{f.relative_to(common_voice)}")
    local, remote = ImportReport(), ImportReport()
    want = [(c.id, c.duration) for c in read_hf_speech_dataset(common_voice, layout="commonvoice", report=local)]
    got = [(c.id, c.duration) for c in read_hf_speech_dataset("s3://hf-import/cv", layout="commonvoice",
                                                               report=remote, endpoint_url=s3_endpoint)]
    assert got == want and remote.kept == local.kept == 3
    assert [m.replace("s3://hf-import/cv", str(common_voice)) for m in remote.skipped] == local.skipped
    with pytest.raises(SchemaError, match="s3://hf-import/nothing: no .parquet or .arrow files"):
        list(read_hf_speech_dataset("s3://hf-import/nothing", layout="commonvoice", endpoint_url=s3_endpoint))


def test_covost_arrow_from_save_to_disk_gives_asr_and_ast(tmp_path, pcm_audio):
    table = pa.Table.from_pylist([
        {"audio": {"bytes": _wav(pcm_audio(0.5, i)), "path": None}, "sentence": f"Bonjour {i}.",
         "translation": f"Hello {i}.", "id": f"utt{i}"} for i in range(3)],
        schema=pa.schema([("audio", _audio_type()), ("sentence", pa.string()), ("translation", pa.string()),
                          ("id", pa.string())]))
    root = tmp_path / "covost"
    root.mkdir()
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    cuts = list(read_hf_speech_dataset(root, layout="covost2", lang="fr", target_lang="en"))
    assert [c.supervisions[0].custom.get("task") if c.supervisions else c.custom["task"] for c in cuts] == \
        ["asr", "ast"] * 3
    assert cuts[1].custom["langs"] == ["fr", "en"] and cuts[1].id == "data-00000-of-00001-0-utt0-ast-fr-en"


def test_wrong_columns_and_layouts_are_named(common_voice):
    with pytest.raises(SchemaError, match=r"no column\(s\) \['text'\].*sentence"):
        list(read_hf_speech_dataset(common_voice, lang="de"))
    with pytest.raises(SchemaError, match="unknown layout 'voxpopuli'"):
        list(read_hf_speech_dataset(common_voice, layout="voxpopuli"))


def test_text_sft_dataset_and_the_cli(tmp_path, capsys):
    messages = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                [{"role": "user", "content": "No answer here"}]]
    root = tmp_path / "sft"
    root.mkdir()
    pq.write_table(pa.table({"messages": pa.array(messages)}), root / "train.parquet")
    report = ImportReport()
    cuts = list(read_hf_text_dataset(root, report=report))
    assert len(cuts) == 1 and report.skipped and "train.parquet:1" in report.skipped[0]
    out = tmp_path / "text-corpus"
    assert data_main(["import-text", "--out", str(out), "--hf-dataset", str(root)]) in (0, None)
    assert "kept 1 cuts, skipped 1" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["types"]["text"]["num_cuts"] == 1
