"""Benchmark (not a test): a soak of the chat app: valid and invalid requests from N clients for a while.

    python -m bench.serve_soak [--minutes 10] [--clients 8]

Deploys the chat app on the local stack (two fine-tunes of one base), sends a mix of valid requests (text, audio,
streaming, the second fine-tune, a stream the client drops early) and invalid ones (bad JSON, an unknown model,
undecodable audio, too many new tokens, a body over the limit, a wrong API shape) from N clients for the given
time, and prints the count of each answer status per kind, the 5xx and transport errors (the target: none), and
the replica's resident memory (`/v1/stats`) every 30 s: its growth from the first minute of full load to the end
(the target: <= 10%) and its slope over the second half (a leak keeps climbing; allocator warm-up levels off).
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter

import requests


def request_kinds(body: dict) -> dict:
    """kind -> (json body or raw bytes, the status it must get)."""
    text = {**body, "messages": [{"role": "user", "content": "What is two plus three?"}]}
    return {
        "audio": (body, 200),
        "text": (text, 200),
        "stream": ({**body, "stream": True}, 200),
        "fine-tune b": ({**body, "model": "b"}, 200),
        "stream, dropped": ({**body, "stream": True, "max_tokens": 64}, 200),
        "bad json": (b'{"model": "vtblender", "messages": [', 400),
        "unknown model": ({**body, "model": "nope"}, 404),
        "bad audio": ({**body, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "bm90IGF1ZGlv", "format": "wav"}}]}]}, 400),
        "too many tokens": ({**body, "max_tokens": 10**6}, 400),
        "body too large": (b'{"pad": "' + b"x" * 300_000 + b'"}', 413),
        "no messages": ({"model": "vtblender"}, 400),
    }


def client_loop(base: str, kinds: dict, stop: float, seed: int, counts: Counter, wrong: Counter,
                lock: threading.Lock) -> None:
    rng = random.Random(seed)
    names = sorted(kinds)
    while time.time() < stop:
        name = rng.choice(names)
        payload, want = kinds[name]
        try:
            if isinstance(payload, bytes):
                r = requests.post(base + "/v1/chat/completions", data=payload, timeout=120,
                                  headers={"content-type": "application/json"})
            elif name == "stream, dropped":
                with requests.post(base + "/v1/chat/completions", json=payload, stream=True, timeout=120) as r:
                    next(r.iter_lines())  # the first chunk, then the client goes away
            else:
                r = requests.post(base + "/v1/chat/completions", json=payload, timeout=120,
                                  stream=payload.get("stream", False))
                if payload.get("stream") and not r.text.rstrip().endswith("data: [DONE]"):
                    raise RuntimeError("stream did not end with [DONE]")
            status = r.status_code
        except (requests.RequestException, RuntimeError, StopIteration) as e:
            status = f"error: {type(e).__name__}"
        with lock:
            counts[(name, status)] += 1
            if status != want:
                wrong[(name, status)] += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()

    from bench.serve_deployment import deployed_chat_app, mixed_modal_body

    limits = {"max_body_bytes": 200_000, "max_new_tokens": 64}
    with deployed_chat_app({"engine": {"kv_cache_gib": 0.5, "max_num_seqs": args.clients}, "limits": limits}) as base:
        kinds = request_kinds(mixed_modal_body(8))
        counts, wrong, lock = Counter(), Counter(), threading.Lock()
        client_loop(base, kinds, time.time() + 20, 0, Counter(), Counter(), lock)  # warm-up: both fine-tunes loaded
        t0 = time.time()
        stop = t0 + 60 * args.minutes
        threads = [threading.Thread(target=client_loop, args=(base, kinds, stop, i + 1, counts, wrong, lock))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        rss = []  # (minute, MiB): a leak keeps climbing; allocator warm-up under concurrency levels off
        while any(t.is_alive() for t in threads):
            rss.append((round((time.time() - t0) / 60, 2), requests.get(base + "/v1/stats", timeout=10).json()
                        ["replica_rss_mib"]))
            time.sleep(30)
        for t in threads:
            t.join()
        end = requests.get(base + "/v1/stats", timeout=10).json()
        rss.append((round((time.time() - t0) / 60, 2), end["replica_rss_mib"]))
    print(f"\nsoak: {args.minutes:g} min, {args.clients} clients, {sum(counts.values())} requests")
    print(f"{'kind':18s}{'status':>26s}{'count':>8s}")
    for (name, status), n in sorted(counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"{name:18s}{str(status):>26s}{n:8d}")
    server_errors = sum(n for (_, s), n in counts.items() if not isinstance(s, int) or s >= 500)
    print(f"5xx or transport errors: {server_errors}; answers other than expected: {sum(wrong.values())} "
          f"{dict(wrong) if wrong else ''}")
    print("replica RSS (MiB) by minute: " + ", ".join(f"{m:g}: {v:.0f}" for m, v in rss))
    # the baseline is the first sample a minute into the full load: the 8 clients' threads and the allocator's
    # arenas have grown to their working size by then
    base_mib = next((v for m, v in rss if m >= 1.0), rss[0][1])
    half = [(m, v) for m, v in rss if m >= args.minutes / 2]
    slope = (half[-1][1] - half[0][1]) / max(1e-9, half[-1][0] - half[0][0]) if len(half) > 1 else 0.0
    print(f"growth from minute 1 to the end: {100 * (end['replica_rss_mib'] / base_mib - 1):+.1f}% (target <= +10%); "
          f"second half: {slope:+.2f} MiB/min")
    print("stats at the end: " + json.dumps({k: end[k] for k in ("batched_requests", "generate_calls",
                                                                "mean_batch_size", "loaded_models",
                                                                "shared_lm_bases")}))


if __name__ == "__main__":
    main()
