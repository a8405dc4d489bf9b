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
