"""Demo: the whole slice on the embedded default (local filesystem), end to end.

    make demo        # = python -m infra.stack up; eval "$(python -m infra.stack env)"; python -m jobs.demo; ... down

1. takes the Ray cluster and MLflow server from RAY_ADDRESS and MLFLOW_TRACKING_URI (`make demo` starts the local
   stack on 127.0.0.1 and sets them; point them at your own cluster and server to run the same demo there);
2. `ray job submit`s the demo corpus job: all four data types made here (espeak-ng voices in En/De/Es/Fr) and
   written as Shar shards with a manifest under .stack/corpus;
3. `ray job submit`s the training job with the tiny recipe (jobs/recipes/tiny.yaml, 2 workers): the run, its
   metrics and the model land in MLflow and the model is registered as `vtblender-tiny@candidate`;
4. deploys that registered model with Ray Serve as the README does (`serve deploy services/serve_config.yaml`) and
   asks the endpoint one mixed-modal chat turn [text, speech] with the `openai` client;
5. prints where to look: the endpoint, MLflow UI, run, Ray dashboard.

The tiny model (about 1M parameters, random init, offline tokenizer) trains for a couple of minutes on 2 CPU cores:
its answer shows the plumbing (shards -> Ray Data -> Ray Train -> MLflow registry -> generation), not a model that
has learned much. The same commands with `jobs/recipes/vtblender_3b.yaml` and real corpora train the paper's model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_PREFIX = re.compile(r"^\((?:[\w:]+ )?pid=\d+(?:, ip=[\d.]+)?\) ")  # Ray's worker-log prefix


def submit_and_follow(client, entrypoint: list[str], env: dict, name: str, timeout_s: float) -> str:
    """Submit `entrypoint` as a Ray job (what `ray job submit --working-dir .` does), stream its log, return it."""
    from ray.job_submission import JobStatus

    import shlex

    for attempt in range(6):
        try:
            job_id = client.submit_job(entrypoint=shlex.join(entrypoint), submission_id=f"{name}-{int(time.time())}",
                                       runtime_env={"working_dir": str(ROOT), "env_vars": env})
            break
        except RuntimeError as e:  # right after start-up the head's job agent may not be registered yet
            if "No available agent" not in str(e) or attempt == 5:
                raise
            time.sleep(5)
    print(f"[demo] submitted {job_id}: ray job submit --working-dir . -- {shlex.join(entrypoint)}", flush=True)
    shown, deadline = 0, time.time() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        for line in logs[shown:].splitlines():
            text = RAY_PREFIX.sub("", line.strip())  # "(RayTrainWorker pid=123) [train] ..." -> "[train] ..."
            if text.startswith(("[train]", "[data]", "error", "Traceback")):
                print(f"    {text[:220]}", flush=True)
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if time.time() > deadline:
            client.stop_job(job_id)
            raise RuntimeError(f"job {job_id} did not finish in {timeout_s:.0f} s")
        time.sleep(2)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job_id} {status}:\n{logs[-3000:]}")
    return logs


def ensure_corpus(client, root: Path, size: str, job_env: dict) -> Path:
    """The demo corpus under `root/corpus`, made by a `jobs.data demo` Ray job unless it is there."""
    corpus = root / "corpus"
    if not (corpus / "manifest.json").exists():
        submit_and_follow(client, ["python", "-m", "jobs.data", "demo", "--out", str(corpus), "--size", size],
                          job_env, "demo-corpus", timeout_s=1200)
    else:
        print(f"[demo] reusing the corpus at {corpus}")
    manifest = json.loads((corpus / "manifest.json").read_text())
    print("[demo] corpus: " + ", ".join(f"{t} {v['num_cuts']} cuts / {v['hours'] * 60:.1f} min"
                                        for t, v in manifest["types"].items()))
    return corpus


def demo_recipe(root: Path, corpus: Path, steps: int) -> tuple[dict, Path]:
    """jobs/recipes/tiny.yaml on the demo corpus, `steps` per stage, a fresh run name; written under `root`."""
    recipe = yaml.safe_load((ROOT / "jobs" / "recipes" / "tiny.yaml").read_text())
    run_name = f"tiny-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    recipe["run"].update(name=run_name, storage_path=str(root / "runs"))
    for stage in recipe.get("stages") or []:
        stage["max_steps"] = steps
    for src in recipe["data"]["sources"].values():
        src["uris"] = [str(corpus)]
    path = root / "recipes" / f"{run_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipe, path


def deploy_chat_app(env: dict) -> str:
    """`serve deploy services/serve_config.yaml` (the README's command; it serves `models:/vtblender-tiny@candidate`,
    what the demo registers) and wait until the app answers; returns the endpoint's base URL."""
    import subprocess

    import requests

    config = ROOT / "services" / "serve_config.yaml"
    http = yaml.safe_load(config.read_text())["http_options"]
    serve_bin = str(Path(sys.executable).with_name("serve"))
    print(f"[demo] serve deploy {config.relative_to(ROOT)}", flush=True)
    proc = subprocess.run([serve_bin, "deploy", str(config)], capture_output=True, text=True, env=env, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"serve deploy failed:\n{proc.stderr[-2000:]}")
    base = f"http://{http['host']}:{http['port']}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return base
        except requests.RequestException:
            pass
        time.sleep(1)
    status = subprocess.run([serve_bin, "status"], capture_output=True, text=True, env=env)
    raise RuntimeError(f"the Serve app did not answer on {base} within 300 s:\n{status.stdout[-2000:]}")


def chat_turn(recipe: dict, tracking_uri: str, steps: int, base: str) -> str:
    """Ask the Serve endpoint one turn of text + speech with the `openai` client; print the answer and the run's
    loss."""
    import base64
    import io

    import soundfile as sf
    from mlflow.tracking import MlflowClient
    from openai import OpenAI

    from data_ops.schema import SAMPLING_RATE
    from data_ops.tts import EspeakTTS

    question = "How many apples do I have now?"
    audio, tts = EspeakTTS().synthesize(question, "en", np.random.default_rng(0), voice="en-us")
    wav = io.BytesIO()
    sf.write(wav, audio, SAMPLING_RATE, format="WAV")
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=2, timeout=120)
    reply = client.chat.completions.create(model="vtblender", temperature=0, max_tokens=24, messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "I have 6 apples. My friend gives me 3 more."},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.getvalue()).decode(),
                                                    "format": "wav"}}]}])
    answer = reply.choices[0].message.content
    model_uri = f"models:/{recipe['run']['registered_model']}@{recipe['run']['alias']}"
    mc = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = mc.search_runs([mc.get_experiment_by_name(recipe["run"]["experiment"]).experiment_id],
                         filter_string=f"tags.`vtb.run_name` = '{recipe['run']['name']}'")[0]
    last_stage = recipe["stages"][-1]["name"] if recipe.get("stages") else None
    loss = mc.get_metric_history(run.info.run_id, f"{last_stage}/loss" if last_stage else "loss")
    print(f"[demo] chat turn: user = [text 'I have 6 apples. My friend gives me 3 more.', "
          f"speech '{question}' ({len(audio) / SAMPLING_RATE:.1f} s, espeak-ng {tts['voice']})]")
    print(f"[demo] {model_uri}, served at {base}/v1/chat/completions, answers: {answer!r} "
          f"({reply.usage.prompt_tokens} prompt tokens, {reply.usage.completion_tokens} generated)")
    print(f"[demo] training loss {loss[0].value:.3f} (step {loss[0].step}) -> {loss[-1].value:.3f} "
          f"(step {loss[-1].step}) in the joint stage; a tiny random-init model, {steps} steps per stage on CPU")
    print(f"[demo] MLflow run {run.info.run_id}: {tracking_uri}/#/experiments/{run.info.experiment_id}/runs/"
          f"{run.info.run_id}")
    print(f"[demo] MLflow model registry: {tracking_uri}/#/models/{recipe['run']['registered_model']}")
    return answer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "demo"], help="demo corpus size")
    ap.add_argument("--steps", type=int, default=150, help="steps per stage of the tiny recipe")
    ap.add_argument("--work-dir", default=".stack", help="where the corpus, recipe and checkpoints go")
    args = ap.parse_args(argv)
    env = dict(os.environ)
    missing = [k for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI") if not env.get(k)]
    if missing:
        print(f"[demo] error: {' and '.join(missing)} not set. `make demo` starts the local stack and sets them; by "
              "hand: python -m infra.stack up && eval \"$(python -m infra.stack env)\"", file=sys.stderr)
        return 2

    import logging

    from ray.job_submission import JobSubmissionClient

    from data_ops.tts import TTSError
    from jobs.training.console import quiet_console

    quiet_console(os.environ)
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the per-submission upload chatter
    t0 = time.time()
    try:
        client = JobSubmissionClient(env.get("RAY_API_SERVER_ADDRESS") or env["RAY_ADDRESS"])
        # what the jobs need of this environment (MLflow, S3 and Ray auth settings), not the cluster address
        job_env = {k: v for k, v in env.items() if k.startswith(("MLFLOW_", "AWS_", "RAY_AUTH"))}
        root = Path(args.work_dir).resolve()
        corpus = ensure_corpus(client, root, args.size, job_env)
        recipe, recipe_path = demo_recipe(root, corpus, args.steps)
        submit_and_follow(client, ["python", "-m", "jobs.train", "--config", str(recipe_path)], job_env, "train",
                          timeout_s=1800)
        base = deploy_chat_app(env)
        chat_turn(recipe, env["MLFLOW_TRACKING_URI"], args.steps, base)
        print(f"[demo] chat endpoint: {base}/v1 (OpenAI Chat Completions, model 'vtblender'; README \"Serving\")")
        print(f"[demo] Ray dashboard: {env.get('RAY_DASHBOARD_ADDRESS') or env['RAY_ADDRESS']}")
        print(f"[demo] done in {time.time() - t0:.0f} s")
        return 0
    except (TTSError, RuntimeError, ConnectionError) as e:
        print(f"[demo] error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
