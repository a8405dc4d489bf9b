"""Property-based fuzzing of the offline inputs: the CSV/TSV audio table, JSONL messages and NeMo manifest
importers, and recipe YAML. Whatever the file holds, an import keeps rows or skips and counts them with a message
naming the file and row (`ImportReport`), or refuses the file with a `SchemaError` naming it; a recipe parses or is
refused with a `RecipeError` naming the file. Never another exception (a traceback), never a row lost silently.

Bounded and seeded for the suite; `VTB_FUZZ_EXAMPLES=N` runs N examples per property by hand.
"""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_ops.importers import ImportReport, read_audio_table, read_messages_jsonl
from data_ops.schema import SchemaError

FUZZ = settings(max_examples=int(os.environ.get("VTB_FUZZ_EXAMPLES", 100)), derandomize=True, deadline=None,
                suppress_health_check=list(HealthCheck))
odd = st.characters(categories=["Cs"]) | st.sampled_from(["\x00", "\u202e", "\ufeff", ",", "\t", "\"", "\n", "\r"])
any_text = st.lists(st.characters(exclude_categories=()) | odd, max_size=16).map("".join)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | any_text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
                           max_leaves=8)


def _write(path, data: bytes | str):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


def _import(reader, path) -> ImportReport:
    report = ImportReport()
    try:
        cuts = list(reader(path, report=report))
    except SchemaError as e:  # the whole file refused: it must say which
        assert str(path) in str(e), e
        return report
    assert report.kept == len(cuts)
    for message in report.skipped:
        assert str(path) in message, message  # a skipped row is named
    return report


@FUZZ
@given(header=st.sampled_from(["audio_path,text", "text,audio_path", "audio_path,text,lang", "audio_path", ""])
       | any_text,
       rows=st.lists(st.lists(st.sampled_from(["ok.wav", "missing.wav", "en", ""]) | any_text, max_size=4), max_size=5),
       raw=st.binary(max_size=40), sep=st.sampled_from([",", "\t"]))
def test_an_audio_table_imports_or_names_its_rows(tmp_path_factory, header, rows, raw, sep):
    folder = tmp_path_factory.mktemp("table")
    sf.write(folder / "ok.wav", np.zeros(1600, dtype=np.float32), 16000)
    text = "\n".join([header.replace(",", sep), *(sep.join(r) for r in rows)]) + "\n"
    suffix = ".tsv" if sep == "\t" else ".csv"
    _import(lambda p, report: read_audio_table(p, lang="en", report=report), _write(folder / f"t{suffix}", text))
    _import(lambda p, report: read_audio_table(p, lang="en", report=report),
            _write(folder / f"raw{suffix}", b"audio_path,text\n" + raw))


def _messages_line(value) -> str:
    return json.dumps(value, ensure_ascii=True)  # escapes lone surrogates as \\udxxx, as JSON allows


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]) | json_values,
                                           "content": any_text | json_values}), max_size=4)


@FUZZ
@given(lines=st.lists(st.fixed_dictionaries({"messages": messages | json_values}).map(_messages_line)
                      | json_values.map(_messages_line) | any_text, max_size=5),
       raw=st.binary(max_size=40))
def test_a_messages_jsonl_imports_or_names_its_rows(tmp_path_factory, lines, raw):
    folder = tmp_path_factory.mktemp("jsonl")
    path = _write(folder / "m.jsonl", "\n".join(lines) + "\n")
    report = _import(read_messages_jsonl, path)
    def counted(raw: bytes) -> bool:  # the reader's lines: split at \n only; blank ones are not rows
        try:
            return bool(raw.decode("utf-8").strip())
        except UnicodeDecodeError:
            return True

    rows = sum(counted(raw) for raw in path.read_bytes().split(b"\n"))
    assert report.kept + len(report.skipped) == rows  # every line kept or counted
    _import(read_messages_jsonl, _write(folder / "raw.jsonl", raw))
    _import(read_messages_jsonl, _write(folder / "deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"))


@FUZZ
@given(doc=json_values | st.fixed_dictionaries({}, optional={
    "run": st.dictionaries(st.sampled_from(["name", "experiment", "seed", "storage_path"]), json_values, max_size=4)
    | json_values,
    "data": st.dictionaries(st.sampled_from(["sources", "bucket_batches"]), json_values, max_size=2) | json_values,
    "train": st.dictionaries(st.sampled_from(["max_steps", "lr", "precision", "strategy", "num_workers"]), json_values,
                             max_size=5) | json_values,
    "model": json_values}), raw=any_text)
def test_a_recipe_parses_or_is_refused_naming_the_file(tmp_path_factory, doc, raw):
    from jobs.recipe import RecipeError, load_recipe

    folder = tmp_path_factory.mktemp("recipe")
    for path, text in ((folder / "r.yaml", yaml.safe_dump(doc, allow_unicode=False)), (folder / "raw.yaml", raw)):
        _write(path, text)
        try:
            load_recipe(path)
        except RecipeError as e:
            assert str(path) in str(e), e


def test_what_the_fuzzing_found_is_named_not_a_traceback(tmp_path):
    """Each of these raised UnicodeDecodeError, RecursionError or TypeError before, or kept a row that the shard
    writer could not write."""
    from jobs.recipe import RecipeError, load_recipe

    table = _write(tmp_path / "t.csv", b"audio_path,text\nok.wav,hello\nbad.wav,caf\xe9\n")
    try:
        list(read_audio_table(table, lang="en", report=ImportReport()))
        raise AssertionError("a table that is not UTF-8 was read")
    except SchemaError as e:
        assert f"{table}:3: not UTF-8" in str(e)
    short = _write(tmp_path / "short.csv", "text,audio_path\nhello\n")
    report = _import(lambda p, report: read_audio_table(p, lang="en", report=report), short)
    assert report.kept == 0 and report.skipped == [f"{short}:2: no audio_path in this row"]

    lines = [b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}',
             b"\xff\xfe not utf-8", b"[" * 100_000 + b"]" * 100_000,
             b'{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}']
    jsonl = _write(tmp_path / "m.jsonl", b"\n".join(lines) + b"\n")
    report = _import(read_messages_jsonl, jsonl)
    assert report.kept == 1 and [m.split(": ", 1)[1] for m in report.skipped] == [
        "not UTF-8 text (byte 0 of the line)", "JSON nested too deeply",
        "message 0: a lone surrogate at character 1 (not valid Unicode)"]

    recipe = _write(tmp_path / "r.yaml", b"run: {name: caf\xe9}\n")
    try:
        load_recipe(recipe)
        raise AssertionError("a recipe that is not UTF-8 was read")
    except RecipeError as e:
        assert f"{recipe}: not UTF-8" in str(e)


def _wav_bytes(seconds: float = 0.2) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(16000 * seconds), dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


nemo_entry = st.fixed_dictionaries({
    "from": st.sampled_from(["User", "Assistant", "System", "Robot"]) | json_values,
    "type": st.sampled_from(["text", "audio", "video"]) | json_values,
    "value": st.sampled_from(["ok.wav", "missing.wav", "bad.wav"]) | any_text | json_values})


@FUZZ
@given(lines=st.lists(st.fixed_dictionaries({"conversations": st.lists(nemo_entry | json_values, max_size=3)
                                             | json_values},
                                            optional={"custom": json_values, "id": json_values}).map(_messages_line)
                      | any_text, max_size=4))
def test_a_nemo_manifest_imports_or_names_its_line(tmp_path_factory, lines):
    from data_ops.nemo_manifest import read_nemo_manifest

    folder = tmp_path_factory.mktemp("nemo")
    _write(folder / "ok.wav", _wav_bytes())
    _write(folder / "bad.wav", b"RIFF not a wave")
    path = _write(folder / "m.jsonl", "\n".join(lines) + "\n")
    try:
        list(read_nemo_manifest(path, data_type="mixed_modal", task="t", langs=["en"]))
    except SchemaError as e:  # the first bad line stops the import, named
        assert str(path) in str(e), e


@FUZZ
@given(entries=st.lists(st.fixed_dictionaries(
    {"audio_filepath": st.sampled_from(["a.wav", "b.wav", "c.wav"]) | json_values},
    optional={"text": any_text | json_values, "lang": st.sampled_from(["en", "de"]) | json_values,
              "target_lang": st.sampled_from(["en", "de"]) | json_values, "answer": any_text | json_values}),
    max_size=4),
       members=st.lists(st.tuples(st.sampled_from(["a.wav", "b.wav", "dir/c.wav"]), st.booleans()), max_size=3),
       cut_at=st.none() | st.integers(0, 2000))
def test_a_nemo_tarred_set_imports_or_names_its_entries(tmp_path_factory, entries, members, cut_at):
    import io
    import tarfile

    from data_ops.importers import read_nemo_tarred

    folder = tmp_path_factory.mktemp("tarred")
    manifest = _write(folder / "manifest.json", "\n".join(_messages_line(e) for e in entries) + "\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, is_audio in members:
            data = _wav_bytes() if is_audio else b"junk bytes"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = buf.getvalue() if cut_at is None else buf.getvalue()[:cut_at]  # cut short: a broken upload
    _write(folder / "audio_0.tar", tar_bytes)
    report = ImportReport()
    cuts = list(read_nemo_tarred(manifest, "audio_0.tar", lang="en", report=report))
    assert report.kept == len(cuts)
    for message in report.skipped:  # each skipped entry names the manifest line or the tar
        assert str(manifest) in message or str(folder / "audio_0.tar") in message, message


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({
    "audio": st.fixed_dictionaries({"bytes": st.sampled_from([b"", b"junk"]) | st.just(None) | st.builds(_wav_bytes),
                                    "path": st.sampled_from(["", "x.wav", "/nope.wav"]) | st.none()}),
    "text": any_text | st.none(), "lang": st.sampled_from(["en", "de", ""]) | st.none()}), min_size=1, max_size=4))
def test_a_hugging_face_parquet_imports_or_names_its_rows(tmp_path_factory, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_ops.importers import read_hf_speech_dataset

    folder = tmp_path_factory.mktemp("hf")
    audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    text = [None if r["text"] is None else r["text"].encode("utf-8", "replace").decode("utf-8") for r in rows]
    table = pa.table({"audio": pa.array([r["audio"] for r in rows], type=audio), "text": pa.array(text),
                      "lang": pa.array([r["lang"] for r in rows])})
    pq.write_table(table, folder / "train.parquet")
    report = ImportReport()
    cuts = list(read_hf_speech_dataset(folder, lang_column="lang", report=report))
    assert report.kept == len(cuts) and len(cuts) + len(report.skipped) >= 1
    for message in report.skipped:
        assert "train.parquet:" in message, message


def test_a_tarred_entry_whose_translation_is_not_text_is_named(tmp_path):
    """Found by the tarred fuzzing: `"answer": true` on a translation entry raised AttributeError."""
    import io
    import tarfile

    from data_ops.importers import read_nemo_tarred

    _write(tmp_path / "manifest.json", _messages_line({"audio_filepath": "a.wav", "text": "hi", "lang": "en",
                                                       "target_lang": "de", "answer": True}) + "\n")
    with tarfile.open(tmp_path / "audio_0.tar", "w") as tar:
        data = _wav_bytes()
        info = tarfile.TarInfo("a.wav")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    report = ImportReport()
    assert list(read_nemo_tarred(tmp_path / "manifest.json", "audio_0.tar", report=report)) == []
    assert report.skipped == [f"{tmp_path / 'manifest.json'}:1: manifest-1-a: the transcript and the translation "
                              "must be text"]
