"""The stage's model on every rank, read once: rank 0 reads the weights, the other ranks receive their shards.

Before, every worker built the whole SpeechLM in host memory, read the pretrained weights (and the previous
stage's) and only then sharded it: ~7.5 GB a worker for the paper's pair, and an LM that does not fit one GPU
could not be trained under FSDP, which had the whole model on each GPU before sharding. Now (`build_on_ranks`):

1. every rank builds the model's structure with its parameters on the meta device (`models.skeleton`: no memory,
   no file read; the buffers, which are computed, not loaded, are built for real: rotary frequencies, mel
   filterbanks), prepares it as training wants it (frozen weights in the compute dtype, activation
   checkpointing), shards it (FSDP) and allocates its parameters on its device, uninitialized
   (`models.skeleton.allocate`): under FSDP only its own shards;
2. rank 0 alone builds the model with values (`build_speechlm(read_lm_weights=False)`: the same seed, so the
   adapter, LoRA and any random init are drawn as before; the pretrained LM's weights allocated, not read),
   applies the previous stage's weights to it, and streams the pretrained LM's weights from its safetensors files
   a group of about `GROUP_BYTES` at a time (`Rank0Weights`);
3. each group is broadcast (`set_model_state_dict(..., broadcast_from_rank0=True)`, one tensor at a time): every
   rank keeps its shard (FSDP) or the whole tensor (DDP) and drops the rest.

So a rank holds its shards and one tensor in flight; rank 0 also one group and the parts that are not the LM
(encoder, adapter, LoRA: whole, as before). Under DDP every rank still ends with the whole model (that is DDP),
but only rank 0 reads files.

Not for: resuming (`jobs.training.checkpoint.load_checkpoint`: under FSDP each rank reads its own slices of the
sharded checkpoint), or loading in one process (`SpeechLM.from_pretrained`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

GROUP_BYTES = 256 * 2**20  # rank 0's weights in flight at once (its own, before the broadcast takes each tensor)


def weight_groups(core: nn.Module) -> list[list[str]]:
    """The model's state (each shared parameter once, and the persistent buffers) in groups of about
    `GROUP_BYTES`, the same on every rank (it depends on the structure only)."""
    persistent = set(core.state_dict(keep_vars=True))
    names = [(n, p.numel() * p.element_size()) for n, p in core.named_parameters()]
    names += [(n, b.numel() * b.element_size()) for n, b in core.named_buffers() if n in persistent]
    groups, size = [[]], 0
    for name, nbytes in names:
        if groups[-1] and size + nbytes > GROUP_BYTES:
            groups, size = groups + [[]], 0
        groups[-1].append(name)
        size += nbytes
    return groups


class SafetensorsFolder:
    """The tensors of a transformers checkpoint folder (`model.safetensors`, or shards named by
    `model.safetensors.index.json`), read a few at a time: each file is opened (memory-mapped) for one read and
    closed after, so a read holds in memory only the tensors it returns."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            single = folder / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{folder}: no model.safetensors (or its index): the LM's weights")
            with safe_open(str(single), framework="pt") as f:
                self.files = {k: single for k in f.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file = defaultdict(list)
        for k in keys:
            by_file[self.files[k]].append(k)
        out = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                out.update({k: f.get_tensor(k).clone() for k in names})  # clone: nothing left on the mapping
        return out


def lm_folder(source: str) -> Path:
    """The local folder of `lm.pretrained`: itself, or a Hugging Face id's copy in the local cache."""
    from models.config import checkpoint_source

    source = checkpoint_source(source, "lm.pretrained")
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))


class Rank0Weights:
    """Rank 0's values of the model's state, group by group: a pretrained LM's weights from its files (unless the
    previous stage's weights replace them), everything else from `source`, the model rank 0 built with values."""

    def __init__(self, source: nn.Module, lm_files: SafetensorsFolder | None, initialized: set[str]):
        self.state = source.state_dict()
        self.lm_files, self.initialized = lm_files, initialized

    def _file_key(self, name: str) -> str | None:
        """The LM checkpoint's name of `name` when its value comes from the LM's files, else None."""
        from jobs.training.checkpoint import canonical_name

        if self.lm_files is None or not name.startswith("lm.") or name in self.initialized:
            return None
        key = canonical_name(name).removeprefix("lm.")
        if key in self.lm_files:
            return key
        if "lora_" not in key:  # a base weight the build left unread: nothing else gives it a value
            raise KeyError(f"the LM checkpoint has no weight {key!r} (of this model's {name!r}); its files name "
                           "their weights otherwise than this version of transformers builds the model")
        return None

    def group(self, names: list[str]) -> dict[str, torch.Tensor]:
        from_files = {n: k for n in names if (k := self._file_key(n)) is not None}
        read = self.lm_files.read(list(from_files.values())) if from_files else {}
        return {n: read[from_files[n]] if n in from_files else self.state[n] for n in names}


def broadcast_weights(core: nn.Module, groups: list[list[str]], weights: Rank0Weights | None, world: int) -> None:
    """Collective: load every group of `groups` into `core` (sharded or not) from rank 0's `weights` (None on the
    other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    distributed = world > 1 and dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=False)
    for names in groups:
        group = weights.group(names) if weights is not None else {}
        set_model_state_dict(core, group, options=options)
        del group  # rank 0's copy of the group: gone before the next is read


def build_on_ranks(cfg, tokenizer, seed: int, rank: int, world: int, device, sharded: bool,
                   shard_size: int | None = None, prepare: Callable[[nn.Module], None] = lambda core: None,
                   init_dir: Path | None = None,
                   measure: Callable[[nn.Module], Any] | None = None) -> tuple[nn.Module, Any]:
    """Collective. The model of `cfg` on `device`, prepared (`prepare(core)`, on the structure: casts, activation
    checkpointing), sharded when `sharded` (FSDP, in groups of `shard_size` ranks for hybrid sharding; else not
    wrapped: DDP wraps after), its weights read by rank 0 alone: the pretrained ones, the previous stage's from
    `init_dir` (given on rank 0; the others' is not read), the rest drawn from `seed` as `build_speechlm` draws
    them. Returns (model, `measure(model with values)`, taken
    on rank 0 before any sharding and sent to every rank: the FLOP count, which needs a forward pass)."""
    from jobs.training.checkpoint import load_initial_weights
    from jobs.training.parallel import shard_mesh, shard_model
    from models.skeleton import allocate, skeleton
    from models.speechlm import build_speechlm, lm_tokenizer

    tokenizer = tokenizer if tokenizer is not None else lm_tokenizer(cfg)  # the LM's own: the skeleton reads no LM
    core = skeleton(cfg, tokenizer)
    prepare(core)
    groups = weight_groups(core)  # before sharding: the whole tensors' sizes
    if sharded:
        shard_model(core, shard_mesh(world, shard_size, torch.device(device).type))
    allocate(core, device)
    weights, measured = None, [None]
    if rank == 0:
        torch.manual_seed(seed)
        source = build_speechlm(cfg, tokenizer=tokenizer, read_lm_weights=False)
        initialized = set(load_initial_weights(source, init_dir)) if init_dir is not None else set()
        lm_files = SafetensorsFolder(lm_folder(cfg.lm.pretrained)) if cfg.lm.pretrained else None
        weights = Rank0Weights(source, lm_files, initialized)
        measured = [measure(source) if measure is not None else None]
    broadcast_weights(core, groups, weights, world)
    if world > 1 and dist.is_initialized():
        dist.broadcast_object_list(measured, src=0)
    return core, measured[0]

