"""Benchmark (not a test): peak memory of one training step (forward + backward) with a 256k vocabulary.

    python -m bench.train_memory [--clips 4] [--seconds 30]

A SpeechLM with the tiny encoder and adapter and a small Gemma-style LM with Gemma's vocabulary (256,000 tokens,
hidden 256, 2 layers, random init, nothing downloaded) takes one step on a long ASR batch (4 clips of 30 s, each a
short answer: most positions carry no label), on the CPU, in fp32, in four configurations:

- loss: answer-only (`SpeechLM.forward`, `models.loss`) or full logits (transformers' `labels=` loss over every
  position, what the model did before);
- activation checkpointing off or on (`models.activation_checkpointing`).

Prints each configuration's peak, its ratio to full logits without checkpointing, and checks that all four
losses agree within 1e-5.

How memory is measured, and why: each configuration runs in a fresh Python process (nothing left over from
another configuration, in the process or in the allocator), which takes one warm-up step first (one-time
allocations: thread pools, caches), drops the gradients, returns freed heap to the OS (`malloc_trim`), reads its
resident set size, resets the kernel's peak-RSS mark (`/proc/self/clear_refs` <- 5, Linux) and takes the
measured step. The peak is the kernel's high-water mark (VmHWM) after the step minus the RSS before it: every
page the step touched at its worst moment, counted by the kernel, so a spike between two samples cannot be
missed the way a sampling thread would miss it. It includes the gradients the step leaves (part of any step),
not the weights. CPU RSS is a proxy for GPU memory: the same tensors, without the CUDA caching allocator's
fragmentation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VOCAB = 256_000
CONFIGS = [("full logits", False), ("full logits", True), ("answer-only", False), ("answer-only", True)]


def build(clips: int, seconds: float):
    import numpy as np
    import torch

    from models.config import tiny
    from models.conversation import AudioPart, Conversation, TextPart, Turn
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer

    cfg = tiny()
    cfg.lm.config.update(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=64)
    torch.manual_seed(0)
    model = build_speechlm(cfg, tokenizer=build_tiny_tokenizer(["transcribe the audio", "the answer is five"]))
    rng = np.random.default_rng(0)
    convs = [Conversation([
        Turn("user", [TextPart("Transcribe the audio."),
                      AudioPart(rng.uniform(-0.3, 0.3, int(seconds * 16000)).astype(np.float32))]),
        Turn.text("assistant", "the answer is five")]) for _ in range(clips)]
    return model, model.processor(convs)


def step_loss(model, batch, full_logits: bool):
    if not full_logits:
        return model(**batch).loss
    embeds = model.embed_inputs(batch["input_ids"], batch["audio_mask"], batch["audio"], batch["audio_lens"])
    return model.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(loss_kind: str, checkpointing: bool, clips: int, seconds: float) -> dict:
    """One configuration, in this (fresh) process: peak MiB of the measured step above the RSS before it."""
    import ctypes
    import gc

    from models.activation_checkpointing import enable_activation_checkpointing

    model, batch = build(clips, seconds)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    full = loss_kind == "full logits"
    step_loss(model, batch, full).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    loss = step_loss(model, batch, full)
    loss.backward()
    peak = _status_kib("VmHWM")
    labels = batch["labels"]
    return {"peak_mib": (peak - before) / 1024, "loss": float(loss), "positions": int(batch["attention_mask"].sum()),
            "label_tokens": int((labels[:, 1:] != -100).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "<loss kind>|<0/1>", run in a child process
    args = ap.parse_args()
    if args.one:
        kind, ckpt = args.one.split("|")
        print(json.dumps(measure(kind, ckpt == "1", args.clips, args.seconds)))
        return
    results = {}
    for kind, ckpt in CONFIGS:
        out = subprocess.run([sys.executable, "-m", "bench.train_memory", "--clips", str(args.clips), "--seconds",
                              str(args.seconds), "--one", f"{kind}|{int(ckpt)}"],
                             check=True, capture_output=True, text=True)
        results[(kind, ckpt)] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results[CONFIGS[0]]
    print(f"one training step, CPU fp32: {args.clips} x {args.seconds:g} s ASR clips, {base['positions']} positions, "
          f"{base['label_tokens']} with a label; LM vocabulary {VOCAB:,}, hidden 256, 2 layers (LoRA)")
    print(f"{'loss':<13} {'checkpointing':<14} {'peak MiB':>9} {'vs full/off':>12} {'loss value':>12}")
    for kind, ckpt in CONFIGS:
        r = results[(kind, ckpt)]
        rel = r["peak_mib"] / base["peak_mib"]
        print(f"{kind:<13} {'on' if ckpt else 'off':<14} {r['peak_mib']:>9.0f} {rel:>11.3f}x {r['loss']:>12.6f}")
    ratio = lambda a, b: results[a]["peak_mib"] / results[b]["peak_mib"]  # noqa: E731
    print(f"answer-only / full logits: {ratio(('answer-only', False), ('full logits', False)):.3f} "
          f"(checkpointing off), {ratio(('answer-only', True), ('full logits', True)):.3f} (on)")
    print(f"checkpointing on / off: {ratio(('full logits', True), ('full logits', False)):.3f} (full logits), "
          f"{ratio(('answer-only', True), ('answer-only', False)):.3f} (answer-only)")
    losses = [r["loss"] for r in results.values()]
    spread = max(losses) - min(losses)
    print(f"losses agree within 1e-5: {spread <= 1e-5} (largest difference {spread:.2e})")


if __name__ == "__main__":
    main()
