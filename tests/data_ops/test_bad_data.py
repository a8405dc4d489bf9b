"""Bad data in shards is skipped, counted and logged with the shard name; the stream goes on."""

from __future__ import annotations

import gzip
import io
import logging
import tarfile

import pytest

from data_ops.schema import conversation_to_cut
from data_ops.shar_datasource import is_error_row, iter_corpus_rows, plan_reads, shar_dataset
from data_ops.shards import ManifestError, ShardWriter, read_manifest
from models.conversation import AudioPart, Conversation, TextPart, Turn


def _write(root, pcm_audio, n=12, shard_size=4):
    cuts = [conversation_to_cut(Conversation([Turn("user", [AudioPart(pcm_audio(0.25, i)), TextPart("Transcribe.")]),
                                              Turn.text("assistant", f"t{i}")]),
                                cut_id=f"u{i:02d}", data_type="asr_ast", task="asr", langs=["en"]) for i in range(n)]
    with ShardWriter(str(root), shard_size=shard_size, progress=False) as w:
        w.write("asr_ast", cuts)
    return read_manifest(str(root)).types["asr_ast"].shards


def _rewrite_tar(path, change):
    """Rewrite a Shar audio tar, passing each (name, data) through `change` (returns new data)."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _corrupt(root, shards):
    # shard 0: u01's audio is garbage bytes, u02's audio is an empty file
    _rewrite_tar(root / shards[0].recording, lambda name, data: (
        b"not audio at all" * 10 if name == "u01.flac" else b"" if name == "u02.flac" else data))
    # shard 1: its cuts line for u05 is not JSON
    path = root / shards[1].cuts
    lines = gzip.open(path, "rt").read().splitlines()
    lines[1] = '{"id": "u05", "broken'
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    # shard 2 is gone
    (root / shards[2].cuts).unlink()
    (root / shards[2].recording).unlink()


def test_bad_items_become_counted_error_rows(tmp_path, pcm_audio, caplog):
    shards = _write(tmp_path, pcm_audio)
    _corrupt(tmp_path, shards)
    with caplog.at_level(logging.WARNING, logger="vtblender.data"):
        rows = list(iter_corpus_rows(str(tmp_path), "asr_ast"))
    good = sorted(r["id"] for r in rows if not is_error_row(r))
    errors = [r for r in rows if is_error_row(r)]
    assert good == ["u00", "u03", "u04", "u06", "u07"]
    by_where = {(r["shard"], r["index"]): r["error"] for r in errors}
    assert "could not be decoded: Format not recognised" in by_where[(shards[0].cuts, 1)]
    assert "empty (0 bytes)" in by_where[(shards[0].cuts, 2)]
    assert "unreadable cut line" in by_where[(shards[1].cuts, 1)]
    assert "missing shard" in by_where[(shards[2].cuts, 0)] and "4 cuts are skipped" in by_where[(shards[2].cuts, 0)]
    assert len(errors) == 4
    logged = caplog.text
    for s in shards[:3]:
        assert s.cuts in logged  # every problem is logged with its shard's name


def test_bad_items_through_ray_data(tmp_path, pcm_audio, ray_local):
    shards = _write(tmp_path, pcm_audio)
    _corrupt(tmp_path, shards)
    rows = list(shar_dataset(str(tmp_path), "asr_ast", seed=1).iter_rows())
    assert sorted(r["id"] for r in rows if not is_error_row(r)) == ["u00", "u03", "u04", "u06", "u07"]
    assert sum(is_error_row(r) for r in rows) == 4


def test_truncated_audio_tar_skips_rest_of_that_shard_only(tmp_path, pcm_audio):
    shards = _write(tmp_path, pcm_audio, n=8, shard_size=4)
    tar = tmp_path / shards[0].recording
    tar.write_bytes(tar.read_bytes()[: 3000])  # cut mid-way through the first items
    rows = list(iter_corpus_rows(str(tmp_path), "asr_ast"))
    assert sorted(r["id"] for r in rows if not is_error_row(r)) == ["u04", "u05", "u06", "u07"]
    (err,) = [r for r in rows if is_error_row(r)]
    assert err["shard"] == shards[0].cuts and "shard unreadable" in err["error"]


def test_folder_without_manifest_is_one_clear_error(tmp_path, pcm_audio):
    _write(tmp_path / "corpus", pcm_audio, n=2)
    (tmp_path / "corpus" / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"manifest.json not found: .* is not a corpus written by data_ops.shards"):
        plan_reads(str(tmp_path / "corpus"), "asr_ast")
    with pytest.raises(ManifestError, match="no 'sqa' shards; the corpus has \\['asr_ast'\\]"):
        _write(tmp_path / "other", pcm_audio, n=2)
        plan_reads(str(tmp_path / "other"), "sqa")


def test_writer_crash_leaves_no_manifest(tmp_path, pcm_audio):
    def cuts():
        yield conversation_to_cut(Conversation([Turn("user", [AudioPart(pcm_audio(0.2))]), Turn.text("assistant", "x")]),
                                  cut_id="a", data_type="asr_ast", task="asr", langs=["en"])
        raise RuntimeError("source failed mid-way")

    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), shard_size=1, progress=False) as w:
            w.write("asr_ast", cuts())
    assert (tmp_path / "asr_ast").is_dir() and not (tmp_path / "manifest.json").exists()
