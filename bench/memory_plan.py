"""Benchmark (not a test): the memory plan (`jobs.training.memory_plan`) against the measured peak of one training
step, for three model sizes on the CPU in fp32.

    python -m bench.memory_plan [--clips 4] [--seconds 20] [--sizes tiny,mini,small]

Sizes: the `tiny` and `mini` named sizes and `small` (below: a 4-layer FastConformer of width 256, a 12-layer
Gemma-style LM of width 512 with a 32k vocabulary, LoRA r=32), all random init, nothing downloaded. Each takes one
step (forward, backward, AdamW step; `jobs.training.loop.Trainer`) on an ASR batch of `--clips` clips of
`--seconds` s with a short answer, the speech batch of the paper's recipe (4 clips).

How memory is measured: each size runs in a fresh Python process, as bench/train_memory.py does. It reads its
resident set size once everything is imported and before the model is built, builds the model and the batch,
takes one warm-up step (Adam's states exist from then on, as in every later step of a run), returns freed heap to
the OS (`malloc_trim`), resets the kernel's peak-RSS mark (`/proc/self/clear_refs` <- 5) and takes the measured
step. Measured = the high-water mark (VmHWM) after it minus the RSS before the build: weights, gradients, optimizer
state and the step's activations, which is what the plan adds up (its `fixed` part, with the CPU's runtime in
place of the CUDA context, plus the batch's activations and loss).

glibc is told to serve every allocation of 64 KiB or more with its own mapping (`MALLOC_MMAP_THRESHOLD_`), which
it returns to the OS when freed. Why: by default glibc raises that threshold as the process frees large blocks,
after which tensors come from its heap, which cannot shrink below a live block: the features' transient buffers
then stay resident under the encoder's activations (the tiny model's step measured 2x its live tensors that way).
With the fixed threshold RSS follows the live tensors, which is what the plan estimates and what a GPU's caching
allocator holds (less its own fragmentation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SIZES = ("tiny", "mini", "small")


def config(size: str):
    from models.config import mini, tiny

    if size == "tiny":
        return tiny()
    if size == "mini":
        return mini()
    cfg = tiny()
    cfg.encoder.config.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                              subsampling_conv_channels=64)
    cfg.adapter.hidden_size, cfg.adapter.num_heads, cfg.adapter.ff_mult = 256, 4, 4
    cfg.lm.config.update(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    cfg.lm.lora.r, cfg.lm.lora.alpha = 32, 32
    return cfg


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(size: str, clips: int, seconds: float) -> dict:
    """One size, in this (fresh) process: the plan and the measured peak, in MiB."""
    import ctypes
    import gc

    import numpy as np
    import torch

    from jobs.training.loop import Trainer
    from jobs.training.memory_plan import BatchShape, Mode, plan_memory
    from jobs.training.optim import build_optimizer, build_scheduler
    from models.conversation import AudioPart, Conversation, TextPart, Turn
    from models.skeleton import shapes
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer

    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer(["transcribe the audio", "the answer is five"])
    with torch.device("meta"):  # imports every module the build uses, so the baseline below includes them
        build_speechlm(config(size), device="meta")
    rng = np.random.default_rng(0)
    convs = [Conversation([
        Turn("user", [TextPart("Transcribe the audio."),
                      AudioPart(rng.uniform(-0.3, 0.3, int(seconds * 16000)).astype(np.float32))]),
        Turn.text("assistant", "the answer is five")]) for _ in range(clips)]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")

    torch.manual_seed(0)
    model = build_speechlm(config(size), tokenizer=tokenizer)
    batch = model.processor(convs)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.98),
                          weight_decay=1e-3)
    trainer = Trainer(model, opt, build_scheduler(opt, warmup_steps=1, total_steps=10, schedule="constant"))
    model.train()
    trainer.train_step([batch])  # warm-up: Adam's states, one-time allocations
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    loss = trainer.train_step([batch])
    peak = _status_kib("VmHWM")

    labels = int((batch["labels"][:, 1:] != -100).sum())
    shape = BatchShape("asr_ast", clips, int(batch["input_ids"].shape[1]), seconds, labels)
    plan = plan_memory(shapes(model), [shape], Mode(), gpu=False)
    b = plan.batches["asr_ast"]
    return {"measured_mib": (peak - before) / 1024, "plan_mib": plan.peak(False) / 2**20,
            "fixed_mib": sum(plan.fixed.values()) / 2**20, "activations_mib": b["off"] / 2**20,
            "params_m": shapes(model).total / 1e6, "positions": shape.positions, "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: a size, run in a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.clips, args.seconds)))
        return
    print(f"one training step, CPU fp32, AdamW: {args.clips} x {args.seconds:g} s ASR clips; MiB over the RSS "
          "before the model is built")
    print(f"{'size':<7} {'params':>8} {'positions':>9} {'plan fixed':>10} {'plan act.':>9} {'plan':>8} "
          f"{'measured':>9} {'plan/measured':>13}")
    worst = 0.0
    for size in args.sizes.split(","):
        out = subprocess.run([sys.executable, "-m", "bench.memory_plan", "--clips", str(args.clips), "--seconds",
                              str(args.seconds), "--one", size], check=True, capture_output=True, text=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = r["plan_mib"] / r["measured_mib"]
        worst = max(worst, abs(ratio - 1))
        print(f"{size:<7} {r['params_m']:>7.1f}M {r['positions']:>9} {r['fixed_mib']:>10.0f} "
              f"{r['activations_mib']:>9.0f} {r['plan_mib']:>8.0f} {r['measured_mib']:>9.0f} {ratio:>13.3f}")
    print(f"largest |plan/measured - 1|: {worst:.3f} (target: within 0.25)")


if __name__ == "__main__":
    main()
