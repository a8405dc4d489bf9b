"""For the serving benchmarks: the local stack (Ray) with the chat app deployed by `serve deploy`, serving two tiny
fine-tunes of one base LM (random init, saved locally) as `vtblender` and `b`."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml


@contextlib.contextmanager
def deployed_chat_app(app_args: dict, ray_num_cpus: int = 4):
    """Yields the app's base URL; stops the app and the stack on the way out."""
    from infra.stack import LocalStack, free_port
    from tests.services.serve_app import save_fine_tunes, wait_healthy

    root = Path(tempfile.mkdtemp(prefix="vtb-serve-bench-"))
    save_fine_tunes(root, ["model", "model-b"])  # two fine-tunes of one base: one LM, two LoRA adapters on it
    stack = LocalStack(root / "stack", services=("ray",), ray_num_cpus=ray_num_cpus)
    stack.start()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **stack.env()}
    serve_bin = str(Path(sys.executable).with_name("serve"))
    try:
        port = free_port()
        cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
               "applications": [{"name": "bench", "route_prefix": "/", "import_path": "services.chat_app:build_app",
                                 "args": {"model": str(root / "model"), "models": {"b": str(root / "model-b")},
                                          **app_args}}]}
        (root / "serve.yaml").write_text(yaml.safe_dump(cfg))
        subprocess.run([serve_bin, "deploy", str(root / "serve.yaml"), "-a", env["RAY_DASHBOARD_ADDRESS"]],
                       check=True, env=env, capture_output=True)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        yield base
    finally:
        subprocess.run([serve_bin, "shutdown", "-y", "-a", env["RAY_DASHBOARD_ADDRESS"]], env=env, capture_output=True)
        stack.stop()


def mixed_modal_body(max_tokens: int, seconds: float = 1.5) -> dict:
    """Text + `seconds` of audio (a tone, as WAV) + text, greedy."""
    buf = io.BytesIO()
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000, format="WAV")
    audio = base64.b64encode(buf.getvalue()).decode()
    return {"model": "vtblender", "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Listen:"}, {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
        {"type": "text", "text": "What is it?"}]}]}
