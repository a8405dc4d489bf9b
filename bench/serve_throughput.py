"""Benchmark (not a test): N concurrent clients vs. one at a time against the same Ray Serve deployment.

    python -m bench.serve_throughput [--clients 8] [--requests 32] [--max-tokens 16]

Starts the local stack (Ray), deploys the chat app with two tiny fine-tunes of one base LM (random init, saved
locally), sends the same mixed-modal request (text + 1.5 s of audio + text) sequentially and then from N concurrent
clients, then a mixed load (half of the requests streaming, half to the second fine-tune) from N clients, and prints requests/s,
p50/p95 latency of each, the ratio to one client (batching's gain as a number) and the mean number of requests per
`generate()` call the server reports.
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


def run(base: str, bodies: list[dict], n: int, clients: int) -> tuple[float, list[float]]:
    """`n` requests from `clients` threads, request i taking bodies[i % len(bodies)]; streams are read to the end."""

    def one(i):
        body = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        r = requests.post(base + "/v1/chat/completions", json=body, timeout=300, stream=body.get("stream", False))
        r.raise_for_status()
        if body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
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

    from infra.stack import LocalStack, free_port
    from tests.services.serve_app import save_fine_tunes

    root = Path(tempfile.mkdtemp(prefix="vtb-serve-bench-"))
    save_fine_tunes(root, ["model", "model-b"])  # two fine-tunes of one base: one LM, two LoRA adapters on it
    stack = LocalStack(root / "stack", services=("ray",), ray_num_cpus=4)
    stack.start()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **stack.env()}
    serve_bin = str(Path(sys.executable).with_name("serve"))
    try:
        port = free_port()
        cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
               "applications": [{"name": "bench", "route_prefix": "/", "import_path": "services.chat_app:build_app",
                                 "args": {"model": str(root / "model"), "models": {"b": str(root / "model-b")},
                                          "max_batch_size": args.clients,
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
        mixed = [body, {**body, "stream": True}, {**body, "model": "b"}, {**body, "model": "b", "stream": True}]
        run(base, mixed, 8, 4)  # warm-up: both fine-tunes loaded
        p = lambda xs, q: 1000 * float(np.percentile(xs, q))  # noqa: E731
        print(f"\ntiny model on CPU, {args.requests} requests of 1.5 s audio + text, max_tokens {args.max_tokens}")
        print(f"{'':40s}{'req/s':>8s}{'ratio':>7s}{'p50 ms':>9s}{'p95 ms':>9s}{'req/generate':>14s}")
        base_rps = None
        for name, bodies, clients in (("1 client", [body], 1), (f"{args.clients} concurrent clients", [body], args.clients),
                                      (f"{args.clients} clients, mixed: stream + 2 fine-tunes", mixed, args.clients)):
            before = requests.get(base + "/v1/stats", timeout=10).json()
            rps, lat = run(base, bodies, args.requests, clients)
            after = requests.get(base + "/v1/stats", timeout=10).json()
            per_call = (after["batched_requests"] - before["batched_requests"]) / max(
                1, after["generate_calls"] - before["generate_calls"])
            base_rps = base_rps or rps
            print(f"{name:40s}{rps:8.2f}{rps / base_rps:7.2f}{p(lat, 50):9.0f}{p(lat, 95):9.0f}{per_call:14.2f}")
    finally:
        subprocess.run([serve_bin, "shutdown", "-y", "-a", env["RAY_DASHBOARD_ADDRESS"]], env=env, capture_output=True)
        stack.stop()


if __name__ == "__main__":
    main()
