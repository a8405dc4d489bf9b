"""Activation checkpointing of a SpeechLM for training: each layer keeps only its input in the forward and is
recomputed in the backward, trading about one more forward of compute for the activations of every layer (the
LM's dominate: ~3.6 MB per token for the paper's 18-layer Gemma 2B).

Which layers: the LM's decoder layers and the speech encoder's layers (FastConformer or Whisper) through
transformers' own per-layer checkpointing, and the adapter's Conformer layers (`ConformerLayer.checkpointing`).
Each is checkpointed inside its forward, so module hooks (FSDP's gathers) run once, outside the recompute.

Non-reentrant throughout (`use_reentrant=False`): reentrant checkpointing needs an input that requires grad to
reach the weights inside a layer, and a text-only batch into a frozen or LoRA LM has none (its embeddings are
frozen). For the same reason transformers' `enable_input_require_grads` hook, which it installs for reentrant
checkpointing, is removed again: with it a frozen LM's text batches would run a backward that reaches no weight.

Dropout draws the same numbers in the recompute (torch saves and restores the RNG state), so a step's loss and
gradients are those of the same step without checkpointing.
"""

from __future__ import annotations

from torch import nn

NON_REENTRANT = {"use_reentrant": False}


def _enable_hf(model: nn.Module) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias); the pin allows either
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(NON_REENTRANT))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(NON_REENTRANT))
    model.disable_input_require_grads()


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every layer of `model` (a `models.speechlm.SpeechLM`) while it trains; eval and no-grad
    forwards are unchanged."""
    lm = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm  # under PEFT: the base
    _enable_hf(lm)
    _enable_hf(model.encoder.encoder)
    for layer in model.adapter.layers:
        layer.checkpointing = True
