"""Dependency direction (DESIGN.md): nothing imports jobs/; models/ knows nothing of Ray, MLflow or storage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("folder", ["models", "data_ops", "services", "infra"])
def test_no_package_imports_jobs(folder):
    offenders = [p for p, names in _imports(folder).items() if "jobs" in names]
    assert offenders == []


def test_models_know_nothing_of_ray_mlflow_or_storage():
    banned = {"ray", "mlflow", "boto3", "data_ops", "services", "infra"}
    offenders = {p: names & banned for p, names in _imports("models").items() if names & banned}
    assert offenders == {}
