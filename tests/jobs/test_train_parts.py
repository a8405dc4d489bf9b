"""Training components that run without a cluster: schedule, optimizer groups, clipping, the step, checkpoint
round trip, stage hand-over, the prefetched micro-batches, the offline tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.recipe import parse_recipe
from jobs.training.checkpoint import (STATE, TrainState, is_sharded_checkpoint, load_checkpoint, load_initial_weights,
                                      save_checkpoint)
from jobs.training.optim import build_scheduler, clip_gradients, module_param_groups
from jobs.training.plan import resolve
from jobs.training.sft import build_model
from jobs.training.tokenizer import tokenizer_files as write_tokenizer_files


def _lrs(sched, steps):
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_the_floor_per_group():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    sched = build_scheduler(opt, warmup_steps=10, total_steps=110, schedule="cosine", min_lr_ratio=0.1)
    lrs = _lrs(sched, 111)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half-way through the decay
    assert lrs[110] == pytest.approx(0.1) and min(lrs[10:]) == pytest.approx(0.1)
    assert sched.get_last_lr()[1] == pytest.approx(0.1 * sched.get_last_lr()[0])  # each group from its own peak
    const = build_scheduler(torch.optim.SGD([p], lr=1.0), warmup_steps=2, total_steps=10, schedule="constant")
    assert _lrs(const, 8)[2:] == [1.0] * 6


def _recipe(lm_mode, **train):
    return parse_recipe({"run": {"name": "t"}, "model": {"size": "tiny", "lm_mode": lm_mode},
                         "data": {"sources": {"text": {"uris": ["x"], "ratio": 1.0, "batch_size": 1}}},
                         "train": {"max_steps": 5, **train}})


def _first_stage_model(recipe, tokenizer_files):
    plan = resolve(recipe)
    return build_model(plan, plan.stages[0], tokenizer_files)


def test_each_module_trains_at_its_own_lr(tokenizer):
    recipe = _recipe("lora", lr=2e-3, encoder_lr=1e-4)
    model = _first_stage_model(recipe, write_tokenizer_files(tokenizer))
    groups = {g["name"]: g for g in module_param_groups(model, recipe.train.module_lrs())}
    assert {n: g["lr"] for n, g in groups.items()} == {"encoder": 1e-4, "adapter": 2e-3, "lm": 2e-3}
    assert {id(p) for p in groups["encoder"]["params"]} == {id(p) for p in model.encoder.parameters()}
    assert all("lora_" in n for n, p in model.lm.named_parameters() if any(p is q for q in groups["lm"]["params"]))
    frozen = _recipe("frozen")  # a frozen LM has no group at all
    model = _first_stage_model(frozen, write_tokenizer_files(tokenizer))
    assert [g["name"] for g in module_param_groups(model, frozen.train.module_lrs())] == ["encoder", "adapter"]


@pytest.mark.parametrize("clip", ["global", "per_module"])
def test_a_burst_in_one_module_shrinks_the_others_only_under_global_clipping(clip):
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([{"name": "encoder", "params": [a]}, {"name": "lm", "params": [b]}], lr=1.0)
    a.grad, b.grad = torch.full((4,), 100.0), torch.full((4,), 0.25)  # norms 200 and 0.5
    clip_gradients(opt, 1.0, clip)
    assert float(a.grad.norm()) == pytest.approx(1.0 if clip == "per_module" else 200 / (200**2 + 0.25) ** 0.5)
    assert float(b.grad.norm()) == pytest.approx(0.5 if clip == "per_module" else 0.5 / (200**2 + 0.25) ** 0.5)


@pytest.mark.parametrize("sharded", [False, True], ids=["whole", "sharded"])
def test_checkpoint_round_trip_restores_weights_optimizer_and_state(tmp_path, tokenizer, sharded):
    """Both layouts (the sharded one is FSDP's, torch distributed checkpoint; here written by one process)."""
    files = write_tokenizer_files(tokenizer)
    recipe = _recipe("full")  # tied embeddings train: the case safetensors refuses without a copy
    a = _first_stage_model(recipe, files)
    opt = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-2)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=5, schedule="cosine")
    for _ in range(2):
        loss = sum(p.float().pow(2).mean() for p in a.parameters() if p.requires_grad)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    save_checkpoint(tmp_path, a, opt, TrainState(step=2, stage="main", scheduler=sched.state_dict(),
                                                 streams=[{"text": {"epoch": 1}}], rng=[{"cpu": [1, 2], "cuda": None}]), is_rank0=True,
                    sharded=sharded)
    assert is_sharded_checkpoint(tmp_path) == sharded
    b = _first_stage_model(recipe, files)
    opt_b = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-2)
    sched_b = build_scheduler(opt_b, warmup_steps=2, total_steps=5, schedule="cosine")
    state = load_checkpoint(tmp_path, b, opt_b, sched_b)
    assert state.step == 2 and state.streams == [{"text": {"epoch": 1}}] and state.rng == [{"cpu": [1, 2], "cuda": None}]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert sched_b.last_epoch == 2 and sched_b.get_last_lr() == sched.get_last_lr()
    sa, sb = opt.state_dict()["state"], opt_b.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert json.loads((tmp_path / STATE).read_text())["step"] == 2


@pytest.mark.parametrize("sharded", [False, True], ids=["whole", "sharded"])
def test_next_stage_starts_from_previous_stage_weights(tmp_path, tokenizer, sharded):
    """B3 / the tiny recipe: stage 1's (full or frozen-LM) weights start stage 2's LoRA model, PEFT names or not,
    from either checkpoint layout."""
    files = write_tokenizer_files(tokenizer)
    full = _first_stage_model(_recipe("full"), files)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.5)
    opt = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, full, opt, TrainState(1, "s1", sched.state_dict(), [{}], [[0]]), True, sharded=sharded)
    lora = _first_stage_model(_recipe("lora"), files)
    assert len(load_initial_weights(lora, tmp_path)) > 0
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
    from jobs.training.preflight import tokenizer_files_for
    from jobs.training.tokenizer import load_tokenizer as load_tokenizer_files
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
    tokenizer = load_tokenizer_files(tokenizer_files_for(resolve(recipe)))
    assert tokenizer.tokenize(" Ludovica mercredi") == ["ĠLudovica", "Ġmercredi"]


def test_a_step_over_accumulated_micro_batches_equals_one_step_over_their_union():
    from jobs.training.loop import Trainer

    class Regress(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(3, 1)

        def forward(self, x, y):
            return (self.w(x) - y).pow(2).mean()

    x, y = torch.randn(8, 3), torch.randn(8, 1)
    losses = []
    models = []
    for micro in ([{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}], [{"x": x, "y": y}]):
        torch.manual_seed(0)
        m = Regress()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        t = Trainer(m, opt, build_scheduler(opt, warmup_steps=0, total_steps=1, schedule="constant"),
                    grad_accum=len(micro), max_grad_norm=None)
        losses.append(float(t.train_step(micro)))
        models.append(m)
        assert t.step == 1
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(models[0].w.weight, models[1].w.weight)


def _text_corpus(path, n):
    from data_ops.schema import conversation_to_cut
    from data_ops.shards import ShardWriter
    from models.conversation import Conversation, Turn

    with ShardWriter(str(path), shard_size=7, progress=False) as w:
        w.write("text", [conversation_to_cut(Conversation([Turn.text("user", f"q{i}"), Turn.text("assistant", f"a{i}")]),
                                             cut_id=f"t{i}", data_type="text", task="text", langs=["en"])
                         for i in range(n)])
    return str(path)


def test_prefetched_batches_checkpoint_what_training_took_not_what_was_read_ahead(tmp_path):
    """The thread reads ahead; a checkpoint taken after 3 batches resumes at the 4th, not after the read-ahead."""
    import time

    from data_ops.mix_sampler import TypeStream
    from jobs.training.batches import BatchPrefetcher

    corpus = _text_corpus(tmp_path / "corpus", 40)
    stream = TypeStream([corpus], "text", 2, seed=0, bucket_batches=1)
    prefetch = BatchPrefetcher({"text": stream}, lambda step, micro: "text",
                               lambda rows: {"attention_mask": torch.ones(len(rows), 2)}, start_step=0, grad_accum=1,
                               depth=3)
    taken = [prefetch.next() for _ in range(3)]
    time.sleep(0.5)  # the thread fills its queue: 3 more batches read
    assert [mb.step for mb in taken] == [0, 1, 2]
    state = prefetch.consumed["text"]
    fourth = prefetch.next()
    prefetch.close()
    resumed = TypeStream([corpus], "text", 2, seed=0, bucket_batches=1)
    resumed.load_state_dict(state)
    assert [r["id"] for r in resumed.next_batch()] == [r["id"] for r in fourth.rows]
    seen = [r["id"] for mb in taken for r in mb.rows]
    assert len(set(seen)) == 6


def test_an_error_in_the_data_thread_reaches_the_training_loop(tmp_path):
    from data_ops.mix_sampler import TypeStream
    from jobs.training.batches import BatchPrefetcher

    stream = TypeStream([_text_corpus(tmp_path / "corpus", 4)], "text", 2, seed=0, bucket_batches=1)

    def broken(rows):
        raise ValueError("cannot tensorize")

    prefetch = BatchPrefetcher({"text": stream}, lambda step, micro: "text", broken, start_step=0, grad_accum=1)
    with pytest.raises(ValueError, match="cannot tensorize"):
        prefetch.next()
    prefetch.close()


def test_content_monitor_warns_once_after_warmup_when_the_audio_path_is_dead(make_model, audio):
    from jobs.common.content import ContentMonitor
    from models.conversation import AudioPart, Conversation, TextPart, Turn

    model = make_model()
    with torch.no_grad():  # the adapter outputs zeros whatever it hears: no content can reach the LM
        model.adapter.proj_out.weight.zero_()
        model.adapter.proj_out.bias.zero_()
    probe = [Conversation([Turn("user", [AudioPart(audio(0.5 + 0.1 * i, seed=i)), TextPart("Transcribe.")]),
                           Turn.text("assistant", text)]) for i, text in enumerate(["hello world", "the answer"])]
    lines = []
    monitor = ContentMonitor(probe, warmup_steps=10, log=lines.append)
    metrics = [monitor(model, step) for step in (5, 20, 40)]
    assert all(m["speech/content_gap"] == pytest.approx(0.0, abs=1e-6) for m in metrics)
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(lines) == 4 and len(warnings) == 1 and lines.index(warnings[0]) == 2  # at step 20, not 5, not again


def test_a_checkpoint_of_another_recipe_is_refused_not_resumed():
    """A run folder reused under the same run name after the recipe changed must not resume the old training."""
    from jobs.recipe import load_recipe
    from jobs.training.checkpoint import CheckpointMismatch, TrainState, check_same_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "jobs/recipes/mini/joint.yaml")
    fp = recipe.training_fingerprint()
    moved = recipe.model_copy(deep=True)  # stored and tracked elsewhere, another endpoint: the same training
    moved.run.storage_path, moved.run.tracking_uri, moved.data.endpoint_url = "s3://b/runs", "http://127.0.0.1:1", "x"
    moved.train.activation_checkpointing = True  # memory, not weights: a run out of memory resumes with it on
    assert moved.training_fingerprint() == fp
    changed = recipe.model_copy(deep=True)
    changed.data.sources["mixed_modal"].ratio = 0.5
    reseeded = recipe.model_copy(deep=True)
    reseeded.run.seed = 7
    assert len({fp, changed.training_fingerprint(), reseeded.training_fingerprint()}) == 3

    state = TrainState(step=1000, stage="main", scheduler={}, recipe=fp)
    check_same_recipe(state, fp, "runs/x/checkpoint_1")  # the same recipe continues
    check_same_recipe(TrainState(step=1, stage="main", scheduler={}), fp, "old")  # older checkpoints carry none
    with pytest.raises(CheckpointMismatch, match="runs/x/checkpoint_1 holds a checkpoint of another recipe"):
        check_same_recipe(state, changed.training_fingerprint(), "runs/x/checkpoint_1")
    assert TrainState.from_json(state.to_json()).recipe == fp


def test_the_driver_refuses_another_recipes_run_folder_before_any_worker(tmp_path):
    """`run_training` looks at the newest checkpoint of each stage's run folder before it touches MLflow or starts
    a worker: a clear refusal at once instead of Ray Train retrying a worker that cannot pass."""
    from jobs.recipe import load_recipe
    from jobs.training.checkpoint import STATE, CheckpointMismatch, TrainState
    from jobs.training.preflight import check_resumable

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "jobs/recipes/mini/b3_two_stage.yaml")
    other = recipe.model_copy(deep=True)
    other.run.seed = 7
    plan, other = resolve(recipe), resolve(other)

    def checkpoint(folder: str, name: str, fingerprint: str | None) -> None:
        path = tmp_path / folder / name
        path.mkdir(parents=True)
        if fingerprint is not None:  # None: a checkpoint whose write was cut short
            (path / STATE).write_text(TrainState(step=1, stage="x", scheduler={}, recipe=fingerprint).to_json())

    check_resumable(plan, str(tmp_path), None)  # nothing there yet
    stage_folders = [f"{recipe.run.name}-{st.name}" for st in recipe.stage_list()]
    assert [st.run_folder for st in plan.stages] == stage_folders
    checkpoint(stage_folders[0], "checkpoint_2026-01-01_00-00-00.000001", other.fingerprint)
    checkpoint(stage_folders[0], "checkpoint_2026-01-01_00-00-01.000001", plan.fingerprint)
    checkpoint(stage_folders[0], "checkpoint_2026-01-01_00-00-02.000001", None)
    check_resumable(plan, str(tmp_path), None)  # the newest complete checkpoint is this recipe's
    checkpoint(stage_folders[1], "checkpoint_2026-01-01_00-00-03.000001", other.fingerprint)
    with pytest.raises(CheckpointMismatch, match=f"{stage_folders[1]}/checkpoint_2026-01-01_00-00-03"):
        check_resumable(plan, str(tmp_path), None)


def test_a_changed_recipe_under_an_old_run_name_gets_its_own_mlflow_run(tmp_path):
    """The MLflow run is found again by run name and recipe fingerprint: a resubmission continues it; the same name
    with another recipe (its run folder deleted to start again) gets a new run, whose params are its own."""
    from jobs.recipe import load_recipe
    from jobs.training.ray_run import mlflow_run_for
    from tracking.client import client_for

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "jobs/recipes/mini/joint.yaml")
    changed = recipe.model_copy(deep=True)
    changed.train.lr = 5.0e-4
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe, changed = resolve(recipe), resolve(changed)
    first = mlflow_run_for(recipe, tracking, {})
    assert mlflow_run_for(recipe, tracking, {}) == first  # a resubmission of the same training
    other = mlflow_run_for(changed, tracking, {})
    assert other != first
    client = client_for(tracking)
    assert [client.get_run(r).data.params["train.lr"] for r in (first, other)] == ["0.001", "0.0005"]
    assert mlflow_run_for(changed, tracking, {}) == other
