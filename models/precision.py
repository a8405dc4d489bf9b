"""Which device and which floating-point type a model runs in: one home for the choice that training, evaluation
and serving all make.

- Inference (`inference_dtype`): bf16 on a GPU that computes it natively, fp32 on one that does not (V100, T4:
  their bf16 is emulated, slow) and on CPU; fp16 only when asked for by name: Gemma's activations overflow fp16
  (its embeddings are scaled by sqrt(hidden), and the checkpoints were trained in bf16), so `auto` never picks
  it. Any of them can be asked for by name (`bf16` on CPU is how the suite tests the GPU's dtype path).
- Training (`training_autocast_dtype`): bf16 autocast over fp32 trainable weights, the frozen ones held in bf16
  (`cast_frozen_weights`), or none (fp32). bf16 is refused on a GPU
  without native bf16, naming the GPU: fp16 training would need loss scaling, which this product does not do.
- Computed buffers (`KeepComputedBuffers`): what stays fp32 when a model's weights move to bf16 or fp16.
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
from torch import nn

Precision = Literal["auto", "bf16", "fp16", "fp32"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class PrecisionError(ValueError):
    """A precision the device cannot run (e.g. bf16 training on a V100)."""


def resolve_device(device: str = "auto") -> str:
    """`auto`: cuda when this process sees a GPU, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` computes bf16 natively (every CPU torch runs; among GPUs, Ampere and newer)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def inference_dtype(device: str | torch.device, precision: Precision = "auto") -> torch.dtype:
    """The weights' dtype for generation and evaluation on `device`."""
    device = torch.device(device)
    if precision != "auto":
        if precision == "bf16" and not native_bf16(device):
            raise PrecisionError(f"{_gpu_name(device)} has no native bf16; use precision auto (fp32 there), or fp16 "
                                 "if this model is known not to overflow it")
        return DTYPES[precision]
    # auto: fp16 is never chosen for the caller (a Gemma overflows it); a GPU without native bf16 runs fp32
    return torch.bfloat16 if device.type == "cuda" and native_bf16(device) else torch.float32


def training_autocast_dtype(device: str | torch.device, precision: Precision = "auto") -> torch.dtype | None:
    """The autocast dtype of a training step on `device` (None: fp32 throughout). Trainable weights stay fp32
    either way; with an autocast dtype the training job holds the frozen ones in it (`cast_frozen_weights`)."""
    device = torch.device(device)
    if precision == "fp16":
        raise PrecisionError("fp16 training needs loss scaling, which this product does not do: use bf16 or fp32")
    if precision == "fp32":
        return None
    if precision == "bf16":
        if not native_bf16(device):
            raise PrecisionError(
                f"train.precision is bf16 but {_gpu_name(device)} has no native bf16 (it is emulated there): set "
                "train.precision to fp32, or train on an Ampere or newer GPU")
        return torch.bfloat16
    # auto: bf16 where the GPU has it natively, fp32 elsewhere (CPU, V100, T4)
    return torch.bfloat16 if device.type == "cuda" and native_bf16(device) else None


def cast_frozen_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Hold every weight that does not train (`requires_grad` False: the LM's base under LoRA or frozen, a frozen
    encoder or adapter) in `dtype`; trainable weights, and with them the optimizer's state, stay as they are (fp32).
    Returns how many values were cast.

    Why: under bf16 autocast every matmul casts its weight to bf16 anyway, and the backward keeps that cast: fp32
    frozen weights cost their fp32 copy plus a bf16 one (6 bytes a weight, ~15 GB for the paper's Gemma 2B) for
    nothing but the ops autocast leaves in fp32 (embedding lookups, norm weights). In bf16 they cost 2 bytes.

    Parameters only: buffers keep their dtype (the computed ones of `KeepComputedBuffers`, BatchNorm's running
    statistics). `p.data` is replaced, not the Parameter, so tied weights stay tied and every
    reference (PEFT's wrappers, an optimizer) still holds the same parameter. Undo with `dtype=torch.float32`."""
    cast = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast += p.numel()
    return cast


def computed_buffers(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(owner, name, tensor) of every floating buffer under `module` that the code computes at build rather than
    a checkpoint holds: the non-persistent ones (rotary `inv_freq` / `original_inv_freq` of any transformers LM, an
    encoder's position frequencies, the mel filterbank and window, Gemma's `embed_scale`). Persistent buffers
    (BatchNorm's running statistics) are state like weights: they are saved, loaded and cast with them."""
    for owner in module.modules():
        for name, b in owner._buffers.items():
            if b is not None and b.is_floating_point() and name in owner._non_persistent_buffers_set:
                yield owner, name, b


class KeepComputedBuffers(nn.Module):
    """A module whose computed buffers (`computed_buffers`, its own and its submodules') keep the dtype they were
    built in (fp32) when the module moves to another dtype (`.to(torch.bfloat16)`, `.half()`); they follow its
    device.

    Why: `Module.to(dtype)` casts floating buffers too. Training never does (it casts parameters only:
    `cast_frozen_weights`), so a model served or evaluated in bf16 would otherwise compute with rounded rotary
    frequencies (angle error growing with position: ~0.7 rad at position 500 for Gemma's head dim 256, measured
    in `tests/models/test_bf16.py` as logits drifting from the trained model's along the sequence), a rounded
    filterbank and window. transformers' rotary embedding computes in fp32 from an fp32 `inv_freq` and casts its
    cos/sin to the activations' dtype, as the features cast theirs; nothing else needs to change. Which buffers is
    decided by the code (persistent or not), not by name, so a new architecture's are covered."""

    def _apply(self, fn, recurse=True):
        kept = [k for k in computed_buffers(self) if recurse or k[0] is self]
        super()._apply(fn, recurse)
        for owner, name, before in kept:
            after = owner._buffers[name]
            if after is not None and after.dtype != before.dtype:  # a device move alone keeps what `fn` gave
                owner._buffers[name] = after.to(before.dtype) if before.is_meta else before.to(after.device)
        return self
