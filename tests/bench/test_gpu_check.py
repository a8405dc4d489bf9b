"""`make gpu-check`'s script on this CPU machine, at tiny size, on the session's stack: every step runs (the CUDA
tests are collected and skipped here), and the table and JSON say what was measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `make test-slow`: about 90 s, which the suite's 15 minutes no longer had room for once the promotion gate,
# lineage and memory tests came in (docs/testing.md)
pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_step_at_tiny_size_on_cpu(stack, tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--root", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **stack.env()})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["size"] == "tiny"
    assert result["cuda_tests"]["returncode"] == 0 and result["cuda_tests"].get("skipped", 0) >= 1
    assert [(t["strategy"], t["workers"]) for t in result["training"]] == [("ddp", 1)]  # FSDP needs two GPUs here
    for t in result["training"]:
        assert t["tokens_per_s"] > 0 and t["audio_s_per_s"] > 0
        assert t["mfu"] is None and t["peak_gpu_gib"] is None  # no peak FLOPs or GPU memory on a CPU
    assert set(result["serving"]) == {"1", "16"}
    for s in result["serving"].values():
        assert 0 < s["ttft_s_median"] <= s["ttft_s_max"] and s["tokens_per_s"] > 0
        assert s["answers_with_content"] == s["clients"]  # every answer streamed text
    # every part ran, and the table says what a speed check leaves out
    assert {name: p["status"] for name, p in result["parts"].items()} == {
        "CUDA tests": "ok", "synthetic corpus": "ok", "random tiny LM": "ok", "training ddp x1": "ok", "serving": "ok"}
    assert "| ddp | 1 |" in proc.stdout and "| 16 client(s) |" in proc.stdout
    assert "| training ddp x1 | ok |" in proc.stdout and "not run, by design: the training job's last checkpoint" \
        in proc.stdout
    assert result["training"][0]["checkpoint"] is None
