"""The answer-only loss (`models.loss`, used by `SpeechLM.forward`) against transformers' own `labels=` loss: the
same value and the same gradients for Gemma-style and other LM families, with LoRA and fully trained, including
Gemma 2's final-logit softcapping, chunk boundaries and a batch without any label token."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from models.config import tiny
from models.conversation import AudioPart, Conversation, TextPart, Turn
from models.loss import answer_loss, answer_loss_kind, answer_nll_per_row, logit_softcap
from models.speechlm import build_speechlm
from tests.models.lm_families import save_family_checkpoint

FAMILIES = ["gemma", "gemma2", "llama"]  # the paper's LM, one with softcapping, one not Gemma-style


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {name: save_family_checkpoint(name, root) for name in FAMILIES}


def _conversations() -> list[Conversation]:
    rng = np.random.default_rng(0)
    audio = [rng.uniform(-0.3, 0.3, n).astype(np.float32) for n in (12000, 7000)]
    return [
        Conversation([Turn("user", [TextPart("Listen:"), AudioPart(audio[0]), TextPart("What is two plus three?")]),
                      Turn.text("assistant", "The answer is five."),
                      Turn.text("user", "Translate it to German."), Turn.text("assistant", "Hallo there.")]),
        Conversation([Turn("user", [AudioPart(audio[1])]), Turn.text("assistant", "Hello.")]),  # shorter: padded
    ]


def _model(path, lm_mode: str):
    cfg = tiny(lm_mode=lm_mode)
    cfg.lm.pretrained = str(path)
    torch.manual_seed(0)
    model = build_speechlm(cfg)
    with torch.no_grad():  # LoRA B starts at zero: make LoRA change the output, so its path is really compared
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval()  # no dropout: both losses must see the same network


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _hf_loss(model, batch):
    """transformers' causal-LM loss over every position's logits: what SpeechLM.forward computed before."""
    embeds = model.embed_inputs(batch["input_ids"], batch["audio_mask"], batch["audio"], batch["audio_lens"])
    return model.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


@pytest.mark.parametrize("lm_mode", ["lora", "full"])
@pytest.mark.parametrize("name", FAMILIES)
def test_answer_only_loss_and_gradients_equal_transformers_loss(name, lm_mode, checkpoints):
    model = _model(checkpoints[name], lm_mode)
    batch = model.processor(_conversations())
    assert (batch["labels"] == -100).float().mean() > 0.5  # most positions carry no label, as in ASR
    ours, ours_g = _loss_and_grads(model, lambda: model(**batch).loss)
    ref, ref_g = _loss_and_grads(model, lambda: _hf_loss(model, batch))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert ours_g.keys() == ref_g.keys()
    assert any(n.startswith("lm.") for n in ours_g) and any(n.startswith("encoder.") for n in ours_g)
    for n in ref_g:
        torch.testing.assert_close(ours_g[n], ref_g[n], rtol=1e-4, atol=1e-5, msg=n)


def test_gemma2_softcapping_is_applied(checkpoints):
    model = _model(checkpoints["gemma2"], "lora")
    with torch.no_grad():  # a random model's logits are small: scale them up so that a cap of 2 matters
        model.lm.get_output_embeddings().weight.mul_(50)
    model.lm.config.final_logit_softcapping = 2.0
    assert logit_softcap(model.lm.config) == 2.0
    batch = model.processor(_conversations())
    with torch.no_grad():
        ours, ref = model(**batch).loss, _hf_loss(model, batch)
        model.lm.config.final_logit_softcapping = None
        uncapped = model(**batch).loss
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert abs(float(uncapped) - float(ours)) > 0.5  # the cap matters here, so the comparison above bites


def test_chunks_per_row_sums_and_a_batch_without_labels(checkpoints):
    model = _model(checkpoints["gemma"], "lora")
    batch = model.processor(_conversations())
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits.float()  # no labels: the full logits, as before
        hidden = model._hidden(model.embed_inputs(batch["input_ids"], batch["audio_mask"], batch["audio"],
                                                  batch["audio_lens"]), batch["attention_mask"])
        head = model.lm.get_output_embeddings()
        want = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
        sums, counts = model.answer_nll(**batch, labels=labels)
        one_chunk = answer_loss(hidden, labels, head)
        small_chunks = answer_loss(hidden, labels, head, chunk=3)  # boundaries inside and across rows
    torch.testing.assert_close(sums, want.sum(dim=1), rtol=0, atol=1e-4)
    assert counts.tolist() == (labels[:, 1:] != -100).sum(dim=1).tolist()
    torch.testing.assert_close(small_chunks, one_chunk, rtol=0, atol=1e-6)
    torch.testing.assert_close(one_chunk, sums.sum() / counts.sum(), rtol=0, atol=1e-6)
    per_row, _ = answer_nll_per_row(hidden, labels, head, chunk=5)
    torch.testing.assert_close(per_row, sums, rtol=0, atol=1e-5)

    # no label token at all: a zero loss that still backpropagates (transformers' mean gives NaN)
    model.train()
    loss = model(**batch, labels=torch.full_like(labels, -100)).loss
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_which_loss_a_model_gets_is_said_with_the_reason(make_model, monkeypatch):
    # the training job logs this once per stage: a GPU run without Liger says so instead of silently chunking
    head = make_model("lora").lm.get_output_embeddings()
    assert type(head) is torch.nn.Linear  # PEFT's all-linear leaves the LM head alone
    assert "not CUDA" in answer_loss_kind(head, "cpu")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as where it is not installed
    assert "liger-kernel is not installed" in answer_loss_kind(head, "cuda")

    class Wrapped(torch.nn.Linear):
        pass

    assert "not a plain nn.Linear" in answer_loss_kind(Wrapped(4, 8), "cuda")
