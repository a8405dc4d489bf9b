"""Models built without their weights: structure on the meta device, then memory allocated but not written.

- `allocate`: a meta-device model (or its FSDP shards) given uninitialized memory, its computed buffers and tied
  weights kept (the training job's ranks, `jobs.training.model_init`, before rank 0's weights arrive);
- `unread_lm`: a pretrained LM whose weights are allocated but never read, for rank 0, which streams them from the
  checkpoint's files itself, so no worker holds a second, whole copy of the LM in host memory
  (`models.speechlm.build_speechlm(read_lm_weights=False)` builds its LM here)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM


def allocate(core: nn.Module, device) -> None:
    """Give a meta-device model (or its meta shards) uninitialized memory on `device`, keeping the computed buffers'
    values and the tied weights (embeddings = LM head) tied: `to_empty` replaces every tensor, and a parameter two
    modules share becomes two."""
    buffers = {name: b for name, b in core.named_buffers()}
    first: dict[int, str] = {}
    ties = []  # (name, name of the parameter it is tied to)
    for name, p in core.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    core.to_empty(device=device)
    with torch.no_grad():
        for name, b in core.named_buffers():
            b.copy_(buffers[name])
    for name, target in ties:
        module, _, attr = name.rpartition(".")
        if core.get_parameter(name) is not core.get_parameter(target):
            setattr(core.get_submodule(module), attr, core.get_parameter(target))


def unread_lm(source: str) -> nn.Module:
    """A pretrained LM's structure with its weights allocated on the host but neither read nor initialized: the
    caller loads them (`jobs.training.model_init` streams them from the files). Pages a process allocates and never
    writes take no RAM, so the weights cost nothing until loaded.

    Built as transformers loads, parameters on the meta device (accelerate's `init_empty_weights`): no random
    numbers drawn, so the adapter and LoRA drawn after it get the values they get when the weights are read. Then
    allocated, not left on meta, because PEFT puts each LoRA weight on its base layer's device. The buffers
    (rotary frequencies) keep the values computed at build, and tied weights stay tied. In the checkpoint's dtype,
    as `from_pretrained` builds it (bf16 for Gemma's; PEFT rounds the LoRA init to it); `allocate_unwritten` then gives
    the weights the model's."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    allocate(lm, "cpu")
    lm.tie_weights()  # accelerate registers each name's meta parameter anew: the tied LM head came untied
    return lm


def allocate_unwritten(lm: nn.Module, dtype: torch.dtype) -> None:
    """The unread weights of `unread_lm` (all but LoRA's) allocated anew in `dtype`, still unwritten: cast to the
    model's dtype, every one would be written, and take memory, before it is loaded."""
    for name, p in lm.named_parameters():
        if "lora_" not in name and p.dtype != dtype:
            p.data = torch.empty(p.shape, dtype=dtype)
