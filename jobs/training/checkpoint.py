"""What a training checkpoint holds and how it is written and read.

A checkpoint folder: the trainable weights (frozen weights come from the base checkpoints), the optimizer state,
and `TrainState` as JSON (step, stage, scheduler, every rank's stream positions and torch RNG: CPU and GPU), so a
restart loses no step and repeats no sample beyond the checkpoint.

Two layouts of the weights and optimizer state:
- whole (DDP, one rank): `trainable.safetensors` + `optimizer.pt`, gathered and written by rank 0, and read by rank
  0 alone on resume, which broadcasts them;
- sharded (FSDP): torch distributed checkpoint in `sharded/`, every rank writing its own shards
  (`__<rank>_0.distcp`, rank 0 also `.metadata`) into its own folder; Ray Train merges the ranks' folders into one
  checkpoint (each rank reports its folder), and on resume each rank reads the slices it holds, for any world size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

WEIGHTS, OPTIMIZER, STATE, SHARDED = "trainable.safetensors", "optimizer.pt", "train_state.json", "sharded"


@dataclass
class TrainState:
    step: int
    stage: str
    scheduler: dict
    streams: list[dict] = field(default_factory=list)  # per rank: {data type: TypeStream.state_dict()}
    rng: list[dict] = field(default_factory=list)  # per rank: `distributed.rng_state` (CPU and CUDA generators)
    recipe: str = ""  # `Recipe.training_fingerprint()` of the run that wrote it ("" in older checkpoints)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


def save_checkpoint(path: Path, model, optimizer, state: TrainState, is_rank0: bool, sharded: bool = False) -> None:
    """Collective: every rank calls it. Whole: the state dicts gather on rank 0, which writes the files. Sharded:
    every rank writes its shards under `path` (its own folder; rank 0 adds the metadata and the train state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    if sharded:
        import torch.distributed.checkpoint as dcp

        opts = StateDictOptions(ignore_frozen_params=True)
        dcp.save({"model": get_model_state_dict(model, options=opts),
                  "optimizer": get_optimizer_state_dict(model, optimizer)},
                 storage_writer=dcp.FileSystemWriter(str(path / SHARDED)))
    else:
        from safetensors.torch import save_file

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(model, options=opts)
        optim = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_rank0:
            path.mkdir(parents=True, exist_ok=True)
            # clone: tied weights (embeddings = LM head when the LM trains fully) share storage, which safetensors
            # refuses
            save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, str(path / WEIGHTS))
            torch.save(optim, path / OPTIMIZER)
    if is_rank0:
        (path / STATE).write_text(state.to_json())


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / SHARDED / ".metadata").exists()


def read_train_state(path: Path | str, fs=None) -> TrainState:
    """A checkpoint's step, stage, schedule, stream positions, RNG and recipe fingerprint, without its weights: from
    a local folder, or through a pyarrow filesystem `fs` (the driver looking at checkpoints on S3)."""
    if fs is None:
        return TrainState.from_json((Path(path) / STATE).read_text())
    with fs.open_input_stream(f"{path}/{STATE}") as f:
        return TrainState.from_json(f.read().decode())


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer and scheduler in place (either layout); return the train state. Collective when
    a process group of several ranks is up. Sharded: each rank reads its own slices. Whole: rank 0 reads the weights
    and the optimizer state and broadcasts them; the other ranks read only the train state (`STATE`)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if is_sharded_checkpoint(path):
        import torch.distributed.checkpoint as dcp

        opts = StateDictOptions(ignore_frozen_params=True)
        # DCP loads in place into state dicts shaped like this rank's shards
        state_dict = {"model": get_model_state_dict(model, options=opts),
                      "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state_dict, storage_reader=dcp.FileSystemReader(str(path / SHARDED)))
        set_model_state_dict(model, state_dict["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(model, optimizer, state_dict["optimizer"])
    else:
        import torch.distributed as dist
        from safetensors.torch import load_file

        # every rank holds the whole model (DDP), but only rank 0 reads the files; the others receive
        broadcast = dist.is_initialized() and dist.get_world_size() > 1
        reads = not broadcast or dist.get_rank() == 0
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=False)
        set_model_state_dict(model, load_file(str(path / WEIGHTS)) if reads else {}, options=opts)
        optim = torch.load(path / OPTIMIZER, weights_only=True) if reads else {}
        set_optimizer_state_dict(model, optimizer, optim, options=opts)
    state = read_train_state(path)
    scheduler.load_state_dict(state.scheduler)
    return state


def canonical_name(name: str) -> str:
    """The same weight with or without PEFT's LoRA wrapping."""
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def _saved_weights(path: Path, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical name -> tensor of the checkpoint's trainable weights that `wanted` (canonical name -> tensor of
    the right shape) asks for, from either layout. A sharded checkpoint is read whole on every rank (`no_dist`),
    only the wanted weights."""
    if not is_sharded_checkpoint(path):
        from safetensors.torch import load_file

        return {canonical_name(k): v for k, v in load_file(str(path / WEIGHTS)).items()}
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path / SHARDED))
    saved = {k.removeprefix("model."): k for k in reader.read_metadata().state_dict_metadata
             if k.startswith("model.")}
    by_canonical = {canonical_name(k): k for k in saved}
    out = {c: torch.empty(t.shape, dtype=t.dtype) for c, t in wanted.items() if c in by_canonical}  # `t` may be meta
    dcp.load({"model": {by_canonical[c]: t for c, t in out.items()}}, storage_reader=reader, no_dist=True)
    return out


def load_initial_weights(model, path: Path) -> list[str]:
    """Start from another run's trainable weights (e.g. B3: the frozen-LM stage, then LoRA), from a checkpoint of
    either layout, into an unsharded model; returns the names of the parameters loaded. In training, rank 0 alone
    reads them (`jobs.training.model_init`)."""
    params = {canonical_name(n): (n, p) for n, p in model.named_parameters()}
    init = _saved_weights(path, {c: p.detach() for c, (_, p) in params.items()})
    loaded = []
    for name, (full_name, param) in params.items():
        tensor = init.get(name)
        if tensor is not None and param.shape == tensor.shape:
            param.data.copy_(tensor)
            loaded.append(full_name)
    if not loaded:
        raise RuntimeError(f"none of the weights in {path} fit this model")
    return loaded


class CheckpointMismatch(RuntimeError):
    pass


def latest_train_state(run_dir: str, fs=None) -> tuple[str, TrainState] | None:
    """(folder, train state) of the newest checkpoint in a Ray Train run folder, read through a pyarrow filesystem
    (the run's own S3 one, or None: from the path) without its weights; None when there is none yet.

    Ray Train names checkpoints `checkpoint_<timestamp>`, so the names sort by time. A folder without a train
    state (a write cut short) is skipped: Ray Train does not resume from it either."""
    import pyarrow.fs as pafs

    if fs is None:  # a local path, or s3://... with the default endpoint
        fs, run_dir = pafs.FileSystem.from_uri(run_dir)
    entries = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    folders = sorted(e.path for e in entries if e.type == pafs.FileType.Directory
                     and e.base_name.startswith("checkpoint_"))
    for folder in reversed(folders):
        try:
            return folder, read_train_state(folder, fs)
        except OSError:  # FileNotFoundError locally; pyarrow's OSError on S3
            continue
    return None


def check_same_recipe(state: TrainState, fingerprint: str, where: str) -> None:
    """Refuse to continue from a checkpoint another recipe wrote: a run folder reused under the same run name
    after the recipe changed would otherwise resume the old training silently (its weights, its step count)."""
    if state.recipe and state.recipe != fingerprint:
        raise CheckpointMismatch(
            f"{where} holds a checkpoint of another recipe (fingerprint {state.recipe}, this recipe's {fingerprint}): "
            "the run folder of this run name was written by a different model, data, train section or seed. Give "
            "the run a new run.name, or delete that folder to start this recipe from scratch.")
