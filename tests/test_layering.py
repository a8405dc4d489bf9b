"""Dependency direction and global state (docs/design.md): nothing imports jobs/; models/ knows nothing of Ray,
MLflow or storage; no process-wide MLflow state anywhere; `ray.init` only in entrypoints."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ["models", "data_ops", "services", "infra", "jobs", "bench"]


def _trees(folder: str) -> dict[str, ast.AST]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text()) for p in sorted((ROOT / folder).rglob("*.py"))}


def _imports(folder: str) -> dict[str, set[str]]:
    found = {}
    for path, tree in _trees(folder).items():
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path] = names
    return found


def _calls(folder: str, module: str, attrs: set[str]) -> list[str]:
    """`module.attr(...)` calls (e.g. mlflow.set_tracking_uri) in a folder, as 'path:line module.attr'."""
    hits = []
    for path, tree in _trees(folder).items():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in attrs
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
                hits.append(f"{path}:{node.lineno} {module}.{node.func.attr}")
    return hits


@pytest.mark.parametrize("folder", ["models", "data_ops", "services", "infra"])
def test_no_package_imports_jobs(folder):
    offenders = [p for p, names in _imports(folder).items() if "jobs" in names]
    assert offenders == []


def test_models_know_nothing_of_ray_mlflow_or_storage():
    banned = {"ray", "mlflow", "boto3", "data_ops", "services", "infra"}
    offenders = {p: names & banned for p, names in _imports("models").items() if names & banned}
    assert offenders == {}


def test_product_code_never_sets_process_wide_mlflow_state():
    """Explicit clients only: a global tracking URI or active run lets one job write into another's run."""
    fluent = {"set_tracking_uri", "set_registry_uri", "set_experiment", "start_run", "log_metrics", "log_params",
              "log_artifact", "log_artifacts", "log_dict", "log_table", "set_tag"}
    assert [hit for folder in PRODUCT for hit in _calls(folder, "mlflow", fluent)] == []


def test_ray_init_only_in_entrypoints():
    """Library code takes a connected Ray; the entrypoints (jobs/*.py, bench/, infra/) decide which cluster."""
    library = ["models", "data_ops", "services", "jobs/training"]
    assert [hit for folder in library for hit in _calls(folder, "ray", {"init"})] == []


def test_entrypoints_do_not_import_each_other_for_training():
    """The ablation, the benchmark and the tests use the components in jobs/training, not the train entrypoint."""
    users = {p for folder in ("jobs", "bench") for p, names in _trees_imports_from(folder, "jobs.train").items()
             if names}
    assert users == set()


def _trees_imports_from(folder: str, module: str) -> dict[str, bool]:
    out = {}
    for path, tree in _trees(folder).items():
        out[path] = any(isinstance(n, ast.ImportFrom) and n.module == module for n in ast.walk(tree))
    return out


def test_jobs_functions_and_repo_files_stay_readable():
    """Entrypoints stay thin (no function in jobs/ over 80 lines) and no tracked file runs past 600 lines."""
    import subprocess

    long_functions = [f"{path}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
                      for path, tree in _trees("jobs").items() for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 80]
    assert long_functions == []
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    long_files = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".png", ".jpg", ".wav", ".flac") or not path.is_file():
            continue
        lines = path.read_bytes().count(b"\n")
        if lines > 600:
            long_files.append(f"{name} ({lines} lines)")
    assert long_files == []
