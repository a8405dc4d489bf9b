"""The memory plan `jobs.train --check` prints (jobs/training/memory_plan.py): on the paper's 3B model (built on the
meta device, nothing downloaded) it says which GPUs an 8k-position batch fits with and without activation
checkpointing; on a small model it agrees with a measured CPU training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_ops.schema import conversation_to_cut
from data_ops.shards import ShardWriter
from models.conversation import AudioPart, Conversation, TextPart, Turn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    import numpy as np

    with ShardWriter(str(root), progress=False) as w:
        w.write("text", [conversation_to_cut(Conversation([Turn.text("user", "hi"), Turn.text("assistant", "hello")]),
                                             cut_id="t0", data_type="text", task="text", langs=["en"])])
        audio = np.zeros(8000, np.float32)
        w.write("asr_ast", [conversation_to_cut(
            Conversation([Turn("user", [AudioPart(audio), TextPart("Transcribe.")]), Turn.text("assistant", "a")]),
            cut_id="a0", data_type="asr_ast", task="asr", langs=["en"])])
    return str(root)


def _paper_recipe(corpus: str, tmp_path: Path, budget: dict | None = None, **train) -> Path:
    """jobs/recipes/vtblender_3b.yaml's model, precision and workers (no checkpoints: random init on the meta
    device has the same shapes), over local corpora, its speech batches capped at 2048 positions: 4 x 2048 = 8192."""
    paper = yaml.safe_load((ROOT / "jobs/recipes/vtblender_3b.yaml").read_text())
    recipe = {"run": {"name": "paper", "storage_path": str(tmp_path / "runs")},
              "model": {"size": "vtblender_3b", "lm_mode": "lora"},
              "data": {"sources": {"text": {"uris": [corpus], "ratio": 0.25, "batch_size": 1},
                                   "asr_ast": {"uris": [corpus], "ratio": 0.75, "batch_size": 4, **(budget or {})}},
                       "max_sample_audio_s": 160.0, "max_sample_tokens": 2048},
              "train": {k: paper["train"][k] for k in ("max_steps", "precision", "strategy", "num_workers",
                                                        "use_gpu")} | train}
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _memory_plan(recipe):
    """The run's memory plan as `jobs.train --check` makes it: from the resolved recipe, its manifests read."""
    from jobs.training.memory_plan import run_memory_plan
    from jobs.training.plan import resolve
    from jobs.training.preflight import check_data

    plan = resolve(recipe)
    return run_memory_plan(plan.with_manifests(check_data(plan).manifests))


def test_check_prints_the_papers_plan_an_8k_batch_needs_checkpointing_on_80gb(corpus, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(_paper_recipe(corpus, tmp_path)),
                          "--check"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = out.stdout[out.stdout.index("memory plan per worker"):]
    assert "bf16 autocast" in plan and "ddp x 8" in plan
    assert "asr_ast: 4 x 2048 positions, 160 s audio" in plan
    rows = {line.split("  ")[1].strip(): line for line in plan.splitlines() if line.startswith("  peak")}
    off = next(v for k, v in rows.items() if "checkpointing off" in k)
    on = next(v for k, v in rows.items() if "checkpointing on" in k)
    assert "80 GB" not in off and "141 GB" in off, plan  # ~99 GiB: out of memory on an 80 GB GPU
    assert "48 GB, 80 GB, 141 GB" in on, plan  # ~42 GiB with checkpointing and the answer-only loss
    assert "host RAM per worker" in plan


def test_the_papers_fixed_memory_matches_the_gpu_readiness_estimates(corpus, tmp_path):
    from jobs.recipe import load_recipe
    from jobs.training.memory_plan import GIB

    plan, _ = _memory_plan(load_recipe(_paper_recipe(corpus, tmp_path)))
    fixed = {k: v / GIB for k, v in plan.fixed.items()}
    # docs' estimate (Gemma 2B + 609M encoder, DDP, bf16 autocast over fp32 weights): weights ~12.8 GB, grads
    # ~2.8 GB, buckets ~2.8 GB, Adam ~5.6 GB (decimal GB; these are GiB); the training job now holds the frozen
    # LM in bf16: 2 bytes less for each of its ~2.5G weights
    assert fixed["weights"] == pytest.approx((12.8e9 - 2 * 2.506e9) / GIB, rel=0.05)
    assert fixed["gradients"] == fixed["ddp buckets"] == pytest.approx(2.8e9 / GIB, rel=0.05)
    assert fixed["optimizer"] == pytest.approx(5.6e9 / GIB, rel=0.05)
    # the text batch: 1 x 2048 positions, much less than the speech batch
    assert plan.batches["text"]["off"] < plan.batches["asr_ast"]["off"] / 3

    # FSDP over 16 workers vs hybrid sharding in groups of 8 (two nodes): a worker holds 1/16 vs 1/8 of the state
    sharded = {}
    for shard_size in (None, 8):
        path = _paper_recipe(corpus, tmp_path, strategy="fsdp", num_workers=16, fsdp_shard_size=shard_size)
        sharded[shard_size], table = _memory_plan(load_recipe(path))
    assert "hsdp (shards of 8)" in table
    for k in ("weights", "gradients", "optimizer"):
        assert sharded[8].fixed[k] == pytest.approx(2 * sharded[None].fixed[k])


def test_a_batch_budget_is_the_plans_largest_batch(corpus, tmp_path):
    """The paper's 4 x 2048 speech batch under a 4096-position budget: at most 2 of the longest samples, so the LM's
    activations halve (the encoder's bound: 4096 audio positions, 2.048 clips of 160 s = 2000); an audio budget of 200 s bounds the encoder's clips (160 s each: 1.25 of them), not the LM's."""
    from jobs.recipe import load_recipe
    from jobs.training.memory_plan import describe_plan, run_mode

    plain, _ = _memory_plan(load_recipe(_paper_recipe(corpus, tmp_path)))
    tokens, table = _memory_plan(load_recipe(_paper_recipe(corpus, tmp_path, {"max_batch_tokens": 4096})))
    shape = tokens.batches["asr_ast"]["shape"]
    assert (shape.batch_size, shape.positions, shape.audio_batch) == (2, 2048, 2.048)
    assert "asr_ast: 2 x 2048 positions, 160 s audio" in table
    lm = lambda p: p.batches["asr_ast"]["act_off"]["lm"]  # noqa: E731
    assert lm(tokens) == pytest.approx(lm(plain) / 2, rel=1e-9)
    assert tokens.peak(False) < plain.peak(False)
    audio, _ = _memory_plan(load_recipe(_paper_recipe(corpus, tmp_path, {"max_batch_audio_s": 200.0})))
    shape = audio.batches["asr_ast"]["shape"]
    assert (shape.batch_size, shape.audio_batch) == (4, 1.25)
    assert audio.batches["asr_ast"]["act_off"]["lm"] == plain.batches["asr_ast"]["act_off"]["lm"]
    assert audio.batches["asr_ast"]["act_off"]["encoder"] < plain.batches["asr_ast"]["act_off"]["encoder"]
    mode = run_mode(load_recipe(_paper_recipe(corpus, tmp_path)).train)
    assert "(1.25 clips in the encoder: budget)" in describe_plan(audio, mode, "ddp", 8, False)


def test_plan_is_within_25_percent_of_a_measured_training_step():
    # the benchmark's measurement of one size, in a fresh process (see bench/memory_plan.py for how and why)
    out = subprocess.run([sys.executable, "-m", "bench.memory_plan", "--one", "mini", "--seconds", "10"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["activations_mib"] > r["fixed_mib"] / 2  # the batch is a real part of what is compared
    assert r["plan_mib"] == pytest.approx(r["measured_mib"], rel=0.25), r
