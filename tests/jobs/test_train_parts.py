"""Pieces of the training job that run without a cluster: schedule, checkpoint round trip, stage hand-over."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.recipe import parse_recipe
from jobs.train import (CKPT_STATE, build_model, clip_gradients, load_checkpoint, load_initial_weights, lr_lambda,
                        module_param_groups, save_checkpoint, write_tokenizer_files)


def test_warmup_then_cosine():
    f = lr_lambda(warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half-way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert lr_lambda(0, 10, "constant", 0.0)(7) == 1.0


def _recipe(lm_mode, **train):
    return parse_recipe({"run": {"name": "t"}, "model": {"size": "tiny", "lm_mode": lm_mode},
                         "data": {"sources": {"text": {"uris": ["x"], "ratio": 1.0, "batch_size": 1}}},
                         "train": {"max_steps": 5, **train}})


def test_each_module_trains_at_its_own_lr(tokenizer):
    recipe = _recipe("lora", lr=2e-3, encoder_lr=1e-4)
    model = build_model(recipe, recipe.stage_list()[0], write_tokenizer_files(tokenizer))
    groups = {g["name"]: g for g in module_param_groups(model, recipe.train)}
    assert {n: g["lr"] for n, g in groups.items()} == {"encoder": 1e-4, "adapter": 2e-3, "lm": 2e-3}
    assert {id(p) for p in groups["encoder"]["params"]} == {id(p) for p in model.encoder.parameters()}
    assert all("lora_" in n for n, p in model.lm.named_parameters() if any(p is q for q in groups["lm"]["params"]))
    frozen = _recipe("frozen")  # a frozen LM has no group at all
    model = build_model(frozen, frozen.stage_list()[0], write_tokenizer_files(tokenizer))
    assert [g["name"] for g in module_param_groups(model, frozen.train)] == ["encoder", "adapter"]


@pytest.mark.parametrize("clip", ["global", "per_module"])
def test_a_burst_in_one_module_shrinks_the_others_only_under_global_clipping(clip):
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([{"name": "encoder", "params": [a]}, {"name": "lm", "params": [b]}], lr=1.0)
    a.grad, b.grad = torch.full((4,), 100.0), torch.full((4,), 0.25)  # norms 200 and 0.5
    clip_gradients(opt, _recipe("lora", clip=clip, max_grad_norm=1.0).train)
    assert float(a.grad.norm()) == pytest.approx(1.0 if clip == "per_module" else 200 / (200**2 + 0.25) ** 0.5)
    assert float(b.grad.norm()) == pytest.approx(0.5 if clip == "per_module" else 0.5 / (200**2 + 0.25) ** 0.5)


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


def test_offline_tokenizer_covers_every_type_of_the_corpus_not_only_the_sampled_ones(tmp_path):
    """A text-only recipe (the ablation's text LM) still gets whole-word tokens for the transcripts its LM will
    later be trained to write; otherwise transcription becomes spelling."""
    import numpy as np

    from data_ops.schema import conversation_to_cut
    from data_ops.shards import ShardWriter
    from jobs.train import load_tokenizer_files, tokenizer_files_for
    from models.conversation import AudioPart, Conversation, TextPart, Turn

    words = "Aujourd'hui c'est mercredi et Ludovica arrive"
    with ShardWriter(str(tmp_path / "corpus"), shard_size=50, progress=False) as w:
        w.write("text", [conversation_to_cut(Conversation([Turn.text("user", f"What is {i} plus 1?"),
                                                           Turn.text("assistant", f"{i} plus 1 is {i + 1}.")]),
                                             cut_id=f"t{i}", data_type="text", task="text", langs=["en"])
                         for i in range(20)])
        w.write("asr_ast", [conversation_to_cut(Conversation([
            Turn("user", [AudioPart(np.zeros(1600, dtype=np.float32)), TextPart("Transcribe.")]),
            Turn.text("assistant", words)]), cut_id=f"a{i}", data_type="asr_ast", task="asr", langs=["fr"])
            for i in range(20)])
    recipe = parse_recipe({"run": {"name": "t"}, "model": {"size": "tiny", "lm_mode": "full"},
                           "data": {"sources": {"text": {"uris": [str(tmp_path / "corpus")], "ratio": 1.0,
                                                         "batch_size": 1}}}, "train": {"max_steps": 5}})
    tokenizer = load_tokenizer_files(tokenizer_files_for(recipe))
    assert tokenizer.tokenize(" Ludovica mercredi") == ["ĠLudovica", "Ġmercredi"]
