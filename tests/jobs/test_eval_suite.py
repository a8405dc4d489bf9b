"""Evaluation suites: the shipped ones load; a bad one is refused naming the problem, before any Ray work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.evaluate import load_suite

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs/suites").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_suites_load(path):
    suite = load_suite(str(path))
    assert suite.tasks and len({t.name for t in suite.tasks}) == len(suite.tasks)


@pytest.mark.parametrize("tasks, message", [
    ([{"name": "asr", "kind": "asr", "data_type": "asr_ast"}, {"name": "asr", "kind": "text", "data_type": "text"}],
     "task names must be unique; repeated: ['asr']"),
    ([{"name": "asr", "kind": "asr", "data_type": "speech"}], "tasks.0.data_type"),
    ([{"name": "asr", "kind": "asr", "data_type": "asr_ast", "limt": 3}], "tasks.0.limt"),
])
def test_bad_suites_are_refused_by_name(tmp_path, tasks, message):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "uris": ["x"], "tasks": tasks}))
    with pytest.raises(SystemExit) as e:
        load_suite(str(path))
    assert f"{path} is not a valid suite" in str(e.value) and message in str(e.value)
