"""Activation checkpointing (`models.activation_checkpointing`, recipe `train.activation_checkpointing`): the same
training step's loss and gradients with it on and off, for a LoRA LM, a frozen LM (whose text-only batches have
nothing to backpropagate into) and full fine-tuning, with both encoder kinds; and the layers really are recomputed
in the backward."""

from __future__ import annotations

import pytest
import torch

from models.activation_checkpointing import enable_activation_checkpointing
from models.conversation import AudioPart, Conversation, TextPart, Turn


def _batch(model, audio, text_only=False):
    if text_only:
        convs = [Conversation([Turn.text("user", "hello world"), Turn.text("assistant", "the answer is five")])]
    else:
        convs = [Conversation([Turn("user", [TextPart("Listen:"), AudioPart(audio(1.2 + 0.4 * i, seed=i))]),
                               Turn.text("assistant", "the answer is five")]) for i in range(2)]
    return model.processor(convs)


def _step(model, batch):
    """Loss and gradients of one training step (dropout on: the recompute must draw what the forward drew)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model(**batch).loss
    if loss.requires_grad:
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


class CallCounter:
    """How many times each watched module starts (forward and any recompute in the backward; a pre-hook, because
    the recompute stops as soon as it has what the backward needs, which may be inside a module)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.calls = dict.fromkeys(modules, 0)
        for name, m in modules.items():
            m.register_forward_pre_hook(lambda *_, name=name: self.calls.__setitem__(name, self.calls[name] + 1))


def _watched(model) -> dict[str, torch.nn.Module]:
    lm = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm
    return {"lm": lm.model.layers[0].mlp, "encoder": model.encoder.encoder.layers[0].self_attn,
            "adapter": model.adapter.layers[0].ff1}


@pytest.mark.parametrize("lm_mode,encoder_kind", [("lora", "fastconformer"), ("frozen", "fastconformer"),
                                                  ("full", "fastconformer"), ("lora", "whisper")])
def test_checkpointing_keeps_loss_and_gradients_and_recomputes_every_part(make_model, audio, lm_mode, encoder_kind):
    plain = make_model(lm_mode=lm_mode, encoder_kind=encoder_kind)
    ckpt = make_model(lm_mode=lm_mode, encoder_kind=encoder_kind)
    for module in (plain.adapter, ckpt.adapter):  # the tiny config has no dropout: give the recompute some
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.2
    enable_activation_checkpointing(ckpt)
    counter = CallCounter(_watched(ckpt))
    for text_only in (False, True):
        batch = _batch(plain, audio, text_only)
        want, want_g = _step(plain, batch)
        got, got_g = _step(ckpt, batch)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert got_g.keys() == want_g.keys()
        for n in want_g:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-5, msg=n)
        if text_only and lm_mode == "frozen":
            assert not want_g and not got_g  # nothing trains on a text batch: no backward, and no crash
        else:
            assert any(n.startswith("lm." if text_only else "adapter.") for n in got_g)
        if not text_only:  # each part ran twice: the forward and its recompute in the backward
            assert counter.calls == {"lm": 2, "encoder": 2, "adapter": 2}, counter.calls
    before = dict(counter.calls)
    with torch.no_grad():  # no backward to come: each part runs once
        ckpt.eval()(**_batch(plain, audio))
    assert counter.calls == {k: v + 1 for k, v in before.items()}
