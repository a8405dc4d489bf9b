"""Optimizer, gradient clipping and learning-rate schedule of a SpeechLM (or any model with the same modules)."""

from __future__ import annotations

from typing import Literal

import torch

MODULES = ("encoder", "adapter", "lm")


def module_param_groups(model: torch.nn.Module, lrs: dict[str, float]) -> list[dict]:
    """AdamW parameter groups, one per module of `MODULES` that trains, each at its peak lr (`lrs[name]`)."""
    groups = []
    for name in MODULES:
        params = [p for p in getattr(model, name).parameters() if p.requires_grad]
        if params:
            groups.append({"name": name, "params": params, "lr": lrs[name]})
    return groups


def build_optimizer(groups: list[dict], *, lr: float, betas: tuple[float, float], weight_decay: float):
    # Adam with decoupled weight decay (AdamW), as NeMo's default fused Adam (adam_w_mode) that the paper used
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def build_scheduler(optimizer, *, warmup_steps: int, total_steps: int, schedule: Literal["cosine", "constant"],
                    min_lr_ratio: float = 0.0):
    """Linear warm-up, then cosine decay to `min_lr_ratio` of each group's peak lr (or constant): transformers'
    schedules, so a checkpoint's scheduler state means what it means in any HF trainer."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps,
                                                       min_lr_rate=min_lr_ratio)


def clip_gradients(optimizer, max_norm: float | None, mode: Literal["global", "per_module"] = "global") -> None:
    """Clip to `max_norm`: one norm over all trainable weights (`global`), or each parameter group's on its own
    (`per_module`: a fresh adapter's large first gradients then cannot shrink the pretrained encoder's step)."""
    if not max_norm:
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)
    else:
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], max_norm)
