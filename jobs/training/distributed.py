"""What every rank of a training run shares with the others: the process group's backend, reductions of scalars,
per-rank random seeds and the random state a checkpoint keeps.

Why a device-mapped backend: Ray Train starts `nccl` for GPU workers, and NCCL takes CUDA tensors only ("No backend
type associated with device type cpu"). With `cpu:gloo,cuda:nccl` the gradients still go over NCCL while anything
on the host (a Python object gathered with `all_gather_object`, a scalar a caller made on the CPU) goes over gloo,
so no collective fails on a GPU cluster that passed on CPU. The reductions here also put their tensor on the
rank's own device, so they run over NCCL itself whatever the backend.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

GPU_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"


def process_group_backend(use_gpu: bool) -> str:
    """The backend string `TorchConfig(backend=...)` starts the workers' process group with."""
    return GPU_BACKEND if use_gpu else CPU_BACKEND


def reduce_over_ranks(values: list[float], world: int, device: torch.device | str,
                      op: Literal["mean", "max"] = "mean") -> list[float]:
    """Collective: each value averaged (or maxed) over the ranks, in one all-reduce of a tensor on `device`."""
    if world == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    out = t.tolist()
    return out if op == "max" else [v / world for v in out]


def worker_seed(seed: int, rank: int) -> int:
    """The rank's own seed, derived from the run's: dropout and any other draw differ between ranks (one seed on
    every rank would drop the same units on each, as if the global batch were one rank's), and are the same on
    every run and resume of the same recipe."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def rng_state(device: torch.device | str) -> dict[str, list[int] | None]:
    """This process's torch random state: the CPU generator's, and the CUDA generator's of `device` when it is a
    GPU (dropout on a GPU draws from that one)."""
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device).tolist() if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state().tolist(), "cuda": cuda}


def set_rng_state(state: dict, device: torch.device | str) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    device = torch.device(device)
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)
