"""Helpers of the tests that `ray job submit` to a local stack (the way users run the jobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def submit(env: dict, entrypoint: list[str], name: str, *, timeout: float, wait: bool = True):
    """`ray job submit --working-dir <repo>` of `entrypoint` with the stack's client environment passed to the job
    (`ray job submit` does not carry the caller's). Retries while the head's job agent is not registered yet."""
    job_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"],
           *([] if wait else ["--no-wait"]), "--submission-id", f"{name}-{int(time.time())}", "--working-dir",
           str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}), "--", *entrypoint]
    for _ in range(6):
        # a clean environment: this test process may hold a local Ray instance of its own (other tests)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **env})
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    return proc
