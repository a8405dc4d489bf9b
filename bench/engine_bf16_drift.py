"""Benchmark (not a test): how far the served model in bf16 drifts from the trained model in fp32.

    python -m bench.engine_bf16_drift [--models 3] [--max-tokens 32]

In fp32 the engine answers as the trained model token for token (tests/services/test_vllm_engine.py). In bf16 (the
GPU default) it cannot: this measures by how much, on random tiny SpeechLMs with wide weights (answers that differ
per prompt and per audio, as in that test), LoRA merged (the CPU default) and applied per request, over text, audio,
mixed and multi-turn prompts: the share of answers equal to the fp32 model's, the mean length of the common start,
and the same for the PyTorch model itself in bf16 (what the drift of bf16 alone is, engine aside).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    import torch

    from models.speechlm import SpeechLM
    from models.engine import BlockingRunner, EngineSettings, EngineStore
    from tests.services.test_vllm_engine import CONVERSATIONS, _save_varied

    root = Path(tempfile.mkdtemp(prefix="vtb-bf16-drift-"))
    dirs = [_save_varied(root, f"m{i}", "lora", seed=10 + i, base_seed=i) for i in range(args.models)]
    convs = list(CONVERSATIONS.values())
    rows = {}
    for d in dirs:
        fp32 = SpeechLM.from_pretrained(d).generate(convs, max_new_tokens=args.max_tokens, return_ids=True)[1]
        hf16 = SpeechLM.from_pretrained(d, dtype=torch.bfloat16).generate(convs, max_new_tokens=args.max_tokens,
                                                                         return_ids=True)[1]
        rows.setdefault("PyTorch model, bf16", []).extend(zip(hf16, fp32))
        for lora in ("merged", "shared"):
            run = BlockingRunner()
            store = EngineStore(EngineSettings(kv_cache_gib=0.25, lora=lora), dtype=torch.bfloat16)
            served = store.load(str(d))
            got = [ids for _, ids in run(_answers(served, convs, args.max_tokens))]
            store.shutdown()
            run.close()
            rows.setdefault(f"vLLM engine, bf16, LoRA {lora}", []).extend(zip(got, fp32))
    print(f"\n{args.models} random tiny SpeechLMs x {len(convs)} prompts, greedy, {args.max_tokens} tokens; against "
          "the trained model in fp32")
    print(f"  {'':36s}{'equal answers':>15s}{'common start (tokens)':>24s}")
    for name, pairs in rows.items():
        equal = sum(a == b for a, b in pairs) / len(pairs)
        start = sum(_prefix(a, b) for a, b in pairs) / len(pairs)
        print(f"  {name:36s}{equal:15.2f}{start:24.1f}")


async def _answers(served, convs, max_tokens):
    import asyncio

    return await asyncio.gather(*(served.answer(c, max_tokens) for c in convs))


if __name__ == "__main__":
    main()
