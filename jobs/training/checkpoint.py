"""What a training checkpoint holds and how it is written and read.

A checkpoint folder: the trainable weights (safetensors; frozen weights come from the base checkpoints), the
optimizer state, and `TrainState` as JSON (step, stage, scheduler, every rank's stream positions and torch RNG), so
a restart loses no step and repeats no sample beyond the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

WEIGHTS, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.pt", "train_state.json"


@dataclass
class TrainState:
    step: int
    stage: str
    scheduler: dict
    streams: list[dict] = field(default_factory=list)  # per rank: {data type: TypeStream.state_dict()}
    rng: list[list[int]] = field(default_factory=list)  # per rank: torch.get_rng_state()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


def save_checkpoint(path: Path, model, optimizer, state: TrainState, is_rank0: bool) -> None:
    """Collective: every rank calls it (full state dicts gather on rank 0); rank 0 writes the files."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_rank0:
        return
    path.mkdir(parents=True, exist_ok=True)
    # clone: tied weights (embeddings = LM head when the LM trains fully) share storage, which safetensors refuses
    save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, str(path / WEIGHTS))
    torch.save(optim, path / OPTIMIZER)
    (path / STATE).write_text(state.to_json())


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer and scheduler in place; return the train state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, load_file(str(path / WEIGHTS)), options=StateDictOptions(full_state_dict=True,
                                                                                          strict=False))
    optim = torch.load(path / OPTIMIZER, weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    state = TrainState.from_json((path / STATE).read_text())
    scheduler.load_state_dict(state.scheduler)
    return state


def load_initial_weights(model, path: Path) -> int:
    """Start from another run's trainable weights (e.g. B3: the frozen-LM stage, then LoRA); returns how many
    tensors were loaded."""
    from safetensors.torch import load_file

    def canonical(name: str) -> str:  # the same weight with or without PEFT's LoRA wrapping
        return name.replace("base_model.model.", "").replace(".base_layer", "")

    init = {canonical(k): v for k, v in load_file(str(path / WEIGHTS)).items()}
    loaded = 0
    for name, param in model.named_parameters():
        tensor = init.get(canonical(name))
        if tensor is not None and param.shape == tensor.shape:
            param.data.copy_(tensor)
            loaded += 1
    if loaded == 0:
        raise RuntimeError(f"none of the weights in {path} fit this model")
    return loaded
