"""Benchmark (not a test): N concurrent clients vs. one at a time against the same Ray Serve deployment.

    python -m bench.serve_throughput [--clients 8] [--requests 32] [--max-tokens 16]

Starts the local stack (Ray), deploys the chat app with two tiny fine-tunes of one base LM (random init, saved
locally), sends the same mixed-modal request (text + 1.5 s of audio + text) sequentially and then from N concurrent
clients, then a mixed load (half of the requests streaming, half to the second fine-tune) from N clients, and prints
requests/s, p50/p95 latency of each, the ratio to one client (batching's gain as a number) and the mean number of
requests per `generate()` call the server reports.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests


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

    from bench.serve_deployment import deployed_chat_app, mixed_modal_body

    with deployed_chat_app({"max_batch_size": args.clients, "batch_wait_timeout_s": 0.01}) as base:
        body = mixed_modal_body(args.max_tokens)
        mixed = [body, {**body, "stream": True}, {**body, "model": "b"}, {**body, "model": "b", "stream": True}]
        run(base, mixed, 8, 4)  # warm-up: both fine-tunes loaded
        p = lambda xs, q: 1000 * float(np.percentile(xs, q))  # noqa: E731
        print(f"\ntiny model on CPU, {args.requests} requests of 1.5 s audio + text, max_tokens {args.max_tokens}")
        print(f"{'':40s}{'req/s':>8s}{'ratio':>7s}{'p50 ms':>9s}{'p95 ms':>9s}{'req/generate':>14s}")
        base_rps = None
        for name, bodies, clients in (("1 client", [body], 1),
                                      (f"{args.clients} concurrent clients", [body], args.clients),
                                      (f"{args.clients} clients, mixed: stream + 2 fine-tunes", mixed, args.clients)):
            before = requests.get(base + "/v1/stats", timeout=10).json()
            rps, lat = run(base, bodies, args.requests, clients)
            after = requests.get(base + "/v1/stats", timeout=10).json()
            per_call = (after["batched_requests"] - before["batched_requests"]) / max(
                1, after["generate_calls"] - before["generate_calls"])
            base_rps = base_rps or rps
            print(f"{name:40s}{rps:8.2f}{rps / base_rps:7.2f}{p(lat, 50):9.0f}{p(lat, 95):9.0f}{per_call:14.2f}")


if __name__ == "__main__":
    main()
