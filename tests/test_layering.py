"""The house rules that standard tools check (`make lint`: ruff and import-linter, configured in pyproject.toml),
run here too so that `make test` fails on them; and file length, which neither tool has a rule for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tool", [["ruff", "check", "."], ["lint-imports"]])
def test_the_house_rules_hold(tool):
    proc = subprocess.run([str(Path(sys.executable).with_name(tool[0])), *tool[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_no_tracked_file_runs_past_600_lines():
    """Function size, import direction and process-wide state are ruff's and import-linter's (`make lint`,
    pyproject.toml); file length has no rule there."""
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
