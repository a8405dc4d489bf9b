"""Pieces of the training job that run without a cluster: schedule, checkpoint round trip, stage hand-over."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.recipe import parse_recipe
from jobs.train import (CKPT_STATE, build_model, load_checkpoint, load_initial_weights, lr_lambda, save_checkpoint,
                        write_tokenizer_files)


def test_warmup_then_cosine():
    f = lr_lambda(warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half-way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert lr_lambda(0, 10, "constant", 0.0)(7) == 1.0


def _recipe(lm_mode):
    return parse_recipe({"run": {"name": "t"}, "model": {"size": "tiny", "lm_mode": lm_mode},
                         "data": {"sources": {"text": {"uris": ["x"], "ratio": 1.0, "batch_size": 1}}},
                         "train": {"max_steps": 5}})


def test_checkpoint_round_trip_restores_weights_optimizer_and_state(tmp_path, tokenizer):
    files = write_tokenizer_files(tokenizer)
    recipe = _recipe("full")  # tied embeddings train: the case safetensors refuses without a copy
    a = build_model(recipe, recipe.stage_list()[0], files)
    opt = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(2, 5, "cosine", 0.0))
    for _ in range(2):
        loss = sum(p.float().pow(2).mean() for p in a.parameters() if p.requires_grad)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    save_checkpoint(tmp_path, a, opt, sched, step=2, stage="main", stream_states=[{"text": {"epoch": 1}}],
                    rng_states=[[1, 2]], is_rank0=True)
    b = build_model(recipe, recipe.stage_list()[0], files)
    opt_b = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-2)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lr_lambda(2, 5, "cosine", 0.0))
    state = load_checkpoint(tmp_path, b, opt_b, sched_b)
    assert state["step"] == 2 and state["streams"] == [{"text": {"epoch": 1}}]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert sched_b.last_epoch == 2 and sched_b.get_last_lr() == sched.get_last_lr()
    sa, sb = opt.state_dict()["state"], opt_b.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert "step" in json.loads((tmp_path / CKPT_STATE).read_text())


def test_next_stage_starts_from_previous_stage_weights(tmp_path, tokenizer):
    """B3 / the tiny recipe: stage 1's (full or frozen-LM) weights start stage 2's LoRA model, PEFT names or not."""
    files = write_tokenizer_files(tokenizer)
    full = build_model(_recipe("full"), _recipe("full").stage_list()[0], files)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.5)
    opt = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, full, opt, sched, 1, "s1", [{}], [[0]], True)
    lora = build_model(_recipe("lora"), _recipe("lora").stage_list()[0], files)
    assert load_initial_weights(lora, tmp_path) > 0
    base = dict(full.lm.named_parameters())
    for name, p in lora.lm.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p, base[plain]), name
    for (n, p), (_, q) in zip(lora.encoder.named_parameters(), full.encoder.named_parameters()):
        assert torch.equal(p, q), n
