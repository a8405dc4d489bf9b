"""Demo: the whole slice on the embedded default (local filesystem), end to end.

    python -m jobs.demo [--size small] [--steps 150] [--keep-stack]

1. starts the local stack (Ray head, MLflow server) on 127.0.0.1;
2. `ray job submit`s the demo corpus job: all four data types made here (espeak-ng voices in En/De/Es/Fr) and
   written as Shar shards with a manifest under .stack/corpus;
3. `ray job submit`s the training job with the tiny recipe (jobs/recipes/tiny.yaml, 2 workers): the run, its
   metrics and the model land in MLflow and the model is registered as `vtblender-tiny@candidate`;
4. loads that registered model and answers one mixed-modal chat turn [text, speech, text];
5. prints where to look: MLflow UI, run, Ray dashboard, logs.

The tiny model (about 1M parameters, random init, offline tokenizer) trains for a couple of minutes on 2 CPU cores:
its answer shows the plumbing (shards -> Ray Data -> Ray Train -> MLflow registry -> generation), not a model that
has learned much. The same commands with `jobs/recipes/vtblender_3b.yaml` and real corpora train the paper's model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


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
            if "[train]" in line or "demo corpus at" in line or "error" in line.lower() and "error_rows" not in line:
                print(f"    {line.strip()[:220]}", flush=True)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "demo"], help="demo corpus size")
    ap.add_argument("--steps", type=int, default=150, help="steps per stage of the tiny recipe")
    ap.add_argument("--stack-root", default=".stack")
    ap.add_argument("--keep-stack", action="store_true", help="leave Ray and MLflow running for inspection")
    args = ap.parse_args(argv)

    import logging

    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray").setLevel(logging.WARNING)  # not the upload chatter of every submission

    from data_ops.tts import EspeakTTS, TTSError
    from infra.stack import LocalStack, StackError

    t0 = time.time()
    stack = LocalStack(args.stack_root, services=("ray", "mlflow"), ray_num_cpus=6)
    try:
        print("[demo] starting the local stack (Ray head, MLflow) on 127.0.0.1 ...", flush=True)
        stack.start()
        env = stack.env()
        client = JobSubmissionClient(env["RAY_ADDRESS"])
        job_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
        root = stack.root
        corpus = root / "corpus"
        if not (corpus / "manifest.json").exists():
            submit_and_follow(client, ["python", "-m", "jobs.data", "demo", "--out", str(corpus), "--size", args.size],
                              job_env, "demo-corpus", timeout_s=1200)
        else:
            print(f"[demo] reusing the corpus at {corpus}")
        manifest = json.loads((corpus / "manifest.json").read_text())
        print("[demo] corpus: " + ", ".join(f"{t} {v['num_cuts']} cuts / {v['hours'] * 60:.1f} min"
                                            for t, v in manifest["types"].items()))

        recipe = yaml.safe_load((ROOT / "jobs" / "recipes" / "tiny.yaml").read_text())
        run_name = f"tiny-demo-{time.strftime('%Y%m%d-%H%M%S')}"
        recipe["run"].update(name=run_name, storage_path=str(root / "runs"))
        for stage in recipe.get("stages") or []:
            stage["max_steps"] = args.steps
        for src in recipe["data"]["sources"].values():
            src["uris"] = [str(corpus)]
        recipe_path = root / "recipes" / f"{run_name}.yaml"
        recipe_path.parent.mkdir(parents=True, exist_ok=True)
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        submit_and_follow(client, ["python", "-m", "jobs.train", "--config", str(recipe_path)], job_env, "train",
                          timeout_s=1800)

        from mlflow.tracking import MlflowClient

        from models.conversation import AudioPart, Conversation, TextPart, Turn
        from services.model_store import load_speechlm

        model_uri = f"models:/{recipe['run']['registered_model']}@{recipe['run']['alias']}"
        model = load_speechlm(model_uri, tracking_uri=env["MLFLOW_TRACKING_URI"])
        question = "How many apples do I have now?"
        audio, tts = EspeakTTS().synthesize(question, "en", np.random.default_rng(0), voice="en-us")
        conv = Conversation([Turn("user", [TextPart("I have 6 apples. My friend gives me 3 more."), AudioPart(audio)])])
        answer = model.generate([conv], max_new_tokens=24)[0]
        mc = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
        run = mc.search_runs([mc.get_experiment_by_name(recipe["run"]["experiment"]).experiment_id],
                             filter_string=f"tags.`vtb.run_name` = '{run_name}'")[0]
        last_stage = recipe["stages"][-1]["name"] if recipe.get("stages") else None
        loss = mc.get_metric_history(run.info.run_id, f"{last_stage}/loss" if last_stage else "loss")
        print(f"[demo] chat turn: user = [text 'I have 6 apples. My friend gives me 3 more.', "
              f"speech '{question}' ({len(audio) / 16000:.1f} s, espeak-ng {tts['voice']})]")
        print(f"[demo] {model_uri} answers: {answer!r}")
        print(f"[demo] training loss {loss[0].value:.3f} (step {loss[0].step}) -> {loss[-1].value:.3f} "
              f"(step {loss[-1].step}) in the joint stage; a tiny random-init model, {args.steps} steps per stage on CPU")
        ui = env["MLFLOW_TRACKING_URI"]
        print(f"[demo] MLflow run {run.info.run_id}: {ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
        print(f"[demo] MLflow model registry: {ui}/#/models/{recipe['run']['registered_model']}")
        print(f"[demo] Ray dashboard: {env['RAY_ADDRESS']}   logs: {root / 'logs'}")
        print(f"[demo] done in {time.time() - t0:.0f} s")
        return 0
    except (StackError, TTSError, RuntimeError) as e:
        print(f"[demo] error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep_stack:
            print("[demo] stack left running; stop it with: python -m infra.stack down")
        else:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
