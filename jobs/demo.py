"""Demo: the whole slice on the embedded default (local filesystem), end to end, ending with a model that hears.

    make demo        # = python -m infra.stack up; eval "$(python -m infra.stack env)"; python -m jobs.demo; ... down

1. takes the Ray cluster and MLflow server from RAY_ADDRESS and MLFLOW_TRACKING_URI (`make demo` starts the local
   stack on 127.0.0.1 and sets them; point them at your own cluster and server to run the same demo there);
2. `ray job submit`s the corpus jobs: the demo corpus (all four data types, espeak-ng voices in En/De/Es/Fr) and a
   held-out corpus spoken by voices no training sample uses, as Shar shards with manifests under .stack/;
3. `ray job submit`s the encoder's CTC pretraining (the stand-in for the paper's pretrained Canary encoder) and
   then the training job with jobs/recipes/demo.yaml (2 workers): a text LM stage, then the paper's joint
   speech-text SFT; the promotion gate measures the content gap and text retention on the held-out corpus, and
   the model is registered as `vtblender-demo`, with the alias `@candidate` only if it passed;
4. deploys `models:/vtblender-demo@candidate` with Ray Serve as the README does (`serve deploy
   services/serve_config.yaml`), asks the endpoint with the `openai` client to transcribe the held-out utterances
   (reference and answer side by side, the WER) and one mixed-modal chat turn [text, speech];
5. prints where to look: the endpoint, MLflow UI, run, Ray dashboard.
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
            if text.startswith(("[train]", "[data]", "[pretrain_encoder]", "error", "Traceback")):
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


def git_version() -> dict[str, str]:
    """VTB_GIT_COMMIT / VTB_GIT_DIRTY of this checkout for the jobs' environment: `ray job submit` uploads the
    working directory without `.git`, so the training run learns its commit from these (tracking/lineage.py)."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_GIT_DIRTY

    from tracking.lineage import source_version

    tags, _ = source_version("jobs.demo", env={})
    return ({"VTB_GIT_COMMIT": tags[MLFLOW_GIT_COMMIT], "VTB_GIT_DIRTY": tags[MLFLOW_GIT_DIRTY]}
            if MLFLOW_GIT_COMMIT in tags else {})


def ensure_corpus(client, corpus: Path, size: str, job_env: dict, split: str = "train", seed: int = 0) -> Path:
    """The corpus at `corpus`, made by a `jobs.data demo` Ray job unless it is there."""
    if not (corpus / "manifest.json").exists():
        submit_and_follow(client, ["python", "-m", "jobs.data", "demo", "--out", str(corpus), "--size", size,
                                   "--split", split, "--seed", str(seed)], job_env, f"demo-corpus-{split}",
                          timeout_s=1200)
    else:
        print(f"[demo] reusing the corpus at {corpus}")
    manifest = json.loads((corpus / "manifest.json").read_text())
    print(f"[demo] {split} corpus: " + ", ".join(f"{t} {v['num_cuts']} cuts / {v['hours'] * 60:.1f} min"
                                                 for t, v in manifest["types"].items()))
    return corpus


def ensure_encoder(client, root: Path, corpus: Path, steps: int, job_env: dict) -> Path:
    """The demo's speech encoder, CTC-pretrained on the corpus by a `jobs.pretrain_encoder` Ray job unless it is
    there (a folder per step count: a changed --encoder-steps trains anew)."""
    out = root / f"encoder-ctc-{steps}"
    if not out.is_dir():
        submit_and_follow(client, ["python", "-m", "jobs.pretrain_encoder", "--corpus", str(corpus), "--size", "mini",
                                   "--steps", str(steps), "--out", str(out), "--experiment", "vtblender-demo"],
                          job_env, "demo-encoder", timeout_s=1800)
    else:
        print(f"[demo] reusing the CTC-pretrained encoder at {out}")
    return out


def demo_recipe(root: Path, corpus: Path, eval_corpus: Path, encoder: Path, joint_steps: int) -> tuple[dict, Path]:
    """jobs/recipes/demo.yaml on the demo corpora and encoder, `joint_steps` of joint SFT, a fresh run name;
    written under `root`."""
    recipe = yaml.safe_load((ROOT / "jobs" / "recipes" / "demo.yaml").read_text())
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    recipe["run"].update(name=run_name, storage_path=str(root / "runs"))
    recipe["model"]["encoder_pretrained"] = str(encoder)
    recipe["stages"][-1]["max_steps"] = joint_steps
    recipe["train"]["max_steps"] = sum(st["max_steps"] for st in recipe["stages"])
    for src in recipe["data"]["sources"].values():
        src["uris"] = [str(corpus)]
    recipe["promote"] = {**recipe.get("promote", {}), "eval_uris": [str(eval_corpus)]}
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


def _wav_base64(audio: np.ndarray) -> str:
    import base64
    import io

    import soundfile as sf

    from data_ops.schema import SAMPLING_RATE

    wav = io.BytesIO()
    sf.write(wav, audio, SAMPLING_RATE, format="WAV")
    return base64.b64encode(wav.getvalue()).decode()


def transcribe_held_out(client, eval_corpus: Path, limit: int) -> float:
    """Ask the endpoint to transcribe the held-out corpus's ASR utterances (voices no training sample used), with
    the instruction training used; print reference and answer side by side; return the WER (Whisper's
    normalizers, per language, pooled)."""
    from data_ops.importers import asr_instruction
    from data_ops.scoring import wer
    from data_ops.shar_datasource import iter_corpus_rows, row_to_conversation

    rows = [r for r in iter_corpus_rows(str(eval_corpus), "asr_ast") if r["task"] == "asr"][:limit]
    refs, hyps, langs = [], [], []
    from data_ops.tts import HELD_OUT_VOICES

    print(f"[demo] transcribing {len(rows)} held-out utterances through the endpoint (espeak-ng voices no training "
          f"sample uses: {', '.join(v for voices in HELD_OUT_VOICES.values() for v in voices)})")
    for row in rows:
        conv = row_to_conversation(row)
        lang = json.loads(row["langs"])[0]
        audio = conv.audio_parts[0]
        reply = client.chat.completions.create(model="vtblender", temperature=0, max_tokens=40, messages=[
            {"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": _wav_base64(audio.audio), "format": "wav"}},
                {"type": "text", "text": asr_instruction(lang)}]}])
        refs.append(audio.transcript)
        hyps.append(reply.choices[0].message.content or "")
        langs.append(lang)
        print(f"    [{lang}] {audio.transcript!r:48} -> {hyps[-1]!r}")
    by_lang = {lang: wer([r for r, g in zip(refs, langs) if g == lang], [h for h, g in zip(hyps, langs) if g == lang],
                         lang) for lang in sorted(set(langs))}
    total = wer(refs, hyps, "multi")
    print(f"[demo] held-out WER {total:.3f} over {len(rows)} utterances ("
          + ", ".join(f"{lang} {v:.3f}" for lang, v in by_lang.items()) + ")")
    return total


def chat_turn(client) -> str:
    """One turn of text + speech through the endpoint."""
    from data_ops.schema import SAMPLING_RATE
    from data_ops.tts import EspeakTTS

    question = "How many apples do I have now?"
    audio, tts = EspeakTTS().synthesize(question, "en", np.random.default_rng(0), voice="en-us")
    reply = client.chat.completions.create(model="vtblender", temperature=0, max_tokens=24, messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "I have 6 apples. My friend gives me 3 more."},
            {"type": "input_audio", "input_audio": {"data": _wav_base64(audio), "format": "wav"}}]}])
    answer = reply.choices[0].message.content
    print(f"[demo] chat turn: user = [text 'I have 6 apples. My friend gives me 3 more.', speech '{question}' "
          f"({len(audio) / SAMPLING_RATE:.1f} s, espeak-ng {tts['voice']})] -> {answer!r}")
    return answer


def report_run(recipe: dict, tracking_uri: str) -> dict:
    """The run's gate verdict and numbers from MLflow; prints where the run and the registry are."""
    from tracking.client import client_for
    from tracking.runs import runs_named

    run = runs_named(client_for(tracking_uri), recipe["run"]["experiment"], recipe["run"]["name"])[0]
    print(f"[demo] MLflow run {run.info.run_id} ({run.info.status}): {tracking_uri}/#/experiments/"
          f"{run.info.experiment_id}/runs/{run.info.run_id}")
    print(f"[demo] MLflow model registry: {tracking_uri}/#/models/{recipe['run']['registered_model']}")
    return {"gate": run.data.tags.get("vtb.gate"), "failed": run.data.tags.get("vtb.gate.failed"),
            "content_gap": run.data.metrics.get("promote/content_gap")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="demo", choices=["tiny", "small", "demo"], help="demo corpus size")
    ap.add_argument("--encoder-steps", type=int, default=600, help="CTC pretraining steps of the encoder")
    ap.add_argument("--joint-steps", type=int, default=1600, help="steps of joint speech-text SFT")
    ap.add_argument("--transcribe", type=int, default=24, help="held-out utterances to transcribe at the end")
    ap.add_argument("--work-dir", default=".stack", help="where the corpora, encoder, recipe and checkpoints go")
    args = ap.parse_args(argv)
    env = dict(os.environ)
    missing = [k for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI") if not env.get(k)]
    if missing:
        print(f"[demo] error: {' and '.join(missing)} not set. `make demo` starts the local stack and sets them; by "
              "hand: python -m infra.stack up && eval \"$(python -m infra.stack env)\"", file=sys.stderr)
        return 2

    import logging

    from openai import OpenAI
    from ray.job_submission import JobSubmissionClient

    from data_ops.tts import TTSError
    from jobs.common.console import quiet_console

    quiet_console(os.environ)
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the per-submission upload chatter
    t0 = time.time()
    try:
        client = JobSubmissionClient(env.get("RAY_API_SERVER_ADDRESS") or env["RAY_ADDRESS"])
        # what the jobs need of this environment (MLflow, S3 and Ray auth settings), not the cluster address
        job_env = {k: v for k, v in env.items() if k.startswith(("MLFLOW_", "AWS_", "RAY_AUTH"))} | git_version()
        root = Path(args.work_dir).resolve()
        corpus = ensure_corpus(client, root / f"corpus-{args.size}", args.size, job_env)
        eval_corpus = ensure_corpus(client, root / "corpus-held-out", "demo-eval", job_env, split="eval", seed=1000)
        encoder = ensure_encoder(client, root, corpus, args.encoder_steps, job_env)
        recipe, recipe_path = demo_recipe(root, corpus, eval_corpus, encoder, args.joint_steps)
        submit_and_follow(client, ["python", "-m", "jobs.train", "--config", str(recipe_path)], job_env, "train",
                          timeout_s=3600)
        run = report_run(recipe, env["MLFLOW_TRACKING_URI"])
        if run["gate"] != "passed":
            print(f"[demo] error: the model did not pass the promotion gate ({run['failed']}), so it was not given "
                  "@candidate and is not served; the run's vtb.gate.* tags say why", file=sys.stderr)
            return 1
        base = deploy_chat_app(env)
        openai = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=2, timeout=120)
        held_out_wer = transcribe_held_out(openai, eval_corpus, args.transcribe)
        chat_turn(openai)
        print(f"[demo] models:/{recipe['run']['registered_model']}@{recipe['run']['alias']}: held-out WER "
              f"{held_out_wer:.3f}, content gap {run['content_gap']:.3f} nats/token, promotion gate passed")
        print(f"[demo] chat endpoint: {base}/v1 (OpenAI Chat Completions, model 'vtblender'; README \"Serving\"); "
              f"chat page: {base}/")
        print(f"[demo] Ray dashboard: {env.get('RAY_DASHBOARD_ADDRESS') or env['RAY_ADDRESS']}")
        print(f"[demo] done in {time.time() - t0:.0f} s")
        return 0
    except (TTSError, RuntimeError, ConnectionError) as e:
        print(f"[demo] error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
