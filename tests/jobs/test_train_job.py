"""The training job end to end on the local stack: `ray job submit` of the tiny recipe against shards on the moto
S3 endpoint, in two stages on two worker nodes, one node lost mid-run; MLflow holds the run, its metrics, artifacts
and a registered version whose logits match the trained model's; the resumed stream neither repeats nor skips
samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_ops.schema import conversation_to_cut
from data_ops.shards import ShardWriter

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _write_corpus(uri, conversations, env):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with ShardWriter(uri, shard_size=3, progress=False) as w:
            for dt in ("text", "asr_ast", "sqa", "mixed_modal"):
                w.write(dt, [conversation_to_cut(c, cut_id=cid, data_type=dt, task=dt, langs=["en"])
                             for cid, (t, c) in conversations.items() if t == dt])
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _recipe(corpus_uri, storage, name, **train):
    return {
        "run": {"name": name, "experiment": "it", "storage_path": storage, "registered_model": f"{name}-model",
                "seed": 3},
        "model": {"size": "tiny", "lm_mode": "lora"},
        "data": {"sources": {
            "text": {"uris": [corpus_uri], "ratio": 0.2, "batch_size": 2},
            "asr_ast": {"uris": [corpus_uri], "ratio": 0.5, "batch_size": 3},
            "sqa": {"uris": [corpus_uri], "ratio": 0.15, "batch_size": 2},
            "mixed_modal": {"uris": [corpus_uri], "ratio": 0.15, "batch_size": 2}},
            "bucket_batches": 2},
        "train": {"max_steps": 40, "lr": 5e-3, "warmup_steps": 2, "num_workers": 2, "checkpoint_every": 10,
                  "log_every": 5, "max_failures": 2, **train},
    }


def _worker_nodes(dashboard: str) -> dict[str, str]:
    """Alive Ray Train workers -> the name of the node each runs on."""
    from ray.util.state import list_actors, list_nodes

    names = {n.node_id: n.node_name for n in list_nodes(address=dashboard, detail=True)}
    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return {a.actor_id: names.get(a.node_id) for a in actors}


@pytest.mark.slow  # about 4 minutes: `make test-slow`, which CI runs too
def test_two_stage_run_on_two_nodes_survives_a_lost_node_and_registers(stack, ray_local, corpus_conversations,
                                                                       tmp_path):
    """A multi-node run as a cluster does it: two worker nodes (one training slot each, so the two workers are on
    different nodes), checkpoints and the stage hand-over on S3, one node lost mid-stage and replaced. Local paths
    are checked on every node before any worker starts."""
    import boto3
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from data_ops.mix_sampler import TypeStream, mix_sampler
    from jobs.recipe import RecipeError, parse_recipe
    from jobs.training.ray_run import check_paths_on_every_node
    from jobs.training.sft import probe_conversation
    from tracking.models import load_speechlm

    env = stack.env()
    _write_corpus("s3://vtb-it/corpus", corpus_conversations, env)
    recipe = _recipe("s3://vtb-it/corpus", "s3://vtb-it/runs", "it-main", resources_per_worker={"vtb_train_slot": 1})
    # B3's shape: the LM frozen, then LoRA from the first stage's weights
    recipe["stages"] = [{"name": "frozen-lm", "max_steps": 10, "lm_mode": "frozen"},
                        {"name": "lora", "max_steps": 20, "lm_mode": "lora"}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    samples = tmp_path / "samples"
    job_id = f"it-main-{int(time.time())}"
    job_env = {k: env[k] for k in env if k != "RAY_ADDRESS"} | _git_version()  # as jobs.demo submits
    added = ["a", "b"]
    for name in added:  # both start at once
        stack.add_node(name, num_cpus=2, resources={"vtb_train_slot": 1}, wait=False)
    for name in added:
        stack.wait_for_node(name)
    # every node of this one-machine cluster sees tmp_path; nowhere is there a path that does not exist
    check_paths_on_every_node([str(tmp_path)])
    with pytest.raises(RecipeError) as refused:
        check_paths_on_every_node([str(tmp_path), str(tmp_path / "only-on-my-laptop")])
    assert "the Ray cluster has 3 nodes" in str(refused.value)
    for node in ("a (", "b ("):
        assert f"{node}" in str(refused.value) and f"lacks {tmp_path / 'only-on-my-laptop'}" in str(refused.value)
    try:
        for _attempt in range(6):  # right after start-up the head's job agent may not be registered yet
            submit = subprocess.run(
                [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", stack.urls["ray"],
                 "--no-wait", "--submission-id", job_id,
                 "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
                 "python", "-m", "jobs.train", "--config", str(path), "--sample-log-dir", str(samples)],
                # a clean environment: this test process may hold a local Ray instance of its own (other tests)
                capture_output=True, text=True, timeout=120,
                env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **env})
            if "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(5)
        assert submit.returncode == 0, submit.stderr[-2000:]
        client = JobSubmissionClient(stack.urls["ray"])

        # lose the node of one worker once the second stage's first checkpoint is committed on S3, then replace it
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        lost = None
        deadline = time.time() + 420
        while time.time() < deadline and lost is None:
            status = client.get_job_status(job_id)
            assert status not in (JobStatus.FAILED, JobStatus.STOPPED), client.get_job_logs(job_id)[-3000:]
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="vtb-it", Prefix="runs/it-main-lora/")
                    .get("Contents", [])]
            # Ray Train writes its snapshot once a reported checkpoint is committed (files alone may be mid-upload)
            if any(k.endswith("checkpoint_manager_snapshot.json") for k in keys):
                nodes = _worker_nodes(stack.urls["ray"])
                if len(nodes) == 2:
                    assert sorted(nodes.values()) == ["a", "b"], nodes  # one worker per node, none on the head
                    lost = sorted(nodes.values())[-1]
                    stack.kill_node(lost)
                    added.remove(lost)
                    stack.add_node("c", num_cpus=2, resources={"vtb_train_slot": 1})
                    added.append("c")
            time.sleep(0.5)
        assert lost, "no checkpoint of the second stage appeared / no workers to find"
        while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.time() < deadline + 300, "job did not finish"
            time.sleep(2)
        logs = client.get_job_logs(job_id)
    finally:
        stack.remove_node(*added, timeout=10)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "resumed stage lora at step" in logs  # the restarted workers continued from the checkpoint
    # 30 steps from a random init: the audio path carries nothing yet, and the promotion gate says so
    assert "promotion gate FAILED: content gap" in logs and "models:/it-main-model/1 WITHOUT the alias @candidate" in logs

    # MLflow: one run with the recipe as params, decreasing loss, per-type losses, artifacts, a registered version
    tracking = env["MLFLOW_TRACKING_URI"]
    mc = MlflowClient(tracking, registry_uri=tracking)
    exp = mc.get_experiment_by_name("it")
    runs = mc.search_runs([exp.experiment_id], filter_string="tags.`vtb.run_name` = 'it-main'")
    assert len(runs) == 1, "the restart must log into the same MLflow run"
    run = runs[0]
    assert run.data.params["train.max_steps"] == "40" and run.data.params["data.sources.asr_ast.ratio"] == "0.5"
    # both stages log into the run on one step axis, each under its name
    first = {m.step: m.value for m in mc.get_metric_history(run.info.run_id, "frozen-lm/loss")}
    second = {m.step: m.value for m in mc.get_metric_history(run.info.run_id, "lora/loss")}
    assert max(first) == 10 and min(second) > 10 and max(second) == 30
    assert second[30] < first[min(first)], (first, second)
    draw = mix_sampler(parse_recipe(recipe).data.ratios, 3)
    for stage in parse_recipe(recipe).stage_list():  # each logs the loss of every type it drew (same draws: seed 3)
        logged = {k.rsplit("/", 1)[-1] for k in run.data.metrics if k.startswith(f"{stage.name}/loss/")}
        assert logged == {draw(step, 0) for step in range(stage.max_steps)}, (stage.name, logged)
    for m in ("throughput/samples_per_s", "throughput/audio_s_per_s", "throughput/tokens_per_s",
              "data/padded_share", "data/wait_share", "lora/lr", "frozen-lm/lr"):
        assert m in run.data.metrics
    artifacts = {a.path for a in mc.list_artifacts(run.info.run_id)}
    assert {"model", "probe_logits.npy"} <= artifacts
    model_files = {a.path.split("/")[-1] for a in mc.list_artifacts(run.info.run_id, "model")}
    assert {"speechlm_config.json", "encoder.safetensors", "adapter.safetensors", "lm_adapter", "tokenizer"} <= model_files
    version = mc.get_model_version("it-main-model", "1")
    assert version.run_id == run.info.run_id
    assert mc.get_registered_model("it-main-model").aliases == {}  # registered, not promoted
    assert version.tags["vtb.gate"] == "failed" and version.tags["vtb.gate.failed"] == "content_gap"
    gap = float(version.tags["vtb.gate.content_gap"].split()[2])
    assert gap < 0.3 and run.data.metrics["promote/content_gap"] == pytest.approx(gap, abs=1e-3)
    # retention has no meaning from a random-init LM: not a failure, and said so
    assert "does not apply" in version.tags["vtb.gate.text_retention"] and run.data.tags["vtb.gate"] == "failed"
    _check_lineage(mc, run, exp, corpus_conversations)

    import mlflow
    import torch

    model = load_speechlm("models:/it-main-model/1", tracking_uri=tracking)
    mlflow.set_tracking_uri(tracking)
    ref = np.load(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/probe_logits.npy",
                                                      dst_path=str(tmp_path / "probe")))
    with torch.no_grad():
        batch = model.processor([probe_conversation()])
        batch.pop("labels")  # with labels the model returns the loss, not the logits
        logits = model(**batch).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-5)

    # Samples: in each stage, for each rank, the last attempt of every step (steps after the checkpoint ran twice)
    # must equal an uninterrupted replay of the same streams: nothing seen twice within its epoch, nothing skipped.
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS")})
    parsed = parse_recipe(recipe)
    draw = mix_sampler(parsed.data.ratios, parsed.run.seed)
    reruns = {}
    for stage in parsed.stage_list():
        reruns[stage.name] = 0
        for rank in range(2):
            entries = [json.loads(x) for x in (samples / f"{stage.name}-rank{rank}.jsonl").read_text().splitlines()]
            last: dict = {}
            for e in entries:
                reruns[stage.name] += (e["step"], e["micro"]) in last
                last[(e["step"], e["micro"])] = e
            assert sorted(k[0] for k in last) == list(range(stage.max_steps)), (stage.name, rank)
            streams = {t: TypeStream(s.uris, t, s.batch_size, seed=parsed.run.seed, rank=rank, world_size=2,
                                     bucket_batches=parsed.data.bucket_batches) for t, s in parsed.data.sources.items()}
            for step in range(stage.max_steps):
                t = draw(step, 0)
                assert last[(step, 0)]["type"] == t
                assert last[(step, 0)]["ids"] == [r["id"] for r in streams[t].next_batch()], (stage.name, rank, step)
    # the node was lost after a checkpoint of the second stage: some of its steps ran twice, none of the first's
    assert reruns["lora"] > 0 and reruns["frozen-lm"] == 0, reruns


def _git_version() -> dict[str, str]:
    from jobs.demo import git_version

    return git_version()


def _check_lineage(mc, run, exp, corpus_conversations) -> None:
    """What MLflow's run page shows: FINISHED with a duration, the commit this code is at (and whether the tree
    differs from it), the corpora as training dataset inputs with their counts, the recipe; the experiment opens
    on its runs (a model-training experiment)."""
    assert run.info.status == "FINISHED" and run.info.end_time > run.info.start_time
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip() != ""
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["mlflow.source.git.dirty"] == str(dirty).lower()
    assert run.data.tags["mlflow.source.name"].startswith("python -m jobs.train --config")
    from tracking.lineage import source_digest

    assert run.data.tags["vtb.source.digest"] == source_digest()  # the uploaded working directory is this code
    inputs = {d.dataset.name.split()[0]: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"text", "asr_ast", "sqa", "mixed_modal"}
    for dtype, d in inputs.items():
        assert {t.key: t.value for t in d.tags} == {"mlflow.data.context": "training"}
        assert json.loads(d.dataset.source) == {"uris": ["s3://vtb-it/corpus"]} and len(d.dataset.digest) == 16
        expected = sum(1 for t, _ in corpus_conversations.values() if t == dtype)
        assert json.loads(d.dataset.profile)["num_cuts"] == expected, (dtype, d.dataset.profile)
    recipe = yaml.safe_load(Path(mc.download_artifacts(run.info.run_id, "recipe.yaml")).read_text())
    assert recipe["run"]["name"] == "it-main" and recipe["stages"][1]["name"] == "lora"
    assert mc.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def _submit_and_wait(stack, env, path, timeout=400) -> str:
    """`ray job submit` of jobs.train with the recipe at `path`, waiting for it; returns the job's logs."""
    job_env = {k: env[k] for k in env if k != "RAY_ADDRESS"}
    for _attempt in range(6):  # right after start-up the head's job agent may not be registered yet
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", stack.urls["ray"],
             "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
             "python", "-m", "jobs.train", "--config", str(path)],
            capture_output=True, text=True, timeout=timeout,
            env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **env})
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    assert proc.returncode == 0 and "registered model:" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _imported_speech(kind: str, tmp_path, pcm_audio, s3_url: str) -> tuple[str, int]:
    """An ASR corpus imported the way users bring data: a NeMo tarred dataset on disk, or a Hugging Face dataset
    (Common Voice layout, parquet) on the S3 endpoint. Returns (corpus, utterances kept)."""
    import boto3

    from jobs.data import main as data_main
    from tests.data_ops.user_datasets import write_common_voice_parquet, write_nemo_tarred

    clips = [(pcm_audio(0.3 + 0.05 * i, seed=500 + i), f"imported words {i}") for i in range(6)]
    out = str(tmp_path / f"imported-{kind}")
    if kind == "nemo-tarred":
        manifest, tars = write_nemo_tarred(tmp_path / "nemo", {f"utt{i}.wav": c for i, c in enumerate(clips)})
        args = ["--nemo-tarred", str(manifest), "--tars", tars, "--lang", "en"]
    else:
        local = write_common_voice_parquet(tmp_path / "cv/train-00000-of-00001.parquet", clips)
        s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
        s3.create_bucket(Bucket="hf-datasets")
        s3.upload_file(str(local), "hf-datasets", "common_voice_de/data/train-00000-of-00001.parquet")
        args = ["--hf-dataset", "s3://hf-datasets/common_voice_de", "--layout", "commonvoice", "--endpoint-url", s3_url]
    assert data_main(["import-asr", "--out", out, "--shard-size", "2", *args]) in (0, None)
    return out, len(clips)


# (LM, how it trains, how its ASR data was imported)
NON_GEMMA_CASES = [("llama", "frozen", "nemo-tarred"), ("qwen2+whisper", "lora", "hf-on-s3")]


def _non_gemma_recipe(lm: str, lm_mode: str, speech: str, corpus: str, tmp_path, pcm_audio, s3_url: str):
    from models.config import tiny
    from tests.models.lm_families import save_family_checkpoint

    name = f"it-{lm.replace('+', '-')}-{lm_mode}"
    # grad_accum=2: each optimizer step takes two micro-batches (each of its own drawn data type)
    raw = _recipe(corpus, str(tmp_path / "runs"), name, max_steps=4, num_workers=1, checkpoint_every=4, grad_accum=2)
    imported, utterances = _imported_speech(speech, tmp_path, pcm_audio, s3_url)
    raw["data"]["sources"]["asr_ast"]["uris"] = [imported]
    raw["model"]["lm_mode"] = lm_mode
    if lm == "llama":
        raw["model"]["lm_pretrained"] = str(save_family_checkpoint("llama", tmp_path))
    elif lm == "qwen2+whisper":
        cfg = tiny(encoder_kind="whisper")
        cfg.lm.pretrained, cfg.lm.config = str(save_family_checkpoint("qwen2", tmp_path)), {}
        raw["model"] = {"size": None, "config": cfg.model_dump(mode="json"), "lm_mode": lm_mode}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return name, raw, path, utterances


# `make test-slow` (about 110 s): two more training jobs than the suite's 15 minutes have room for; the two-node test
# above trains the project's Gemma through the same job, and tests/models/test_loss.py runs Llama's loss
@pytest.mark.slow
def test_non_gemma_lms_train_on_imported_data_and_change_only_what_the_recipe_trains(
        stack, s3_endpoint, corpus_conversations, pcm_audio, tmp_path):
    """Any chat LM through the training job: tiny Llama 3 and Qwen2.5 checkpoints (their families' tokenizers and
    templates; the latter under a Whisper encoder), both by `ray job submit` at once (the project's own tiny Gemma
    trains in the two-node test above and in the demo), on ASR data imported as users hold it (a NeMo tarred
    dataset; a Hugging Face dataset on object storage).
    Frozen LM: LM weights bit-identical after training. LoRA: only LoRA weights change inside the LM."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from mlflow.tracking import MlflowClient

    from jobs.recipe import parse_recipe
    from jobs.training.plan import resolve
    from jobs.training.preflight import tokenizer_files_for
    from jobs.training.sft import build_model
    from jobs.training.tokenizer import load_tokenizer as load_tokenizer_files
    from tracking.models import load_speechlm

    env = stack.env()
    corpus = str(tmp_path / "corpus")
    _write_corpus(corpus, corpus_conversations, {})
    cases = {lm: _non_gemma_recipe(lm, lm_mode, speech, corpus, tmp_path / lm, pcm_audio, s3_endpoint)
             for lm, lm_mode, speech in NON_GEMMA_CASES}
    with ThreadPoolExecutor(len(cases)) as pool:  # two users' jobs on one cluster
        list(pool.map(lambda case: _submit_and_wait(stack, env, case[2]), cases.values()))

    mc = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    for lm, lm_mode, _ in NON_GEMMA_CASES:
        name, raw, _, utterances = cases[lm]
        (run,) = mc.search_runs([mc.get_experiment_by_name("it").experiment_id],
                                filter_string=f"tags.`vtb.run_name` = '{name}'")
        # the imported corpus, all of it, is what the speech batches came from
        assert run.data.params["data_summary.asr_ast.cuts"] == str(utterances), lm
        assert mc.get_metric_history(run.info.run_id, "loss/asr_ast"), f"{lm}: no batch of imported speech trained"
        trained = load_speechlm(f"runs:/{run.info.run_id}/model", tracking_uri=env["MLFLOW_TRACKING_URI"])
        plan = resolve(parse_recipe(raw))
        files = tokenizer_files_for(plan)
        initial = build_model(plan, plan.stages[0], files)
        if files is not None:
            assert len(load_tokenizer_files(files)) == len(trained.tokenizer)
        else:  # the LM's own tokenizer, template included, travels with the model
            assert trained.tokenizer.chat_template == initial.tokenizer.chat_template
            assert trained.stop_token_ids() == initial.stop_token_ids()
        t_lm = dict(trained.lm.named_parameters())
        changed_lm = [n for n, p in initial.lm.named_parameters() if not torch.equal(p, t_lm[n])]
        if lm_mode == "frozen":
            assert changed_lm == [], lm
        else:
            assert changed_lm and all("lora_" in n for n in changed_lm), lm
            assert any("lora_B" in n for n in changed_lm), lm
        t_enc = dict(trained.encoder.named_parameters())
        assert any(not torch.equal(p, t_enc[n]) for n, p in initial.encoder.named_parameters()), f"{lm}: encoder"


def test_a_stopped_run_reads_killed_and_a_failed_one_failed(stack, ray_local, corpus_conversations, tmp_path):
    """MLflow's run status says how a training run ended: `ray job stop` (SIGTERM to the driver) while it trains ->
    KILLED, with its end time; a run that fails after its MLflow run exists (here: the cluster has no CPU left for
    the Ray Data readers, found once the run is made) -> FAILED. Neither stays RUNNING."""
    import signal

    from mlflow.tracking import MlflowClient

    from jobs.recipe import RecipeError, parse_recipe
    from jobs.training.ray_run import run_training

    env = stack.env()
    corpus = str(tmp_path / "corpus")
    _write_corpus(corpus, corpus_conversations, {})
    mc = MlflowClient(env["MLFLOW_TRACKING_URI"])

    def run_of(name):
        exp = mc.get_experiment_by_name("it")  # made by the job (the first of the session's tests to run)
        runs = exp and mc.search_runs([exp.experiment_id], filter_string=f"tags.`vtb.run_name` = '{name}'")
        return runs[0] if runs else None

    raw = _recipe(corpus, str(tmp_path / "runs"), "it-stopped", max_steps=100000, num_workers=1)
    path = tmp_path / "it-stopped.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", "--config", str(path)], cwd=ROOT,
                            env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not ((run := run_of("it-stopped")) and "loss" in run.data.metrics):  # training, not starting up
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "no training step logged in 180 s"
            time.sleep(1)
        assert run.info.status == "RUNNING"
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "marked KILLED" in out, out[-3000:]
    stopped = mc.get_run(run.info.run_id)
    assert stopped.info.status == "KILLED" and stopped.info.end_time >= stopped.info.start_time

    # as many one-CPU workers as the cluster has CPUs: nothing left for Ray Data's readers
    raw = _recipe(corpus, str(tmp_path / "runs"), "it-failing", num_workers=int(ray_local.cluster_resources()["CPU"]))
    with pytest.raises(RecipeError, match="leaving none for the Ray Data tasks"):
        run_training(parse_recipe(raw), env=env)
    assert run_of("it-failing").info.status == "FAILED"
