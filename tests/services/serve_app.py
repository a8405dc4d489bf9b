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


def save_fine_tunes(root, names: list[str], config=None, tokenizer=None, seed: int = 0) -> dict:
    """Fine-tunes of one base LM, as training several recipes from one checkpoint gives: the same base weights,
    each with its own encoder, modality adapter and (non-zero) LoRA weights. Saved under root/<name>; returns
    name -> folder."""
    import torch

    from models.config import tiny
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    model = build_speechlm(config or tiny(), tokenizer=tokenizer or build_tiny_tokenizer())
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dirs = {}
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:  # LoRA B starts at zero: give every trained weight its own values
                    p.copy_(start[n] + 0.05 * torch.randn(p.shape, generator=g))
        dirs[name] = model.save_pretrained(root / name)
    return dirs
