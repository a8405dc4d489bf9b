"""Benchmark (not a test): the serving engine (vLLM, continuous batching) against the engine it replaced (Hugging
Face `generate` in static batches), under the same clients, in one run.

    python -m bench.serve_throughput [--clients 16] [--requests 64] [--max-tokens 16] [--engines vllm,hf]

Two tiny fine-tunes of one base LM (random init, saved locally) are served by each engine in this process:
- vLLM: `models.engine` (what the chat app runs), one engine for both fine-tunes (LoRAs + their audio towers);
- HF static batches: what the chat app ran before: when generation is free, every request queued meanwhile (up to
  `--clients`) is one left-padded `SpeechLM.generate()` per fine-tune, everyone in it waiting for the longest.
Each gets the same three loads: one client at a time; N concurrent clients sending the same mixed-modal request
(text + 1.5 s audio + text); and a mixed load from N clients: staggered arrivals, prompts of different lengths
(text only, 0.5-3 s of audio), answers of 4-32 tokens, both fine-tunes (also sent by one client, the mixed load's
baseline). Printed per engine and load: requests/s, the ratio to one client sending the same requests, p50/p95
latency and p50/p95 time to first token.

Both engines run on the same 2 cores, fp32, greedy: HF with `--threads` (2) torch threads; each vLLM engine with
`--engine-threads` (1: its front end, in this process, takes the other core). The vLLM settings are the chat app's
CPU defaults (`engine.lora: merged`: each fine-tune's LoRA merged into its engine's LM).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SEED = 0


def _audio(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    rng = np.random.default_rng(seed)
    return (0.2 * np.sin(2 * np.pi * rng.uniform(150, 400) * t) + 0.01 * rng.standard_normal(t.size)).astype(
        np.float32)


def workloads(n: int, max_tokens: int):
    """(name, clients, [(fine-tune, conversation, max_tokens, arrival delay s)]) for the three loads."""
    from models.conversation import AudioPart, Conversation, TextPart, Turn

    same = Conversation([Turn("user", [TextPart("Listen:"), AudioPart(_audio(1.5, 0)), TextPart("What is it?")])])
    rng = np.random.default_rng(SEED)
    mixed = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            conv = Conversation([Turn.text("user", "hello there " * int(rng.integers(1, 12)))])
        else:
            conv = Conversation([Turn("user", [TextPart("Listen:"), AudioPart(_audio(float(rng.uniform(0.5, 3.0)), i)),
                                               TextPart("and answer.")])])
        mixed.append(("a" if i % 2 else "b", conv, int(rng.integers(4, 33)), float(rng.uniform(0, 0.05))))
    return [("1 client", 1, [("a", same, max_tokens, 0.0)] * n),
            ("{c} concurrent clients", None, [("a", same, max_tokens, 0.0)] * n),
            ("1 client, mixed", 1, mixed),
            ("{c} clients, mixed (staggered, 2 fine-tunes)", None, mixed)]


async def drive(answer, jobs, clients: int) -> tuple[float, list[float], list[float]]:
    """Run `jobs` from `clients` concurrent clients; `answer(model, conv, max_tokens)` is an async generator that
    yields once per token. Returns requests/s, latencies, times to first token."""
    queue = list(enumerate(jobs))
    lat, ttft = [], []

    async def client():
        while queue:
            _, (model, conv, max_tokens, delay) = queue.pop(0)
            await asyncio.sleep(delay)
            t0 = time.perf_counter()
            first = None
            async for _ in answer(model, conv, max_tokens):
                first = first or time.perf_counter()
            lat.append(time.perf_counter() - t0)
            ttft.append((first or time.perf_counter()) - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(jobs) / (time.perf_counter() - t0), lat, ttft


class VllmEngine:
    name = "vLLM (continuous batching)"

    def __init__(self, dirs: dict, threads: int, clients: int):
        from models.engine import EngineSettings, EngineStore

        from services.replica_memory import process_rss_bytes

        self.store = EngineStore(EngineSettings(kv_cache_gib=0.5, cpu_threads=threads, max_num_seqs=clients))
        self.models = {k: self.store.load(str(v)) for k, v in dirs.items()}
        print(f"vLLM engine (KV cache 0.5 GiB, {threads} threads): started in {self.store.start_seconds[0]:.1f} s; "
              f"resident memory of its processes {process_rss_bytes(children=True) / 2**20:.0f} MiB, this process "
              f"{process_rss_bytes() / 2**20:.0f} MiB")

    async def answer(self, model, conv, max_tokens):
        served = self.models[model]
        prompt, _, _ = served.prompt(conv)
        seen = 0
        async for out in served.generate(prompt, served.sampling(max_tokens)):
            for _ in range(len(out.outputs[0].token_ids) - seen):
                yield
            seen = len(out.outputs[0].token_ids)

    def close(self):
        self.store.shutdown()


class HfStaticBatches:
    """The engine the chat app had: a batch is every request queued when generation is free, up to `max_batch`,
    one `generate()` per fine-tune; tokens reach their request as generated (a streamer), the batch ends with its
    longest answer."""

    name = "HF generate (static batches)"

    def __init__(self, dirs: dict, threads: int, clients: int):
        import torch

        from models.speechlm import SpeechLM

        torch.set_num_threads(threads)
        self.models = {k: SpeechLM.from_pretrained(v) for k, v in dirs.items()}
        self.max_batch = clients
        self.pending: list = []
        self.busy = False

    async def answer(self, model, conv, max_tokens):
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        self.pending.append((model, conv, max_tokens, tokens, loop))
        if not self.busy:
            self.busy = True
            loop.create_task(self._batches())
        while (t := await tokens.get()) is not None:
            yield t

    async def _batches(self):
        while self.pending:
            batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch:]
            groups: dict = {}
            for item in batch:
                groups.setdefault(item[0], []).append(item)
            for model, items in groups.items():
                await asyncio.to_thread(self._generate, self.models[model], items)
        self.busy = False

    @staticmethod
    def _generate(model, items):
        from transformers.generation.streamers import BaseStreamer

        class ToRows(BaseStreamer):
            def __init__(self):
                self.prompt = True

            def put(self, value):
                if self.prompt:
                    self.prompt = False
                    return
                for (_, _, _, q, loop), t in zip(items, value.reshape(-1).tolist()):
                    loop.call_soon_threadsafe(q.put_nowait, t)

            def end(self):
                for *_, q, loop in items:
                    loop.call_soon_threadsafe(q.put_nowait, None)

        model.generate([c for _, c, *_ in items], max_new_tokens=max(m for _, _, m, *_ in items), streamer=ToRows())

    def close(self):
        pass


def report(engine_name: str, rows: list[tuple[str, float, list[float], list[float]]]) -> list[dict]:
    p = lambda xs, q: 1000 * float(np.percentile(xs, q))  # noqa: E731
    out, base = [], rows[0][1]
    print(f"\n{engine_name} (ratio: to one client with the same requests)")
    print(f"  {'':46s}{'req/s':>8s}{'ratio':>7s}{'p50 ms':>9s}{'p95 ms':>9s}{'TTFT p50':>10s}{'TTFT p95':>10s}")
    for name, rps, lat, ttft in rows:
        base = rps if name.startswith("1 client") else base
        print(f"  {name:46s}{rps:8.2f}{rps / base:7.2f}{p(lat, 50):9.0f}{p(lat, 95):9.0f}{p(ttft, 50):10.0f}"
              f"{p(ttft, 95):10.0f}")
        out.append({"load": name, "req_s": rps, "ratio": rps / base, "p50_ms": p(lat, 50), "p95_ms": p(lat, 95),
                    "ttft_p50_ms": p(ttft, 50), "ttft_p95_ms": p(ttft, 95)})
    return out


def bench_engine(cls, dirs, args) -> list[dict]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result()  # noqa: E731
    threads = args.engine_threads if cls is VllmEngine else args.threads
    engine = cls(dirs, threads, args.clients)
    try:
        loads = workloads(args.requests, args.max_tokens)
        run(drive(engine.answer, loads[2][2][:8], 4))  # warm-up: both fine-tunes, audio and text
        rows = []
        for name, clients, jobs in loads:
            clients = clients or args.clients
            rps, lat, ttft = run(drive(engine.answer, jobs, clients))
            rows.append((name.format(c=clients), rps, lat, ttft))
        return report(engine.name, rows)
    finally:
        engine.close()
        loop.call_soon_threadsafe(loop.stop)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine-threads", type=int, default=1,
                    help="each vLLM engine's threads: its front end (prompt processing, streaming) runs in this "
                         "process, on the other core")
    ap.add_argument("--engines", default="vllm,hf", help="which engines, in order: vllm, hf")
    args = ap.parse_args()

    from tests.services.serve_app import save_fine_tunes

    root = Path(tempfile.mkdtemp(prefix="vtb-serve-bench-"))
    dirs = {"a": root / "a", "b": root / "b"}
    save_fine_tunes(root, ["a", "b"])  # two fine-tunes of one base LM
    print(f"tiny SpeechLM on CPU ({args.threads} threads), {args.requests} requests a load, greedy, fp32")
    results = {}
    for name in args.engines.split(","):
        cls = {"vllm": VllmEngine, "hf": HfStaticBatches}[name]
        results[name] = bench_engine(cls, dirs, args)
    if {"vllm", "hf"} <= results.keys():
        print("\nvLLM / HF, requests/s:  " + "   ".join(
            f"{v['load']}: {v['req_s'] / h['req_s']:.2f}x" for v, h in zip(results["vllm"], results["hf"])))
        print("vLLM / HF, TTFT p50:    " + "   ".join(
            f"{v['load']}: {v['ttft_p50_ms'] / h['ttft_p50_ms']:.2f}x" for v, h in zip(results["vllm"], results["hf"])))


if __name__ == "__main__":
    main()
