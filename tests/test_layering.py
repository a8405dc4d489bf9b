"""The house rules that standard tools check (`make lint`: ruff and import-linter, configured in pyproject.toml),
run here too so that `make test` fails on them; and file length, which neither tool has a rule for: 600 lines for
any file, 300 for an entrypoint (`jobs/*.py`: parse, connect, call components, print; library code lives in the
component packages)."""

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


def test_entrypoints_stay_thin():
    entrypoints = [p for p in sorted((ROOT / "jobs").glob("*.py")) if b'if __name__ == "__main__":' in p.read_bytes()]
    assert len(entrypoints) >= 8  # demo, data, train, pretrain_encoder, evaluate, compare, ablation, convert_nemo
    long_entrypoints = [f"{p.relative_to(ROOT)} ({n} lines)" for p in entrypoints
                        if (n := p.read_bytes().count(b"\n")) > 300]
    assert long_entrypoints == []
