"""The recipe is resolved once, by the driver, into the run's plan; everything after reads the plan: the pre-launch
checks, the offline tokenizer, the memory plan, and what each worker builds and streams. Counted here by wrapping
the derivations (each model config, the fingerprint) and the manifest reader in this process."""

from __future__ import annotations

import pytest

from data_ops.schema import conversation_to_cut
from data_ops.shards import ShardWriter
from jobs.recipe import ModelSection, Recipe, parse_recipe
from models.conversation import AudioPart, Conversation, TextPart, Turn


def _corpus(root, pcm_audio) -> str:
    with ShardWriter(str(root), shard_size=2, progress=False) as w:
        w.write("text", [conversation_to_cut(Conversation([Turn.text("user", f"q{i}"), Turn.text("assistant", "a")]),
                                             cut_id=f"t{i}", data_type="text", task="text", langs=["en"])
                         for i in range(3)])
        w.write("asr_ast", [conversation_to_cut(
            Conversation([Turn("user", [AudioPart(pcm_audio(0.3, i)), TextPart("T.")]), Turn.text("assistant", "a")]),
            cut_id=f"a{i}", data_type="asr_ast", task="asr", langs=["en"]) for i in range(3)])
    return str(root)


def _two_stage(corpus: str, tmp_path) -> Recipe:
    return parse_recipe({
        "run": {"name": "plan", "storage_path": str(tmp_path / "runs"), "seed": 5},
        "model": {"size": "tiny", "lm_mode": "lora"},
        "data": {"sources": {"text": {"uris": [corpus], "ratio": 0.5, "batch_size": 2},
                             "asr_ast": {"uris": [corpus], "ratio": 0.5, "batch_size": 3}}},
        "train": {"max_steps": 6, "lr": 1e-3, "encoder_lr": 1e-4},
        "stages": [{"name": "warm", "max_steps": 2, "lm_mode": "frozen", "ratios": {"text": 0.0, "asr_ast": 1.0},
                    "batch_sizes": {"asr_ast": 1}},
                   {"name": "joint", "max_steps": 4, "lr": 2e-3}]})


@pytest.fixture
def counted(monkeypatch):
    """Calls of each derivation and manifest read made in this process while the test runs."""
    import data_ops.shar_datasource
    import data_ops.shards

    counts = {"model configs": 0, "fingerprints": 0, "manifest reads": 0}

    def wrap(owner, name, key):
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, counting)
        return counting

    wrap(ModelSection, "speechlm_config", "model configs")
    wrap(Recipe, "training_fingerprint", "fingerprints")
    reader = wrap(data_ops.shards, "read_manifest", "manifest reads")
    monkeypatch.setattr(data_ops.shar_datasource, "read_manifest", reader)
    return counts


def test_each_derivation_is_made_once_by_the_driver_and_never_below_it(tmp_path, pcm_audio, counted, monkeypatch):
    from jobs.training.memory_plan import run_memory_plan
    from jobs.training.plan import resolve
    from jobs.training.preflight import check_report, check_run, tokenizer_files_for
    from jobs.training.sft import WorkerJob, build_model, content_monitor, open_streams

    recipe = _two_stage(_corpus(tmp_path / "corpus", pcm_audio), tmp_path)
    plan = resolve(recipe)
    assert counted == {"model configs": 2, "fingerprints": 1, "manifest reads": 0}  # one config per stage
    plan, _ = check_run(plan)
    files = tokenizer_files_for(plan)
    run_memory_plan(plan)
    assert counted == {"model configs": 2, "fingerprints": 1, "manifest reads": 1}  # one corpus, read once

    # below the driver: nothing is derived from the recipe again (each call would now fail)
    def derived_again(*_, **__):
        raise AssertionError("derived from the recipe below the driver")
    monkeypatch.setattr(ModelSection, "speechlm_config", derived_again)
    monkeypatch.setattr(Recipe, "training_fingerprint", derived_again)
    for stage in plan.stages:
        job = WorkerJob(plan, stage, files, tracking_uri="", mlflow_run_id="")
        model = build_model(plan, stage, files)
        assert model.config == stage.model
        streams = open_streams(plan, stage, 0, 1, model.processor)
        for stream in streams.values():
            stream.open_rows = lambda reads: (row for r in reads for row in r.rows())  # in-process, no Ray
            assert len(stream.next_batch()) == stage.batch_sizes[stream.data_type]
        content_monitor(job, 0, sharded=False)
    assert counted["manifest reads"] == 1  # the streams and the content probe read the plan's manifests

    # what each stage got: the stage's model, ratios, batch sizes, lrs, step range, run folder
    warm, joint = plan.stages
    assert (warm.model.lm.mode, joint.model.lm.mode) == ("frozen", "lora")
    assert warm.ratios == {"text": 0.0, "asr_ast": 1.0} and joint.ratios == {"text": 0.5, "asr_ast": 0.5}
    assert warm.batch_sizes == {"text": 2, "asr_ast": 1} and joint.batch_sizes == {"text": 2, "asr_ast": 3}
    assert warm.module_lrs == {"encoder": 1e-4, "adapter": 1e-3, "lm": 1e-3} and warm.lr == 1e-3
    assert joint.module_lrs == {"encoder": 2e-3, "adapter": 2e-3, "lm": 2e-3} and joint.lr == 2e-3
    assert [(s.step_offset, s.final, s.run_folder, s.metric_prefix) for s in plan.stages] == [
        (0, False, "plan-warm", "warm/"), (2, True, "plan-joint", "joint/")]
    assert sorted(open_streams(plan, warm, 0, 1)) == ["asr_ast"]  # a type the stage does not sample is not opened
    assert plan.first_speech_stage == 0 and plan.gate and plan.offline_tokenizer

    # `jobs.train --check` makes the same checks on its own plan
    monkeypatch.undo()
    assert "memory plan per worker" in check_report(resolve(recipe))


def test_the_plan_keeps_the_fingerprint_runs_were_tagged_with(tmp_path):
    """Paths are made absolute before the fingerprint is taken (workers run elsewhere), as they always were: a run
    checkpointed before the plan existed resumes under it."""
    from jobs.training.plan import resolve

    recipe = _two_stage("relative/corpus", tmp_path)
    plan = resolve(recipe)
    assert plan.data.sources["text"].uris[0].startswith("/") and plan.data.sources["text"].uris[0].endswith(
        "relative/corpus")
    absolute = parse_recipe({**recipe.model_dump(mode="json"), "data": plan.data.model_dump(mode="json"),
                             "run": plan.run.model_dump(mode="json")})
    assert plan.fingerprint == absolute.training_fingerprint() != recipe.training_fingerprint()
