"""Model FLOPs for MFU: the LM's count equals a hand computation for a small config, the speech path's curve
predicts a direct count, a batch's training FLOPs follow from its lengths, and measuring changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.training.flops import count_forward_flops, flop_counter, peak_flops_per_s
from models.config import tiny
from models.conversation import AudioPart, Conversation, TextPart, Turn
from models.speechlm import build_speechlm
from models.tokenizer import build_tiny_tokenizer


def _hand_lm_forward_flops(cfg, vocab: int, positions: int, lora_r: int | None) -> float:
    """2 FLOPs per multiply-add of every linear at every position, the LM head included; attention's QK^T and
    AV cost 2 x 2 x heads x head_dim per pair of positions (no causal discount, as torch counts it)."""
    d, ff, heads, kv, hd, layers = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                                    cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_hidden_layers"])
    linears = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, ff), (d, ff), (ff, d)]
    macs = sum(i * o for i, o in linears)
    if lora_r:  # each linear's LoRA: x A (i x r) then B (r x o)
        macs += sum(lora_r * (i + o) for i, o in linears)
    per_layer = 2 * positions * macs + 4 * heads * hd * positions ** 2
    return layers * per_layer + 2 * positions * d * vocab


@pytest.mark.parametrize("lm_mode", ["frozen", "lora"])
def test_lm_flops_equal_a_hand_computation(lm_mode):
    cfg = tiny(lm_mode)
    model = build_speechlm(cfg, tokenizer=build_tiny_tokenizer())
    flops = count_forward_flops(model)
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    r = cfg.lm.lora.r if lm_mode == "lora" else None
    for n in (17, 50, 300):
        assert flops.lm(n) == pytest.approx(_hand_lm_forward_flops(cfg.lm.config, vocab, n, r), rel=1e-9)
    assert flops.head == 2 * cfg.lm.config["hidden_size"] * vocab


def test_speech_curve_predicts_a_direct_count_and_a_batch_is_counted_from_its_lengths():
    model = build_speechlm(tiny(), tokenizer=build_tiny_tokenizer())
    model.train()
    bn = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    flops = count_forward_flops(model)
    assert model.training and all(torch.equal(bn[n], b) for n, b in model.named_buffers() if n in bn)
    counter = flop_counter()
    with torch.no_grad(), counter:
        model.encode_audio(torch.zeros(1, 40000), torch.tensor([40000]))  # 2.5 s: not one of the fitted lengths
    assert flops.speech(40000) == pytest.approx(counter.get_total_flops(), rel=0.01)

    rng = np.random.default_rng(0)
    convs = [Conversation([Turn("user", [TextPart("Listen:"), AudioPart(rng.uniform(-.3, .3, s).astype(np.float32))]),
                           Turn.text("assistant", "the answer is five")]) for s in (16000, 24000)]
    batch = model.processor(convs)
    rows = batch["attention_mask"].sum(1).tolist()
    answer = int((batch["labels"] != -100).sum())  # each answer token is predicted from the position before it
    assert 0 < answer < sum(rows) / 2
    # LoRA: the LM's base weights get no gradient (2x forward); encoder and adapter train (3x); the head runs
    # at the positions that predict an answer token only
    lm = sum(flops.lm(n) - n * flops.head for n in rows) + answer * flops.head
    want = 2 * lm + 3 * (flops.speech(16000) + flops.speech(24000))
    assert flops.train_step(batch) == pytest.approx(want)
    assert flops.train_step(batch) < 2 * (flops.lm(rows[0]) + flops.lm(rows[1])) + 3 * (
        flops.speech(16000) + flops.speech(24000))


@pytest.mark.parametrize("lm_mode,encoder_train,audio,want", [
    ("lora", True, True, {"encoder": 3, "adapter": 3, "lm": 2}),
    ("full", True, False, {"encoder": 3, "adapter": 3, "lm": 3}),
    ("frozen", True, True, {"encoder": 3, "adapter": 3, "lm": 2}),    # the gradient passes the LM to the speech path
    ("frozen", True, False, {"encoder": 3, "adapter": 3, "lm": 1}),   # a text batch: no backward at all
    ("frozen", False, True, {"encoder": 1, "adapter": 3, "lm": 2}),   # the frozen encoder: forward only
])
def test_training_flops_count_only_the_backward_the_step_does(lm_mode, encoder_train, audio, want):
    model = build_speechlm(tiny(lm_mode), tokenizer=build_tiny_tokenizer())
    model.config.encoder.train = encoder_train
    assert count_forward_flops(model).passes(with_audio=audio) == want


def test_peak_is_known_only_for_gpus_or_given():
    assert peak_flops_per_s("cpu") is None
    assert peak_flops_per_s("cpu", override_tflops=100) == 1e14
