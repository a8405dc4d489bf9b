"""`Trainer`: one optimizer step over gradient-accumulated micro-batches. Used by the SpeechLM SFT workers, the
encoder's CTC pretraining and the benchmark's plain loop, so all three step the same way.

It knows nothing of Ray, data types or MLflow: the caller hands it micro-batches (dicts of tensors that the model
takes as keyword arguments) and gets the loss back.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Literal

import torch

from jobs.training.optim import clip_gradients


class Trainer:
    """`model(**batch)` must return a loss tensor or an output with `.loss`.

    `model` is what the forward runs through (a DDP wrapper, or a model sharded by FSDP); gradients are synchronised
    across ranks only on the last micro-batch of a step (DDP's `no_sync`, FSDP's `set_requires_gradient_sync`).
    """

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, *, grad_accum: int = 1,
                 max_grad_norm: float | None = 1.0, clip: Literal["global", "per_module"] = "global",
                 autocast_dtype: torch.dtype | None = None, device_type: str = "cpu"):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_accum, self.max_grad_norm, self.clip = grad_accum, max_grad_norm, clip
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        self.step = 0

    def forward(self, batch: dict) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.model(**batch)
        return out if isinstance(out, torch.Tensor) else out.loss

    def train_step(self, micro_batches: Iterable[dict],
                   on_micro: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Forward/backward each of the step's `grad_accum` micro-batches (pulled lazily, so the caller may time
        its data loading), clip, step optimizer and schedule. Returns the step's mean loss; `on_micro(i, loss)`
        sees each micro-batch's. Losses are detached 0-d tensors on the model's device, not floats: reading one
        (`float(loss)`) waits for the device to finish, so callers read them only when they log."""
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for micro, batch in enumerate(micro_batches):
            last = micro == self.grad_accum - 1
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter only on the last one
                self.model.set_requires_gradient_sync(last)
            with contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
                loss = self.forward(batch)
                if loss.requires_grad:
                    (loss / self.grad_accum).backward()
                # else: nothing trainable took part (a text batch with a frozen LM): the batch only counts in the
                # loss; every rank drew the same data type, so they all skip alike
            value = loss.detach().float()
            total = value / self.grad_accum if total is None else total + value / self.grad_accum
            if on_micro:
                on_micro(micro, value)
            if last:
                break
        clip_gradients(self.optimizer, self.max_grad_norm, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return total
