"""How the SpeechLM is spread over the ranks of a run: DDP (the default) or FSDP (PyTorch's `fully_shard`).

FSDP shards every weight, gradient and optimizer state over the ranks, so an LM that does not fit on one GPU with
its optimizer state trains. The units that gather their weights together are the transformer layers, as
transformers names them for its own sharding (`_no_split_modules`: Gemma's decoder layer, Whisper's and Parakeet's
encoder layers), and the adapter's Conformer layers; what is left (embeddings, the encoder's subsampling, the
adapter's projections, the LM head) is one root unit. Frozen weights are sharded like the rest and never get
gradients, so LoRA and a frozen LM need nothing special.

The training job shards the model as it builds it, on the meta device, before any weight exists, and rank 0
alone reads the weights and broadcasts them (`jobs.training.model_init`): no GPU holds the whole model, and no
worker reads a pretrained LM whole into host memory. Under FSDP the optimizer must be built after sharding (it
replaces each parameter with a sharded one), clipping sees the global norm (`torch.nn.utils.clip_grad_norm_`
reduces DTensor gradients over the ranks), checkpoints are sharded (`jobs.training.checkpoint`, torch distributed
checkpoint) and the final model is gathered in full (`full_state_dict`).

Hybrid sharding (`train.fsdp_shard_size`): the ranks form a (replicas x shard size) device mesh; each group of
`shard_size` consecutive ranks holds one sharded copy, and gradients are reduce-scattered within a group then
all-reduced across groups. With one group per node the per-layer all-gathers stay on the node's fast links.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from models.skeleton import layer_units

Strategy = Literal["ddp", "fsdp"]


def shard_mesh(world: int, shard_size: int | None, device_type: str):
    """The device mesh FSDP shards over: None (every rank, FSDP's default) or the 2-D (replicate, shard) mesh of
    hybrid sharding."""
    if shard_size is None or shard_size == world:
        return None
    if world % shard_size:
        raise ValueError(f"fsdp_shard_size={shard_size} does not divide the {world} ranks into whole groups")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def wrap_model(core: nn.Module, strategy: Strategy, world: int, shard_size: int | None = None,
               device_type: str = "cpu", weights_synced: bool = False) -> nn.Module:
    """What the forward and backward run through: `core` itself (one rank), a DDP wrapper, or `core` sharded in
    place (FSDP: the same module object, its parameters now DTensors).

    Under bf16 autocast the frozen weights, the bulk of the model, are held in bf16 already
    (`models.precision.cast_frozen_weights`), so FSDP gathers them in bf16: half the all-gather traffic. Trainable
    weights are gathered as they are (fp32; autocast casts them for each matmul) and gradients reduced in fp32. No
    `param_dtype` in the policy: it would also cast the forward's float inputs (the raw waveform) to bf16 before
    the features, and make FSDP compute differently from DDP. A unit may hold bf16 frozen weights next to fp32
    trainable ones: FSDP2 asks one dtype only of the trainable parameters of a unit.

    `weights_synced`: every rank already holds rank 0's weights (`jobs.training.model_init` broadcast them), so DDP
    is told not to broadcast the whole model again as it wraps it (`init_sync=False`): ~7.5 GB more at every start
    of the paper's model. Left False, DDP makes the ranks equal itself."""
    import ray.train.torch

    if strategy == "fsdp":
        if is_sharded(core):  # `jobs.training.model_init` shards as it builds
            return core
        return shard_model(core, shard_mesh(world, shard_size, device_type))
    if world == 1:
        return core
    # text-only batches leave the encoder and adapter without gradients: DDP must allow unused parameters
    return ray.train.torch.prepare_model(
        core, parallel_strategy_kwargs={"find_unused_parameters": True, "init_sync": not weights_synced})


def shard_model(core: nn.Module, mesh=None) -> nn.Module:
    """FSDP: `core` sharded in place (per layer, then the root) over `mesh` (`shard_mesh`; None: every rank), on the
    device its parameters are on; on the meta device, nothing is allocated (`jobs.training.model_init` allocates the
    shards after)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for unit in layer_units(core):
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(core, mesh=mesh, mp_policy=mp)
    # the content check's per-conversation answer loss enters the model there, not through forward
    register_fsdp_forward_method(core, "answer_nll")
    return core


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective (every rank calls it) for a sharded model: the whole model's weights, on CPU, on rank 0 (an empty
    dict on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
