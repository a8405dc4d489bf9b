"""Training metrics: a typed window of what happened since the last log line (`tracking.logs.MlflowRunLogger` logs
them to the run)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


def as_floats(values: list) -> list[float]:
    """Losses as floats. The trainer hands them over as device tensors; they are read here, when a window is logged,
    in one transfer, instead of a host sync after every micro-batch."""
    import torch

    if values and all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack(values).double().cpu().tolist()
    return [float(v) for v in values]


@dataclass
class BatchStats:
    """One micro-batch: its data type, loss (a float, or a 0-d tensor read when the window is logged), size, and
    how long it took to get."""

    data_type: str
    loss: object
    samples: int
    tokens: int
    audio_s: float = 0.0
    padded_share: float | None = None  # of speech frames (None for a batch without audio)
    data_s: float = 0.0
    flops: float = 0.0  # model FLOPs of its forward + backward (`jobs.training.flops`)


@dataclass
class MetricsWindow:
    """Everything since the last `flush()`: per-step losses, per-type losses, throughput counters."""

    t0: float = field(default_factory=time.perf_counter)
    data_s: float = 0.0
    samples: int = 0
    audio_s: float = 0.0
    tokens: int = 0
    flops: float = 0.0
    steps: int = 0
    step_losses: list = field(default_factory=list)  # floats or 0-d tensors (`as_floats`)
    padded: list[float] = field(default_factory=list)
    by_type: dict[str, list] = field(default_factory=dict)

    def add_batch(self, b: BatchStats) -> None:
        self.by_type.setdefault(b.data_type, []).append(b.loss)
        self.samples += b.samples
        self.tokens += b.tokens
        self.flops += b.flops
        self.audio_s += b.audio_s
        self.data_s += b.data_s
        if b.padded_share is not None:
            self.padded.append(b.padded_share)

    def add_step(self, loss) -> None:
        self.step_losses.append(loss)
        self.steps += 1

    @property
    def mean_loss(self) -> float:
        return float(np.mean(as_floats(self.step_losses))) if self.step_losses else float("nan")

    def metrics(self, *, world: int = 1, prefix: str = "", loss: float | None = None) -> dict[str, float]:
        """The window as MLflow metrics. `world`: ranks whose samples the counters stand for (each rank counts
        its own; rank 0 reports); `loss`: the loss to report (e.g. averaged over ranks) instead of this rank's."""
        elapsed = max(1e-9, time.perf_counter() - self.t0)
        out = {
            f"{prefix}loss": self.mean_loss if loss is None else loss,
            "throughput/samples_per_s": self.samples * world / elapsed,
            "throughput/audio_s_per_s": self.audio_s * world / elapsed,
            "throughput/tokens_per_s": self.tokens * world / elapsed,
            "throughput/steps_per_s": self.steps / elapsed,
            "perf/model_tflops_per_s": self.flops * world / elapsed / 1e12,
            "data/wait_share": self.data_s / elapsed,
        }
        if self.padded:
            out["data/padded_share"] = float(np.mean(self.padded))
        for t, v in self.by_type.items():
            out[f"{prefix}loss/{t}"] = float(np.mean(as_floats(v)))
            out[f"mix/{t}_batches"] = float(len(v))
        return out
