"""Helpers for the tests that deploy the chat app on the local stack."""

from __future__ import annotations

import subprocess
import time

import requests


def wait_healthy(base: str, timeout: float = 240, proc: subprocess.Popen | None = None) -> None:
    """Wait until the app at `base` answers /health; AssertionError after `timeout` s or when `proc` (a
    foreground `serve run`) exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"serve run exited with {proc.returncode}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"nothing healthy on {base} after {timeout:.0f} s")
