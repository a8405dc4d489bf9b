"""The causal-LM loss computed only where a label is: vocabulary logits for answer positions, never the sequence.

Why: a transformers causal LM given `labels=` projects every position onto the vocabulary and upcasts those
logits to fp32 before the cross-entropy. With a 256k vocabulary that is ~1 MB of fp32 logits per position (more
with the softmax and the gradient), and in an ASR batch 80-95% of the positions (audio, prompt, padding) carry
label -100 and contribute nothing. Here the caller gives the LM's final hidden states; the positions whose *next*
label is not -100 are selected (the shift transformers does: hidden[:, :-1] predicts labels[:, 1:]), and the
output projection plus cross-entropy run over those positions only, `chunk` at a time. Each chunk is
recomputed in the backward (activation checkpointing), so only one chunk's logits are ever held, in the forward
or the backward. The reduction is the sum over label tokens divided by their number: the same mean as
transformers' loss.

On CUDA, where `liger_kernel` is installed (infra/install.sh installs it with a CUDA torch: the `gpu` extra) and
the head is a plain linear layer, its fused linear cross-entropy does the same projection + cross-entropy in Triton
without materialising a chunk's logits at all. `answer_loss_kind` says which one a model gets, and why (the
training job logs it once per stage).

What this is not: a general loss registry. Models that rescale their logits other than by Gemma 2/3's
`final_logit_softcapping` (Cohere's `logit_scale`, Granite's `logits_scaling`) are refused, not approximated.

Legend: B batch, L tokens, D LM width, V vocabulary, K positions with a label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK = 1024
UNSUPPORTED_LOGIT_SCALING = ("logit_scale", "logits_scaling")


def label_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, L, D), labels (B, L) -> the hidden states that predict a label (K, D), those labels (K,) and the
    row each comes from (K,)."""
    h, y = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    keep = y != IGNORE_INDEX
    rows = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(y)
    return h[keep], y[keep], rows[keep]


def _chunk_nll(head: nn.Module, softcap: float | None, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # the head's (or autocast's) dtype, upcast for the softmax as transformers does
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, reduction="none")


def token_nll(h: torch.Tensor, y: torch.Tensor, head: nn.Module, *, softcap: float | None = None,
              chunk: int = CHUNK) -> torch.Tensor:
    """h (K, D), y (K,) -> cross-entropy of each label (K,) in fp32, `chunk` positions at a time."""
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, h.shape[0], chunk):
        hc, yc = h[start:start + chunk], y[start:start + chunk]
        if needs_grad:  # recompute this chunk's logits in the backward instead of keeping them
            parts.append(checkpoint(_chunk_nll, head, softcap, hc, yc, use_reentrant=False))
        else:
            parts.append(_chunk_nll(head, softcap, hc, yc))
    return torch.cat(parts) if parts else h.new_zeros((0,), dtype=torch.float32)


def _liger_loss(head: nn.Module, device: torch.device | str):
    """liger's fused linear cross-entropy where it applies to `head` on `device`, else None; and why not."""
    if torch.device(device).type != "cuda":
        return None, f"the device is {torch.device(device).type}, not CUDA"
    if type(head) is not nn.Linear:  # a LoRA-wrapped head's output is not `weight @ h`; FSDP's head has DTensors
        return None, f"the LM head is a {type(head).__name__}, not a plain nn.Linear"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None, "liger-kernel is not installed (infra/install.sh installs it with a CUDA torch)"
    return liger_fused_linear_cross_entropy, ""


def answer_loss_kind(head: nn.Module, device: torch.device | str) -> str:
    """Which cross-entropy `answer_loss` runs for `head` on `device`, in words, with the reason when it is not
    liger's fused kernel."""
    fused, why_not = _liger_loss(head, device)
    if fused is not None:
        from importlib.metadata import version

        return f"liger's fused linear cross-entropy (liger-kernel {version('liger-kernel')})"
    return f"chunked projection + cross-entropy, {CHUNK} positions at a time (not liger's fused kernel: {why_not})"


def _liger_nll_sum(head: nn.Module, softcap: float | None, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """The summed cross-entropy by liger's fused kernel, or None where it does not apply (`_liger_loss`)."""
    liger_fused_linear_cross_entropy, _ = _liger_loss(head, h.device)
    if liger_fused_linear_cross_entropy is None:
        return None
    out = liger_fused_linear_cross_entropy(h, head.weight, y, bias=head.bias, ignore_index=IGNORE_INDEX,
                                           reduction="sum", softcap=softcap)
    out = getattr(out, "loss", out)  # releases differ: the loss, an output object, or (loss, z_loss)
    return (out[0] if isinstance(out, tuple) else out).float()


def answer_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, softcap: float | None = None, *,
                chunk: int = CHUNK) -> torch.Tensor:
    """Mean cross-entropy per label token, 0-d fp32: what `AutoModelForCausalLM(..., labels=labels).loss` gives,
    computed only at the label positions (see the module doc).

    hidden (B, L, D): the LM's final hidden states; labels (B, L), -100 where no loss; head: the LM's output
    embeddings (`get_output_embeddings()`); softcap: the LM config's `final_logit_softcapping`. A batch without
    label tokens gives a 0 that is still part of the graph (transformers gives NaN, which would poison a step)."""
    h, y, _ = label_positions(hidden, labels)
    if y.numel() == 0:
        return hidden.sum().float() * 0.0
    total = _liger_nll_sum(head, softcap, h, y)
    if total is None:
        total = token_nll(h, y, head, softcap=softcap, chunk=chunk).sum()
    return total / y.numel()


def answer_nll_per_row(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                       softcap: float | None = None, *, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed cross-entropy over its label tokens (B,) fp32 and how many there are (B,) long."""
    h, y, rows = label_positions(hidden, labels)
    nll = token_nll(h, y, head, softcap=softcap, chunk=chunk)
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=nll.device).index_add(0, rows, nll)
    return sums, torch.bincount(rows, minlength=labels.shape[0])


def logit_softcap(config) -> float | None:
    """The final-logit softcapping of an LM config (Gemma 2/3), None for LMs without it; raises for LMs whose
    logits are rescaled in a way this loss does not reproduce."""
    text = config.get_text_config()
    scaled = [a for a in UNSUPPORTED_LOGIT_SCALING if getattr(text, a, None) not in (None, 1, 1.0)]
    if scaled:
        raise NotImplementedError(
            f"this {text.model_type} LM rescales its logits ({', '.join(scaled)}); models.loss reproduces only "
            "final_logit_softcapping, so its answer-only loss would differ from the model's own")
    return getattr(text, "final_logit_softcapping", None)
