"""Benchmark (not a test): N concurrent clients vs. one at a time against the same Ray Serve deployment.

    python -m bench.serve_throughput [--clients 8] [--requests 32] [--max-tokens 16]

Starts the local stack (Ray), deploys the chat app with a tiny model (random init, saved locally), sends the same
mixed-modal request (text + 1.5 s of audio + text) sequentially and then from N concurrent clients, and prints
requests/s, p50/p95 latency of each and the ratio: batching's gain as a number.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import soundfile as sf
import yaml


def run(base: str, body: dict, n: int, clients: int) -> tuple[float, list[float]]:
    def one(_):
        t0 = time.perf_counter()
        r = requests.post(base + "/v1/chat/completions", json=body, timeout=300)
        r.raise_for_status()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(n)))
    return n / (time.perf_counter() - t0), latencies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    import torch

    from infra.stack import LocalStack, free_port
    from models.config import tiny
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="vtb-serve-bench-"))
    torch.manual_seed(0)
    build_speechlm(tiny(), tokenizer=build_tiny_tokenizer()).save_pretrained(root / "model")
    stack = LocalStack(root / "stack", services=("ray",), ray_num_cpus=4)
    stack.start()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **stack.env()}
    serve_bin = str(Path(sys.executable).with_name("serve"))
    try:
        port = free_port()
        cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
               "applications": [{"name": "bench", "route_prefix": "/", "import_path": "services.chat_app:build_app",
                                 "args": {"model": str(root / "model"), "max_batch_size": args.clients,
                                          "batch_wait_timeout_s": 0.01}}]}
        (root / "serve.yaml").write_text(yaml.safe_dump(cfg))
        subprocess.run([serve_bin, "deploy", str(root / "serve.yaml"), "-a", env["RAY_DASHBOARD_ADDRESS"]], check=True, env=env,
                       capture_output=True)
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        buf = io.BytesIO()
        t = np.arange(24000) / 16000
        sf.write(buf, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000, format="WAV")
        audio = base64.b64encode(buf.getvalue()).decode()
        body = {"model": "vtblender", "max_tokens": args.max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Listen:"}, {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
            {"type": "text", "text": "What is it?"}]}]}
        run(base, body, 4, 1)  # warm-up
        seq_rps, seq_lat = run(base, body, args.requests, 1)
        con_rps, con_lat = run(base, body, args.requests, args.clients)
        p = lambda xs, q: 1000 * float(np.percentile(xs, q))  # noqa: E731
        print(f"\ntiny model on CPU, {args.requests} requests of 1.5 s audio + text, max_tokens {args.max_tokens}")
        print(f"{'':22s}{'req/s':>8s}{'p50 ms':>9s}{'p95 ms':>9s}")
        print(f"{'1 client':22s}{seq_rps:8.2f}{p(seq_lat, 50):9.0f}{p(seq_lat, 95):9.0f}")
        print(f"{f'{args.clients} concurrent clients':22s}{con_rps:8.2f}{p(con_lat, 50):9.0f}{p(con_lat, 95):9.0f}")
        print(f"throughput ratio concurrent/sequential: {con_rps / seq_rps:.2f}")
        stats = requests.get(base + "/v1/stats", timeout=10).json()
        print(f"server: {stats['batched_requests']} requests in {stats['batches']} generate() batches")
    finally:
        subprocess.run([serve_bin, "shutdown", "-y", "-a", env["RAY_DASHBOARD_ADDRESS"]], env=env, capture_output=True)
        stack.stop()


if __name__ == "__main__":
    main()
