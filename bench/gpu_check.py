"""The first run on a GPU machine, in one script (`make gpu-check`): does the product work there, and how fast.

    make gpu-check                  # starts the local stack, runs this, stops the stack
    python -m bench.gpu_check       # on a running stack (RAY_ADDRESS / MLFLOW_TRACKING_URI, as `infra.stack env`)

1. the CUDA-marked tests (`pytest -m gpu`);
2. the training job (`python -m jobs.train`, as `ray job submit` runs it) on the paper-size model
   (`vtblender_3b`: a random-init 600M FastConformer and a random-init Gemma-2B-shaped LM saved as a local checkpoint,
   LoRA r=32, bf16 autocast) for a few dozen steps on a synthetic corpus (10 s clips): tokens/s, audio-s/s, MFU
   and peak GPU memory, as the job logged them to MLflow; with two or more GPUs, the same with FSDP over NCCL;
3. the trained model served by Ray Serve (`precision: auto`, one GPU per replica): time to first token (a
   `max_tokens=1` request: prefill and one token) and decode tokens/s of 10 s of audio plus a prompt, at 1 and at 16
   concurrent clients.

A speed check, not a training run: the job skips its last checkpoint (`train.final_checkpoint: false`: ~8 GB of
weights and Adam state at the paper's size) and the promotion gate (`promote.enabled: false`: two fp32 3B models
loaded to measure a random init); the table says so. Each part has a time limit; a part that times out or fails is
reported as such, the parts after it that need it are skipped, and the table and JSON are written with what ran
(exit status 1).

One table on the console and one JSON file (`--out`). Without a GPU every step runs at `tiny` size (bf16 on CPU; the
FSDP step needs two GPUs: FSDP over two CPU workers in bf16 is tests/jobs/test_fsdp.py): what the suite runs, so the
script is known to work before a GPU is there.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a speech model listens to every word one two three four five six seven eight nine ten".split()


def log(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def _audio(seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    tone = 0.2 * np.sin(2 * np.pi * rng.uniform(120, 400) * t)
    return (tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def write_corpus(uri: str, clips: int, clip_s: float) -> None:
    """A synthetic corpus for throughput: ASR-shaped clips of `clip_s` seconds and short text conversations."""
    from data_ops.schema import conversation_to_cut
    from data_ops.shards import ShardWriter
    from models.conversation import AudioPart, Conversation, TextPart, Turn

    rng = np.random.default_rng(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS, n))

    with ShardWriter(uri, shard_size=64, progress=False) as w:
        w.write("asr_ast", [conversation_to_cut(
            Conversation([Turn("user", [AudioPart(_audio(clip_s, rng)), TextPart("Transcribe the audio.")]),
                          Turn.text("assistant", words(int(2.5 * clip_s)))]),
            cut_id=f"asr-{i}", data_type="asr_ast", task="asr", langs=["en"]) for i in range(clips)])
        w.write("text", [conversation_to_cut(
            Conversation([Turn.text("user", words(40)), Turn.text("assistant", words(60))]),
            cut_id=f"text-{i}", data_type="text", task="text", langs=["en"]) for i in range(clips)])


def random_lm(lm_config: dict, tokenizer):
    """An LM of `lm_config` with random weights (bf16) whose greedy answers decode to text.

    The paper's LM keeps Gemma's 256000-token vocabulary (its embedding and head are part of what the check times)
    while this tokenizer has a few hundred: ids past it decode to nothing, and so do special tokens, and the server
    streams answers stripped of whitespace, so a random head would stream no content (and a small random LM
    echoes its prompt's last token, a newline). The head's rows for every id that decodes to no visible text are
    zeroed (tied: the input embedding's too): their logit is exactly 0, below the largest of the few hundred random
    logits of real tokens, so greedy decoding picks text, and never a stop token (answers run to `max_tokens`, a
    steady decode measurement)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(lm_config)
    kw.setdefault("vocab_size", len(tokenizer))
    kw.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw), dtype=torch.bfloat16)
    no_text = sorted(set(range(len(tokenizer), kw["vocab_size"])) | set(tokenizer.all_special_ids)
                     | {i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()})
    with torch.no_grad():
        for emb in (lm.get_input_embeddings(), lm.get_output_embeddings()):  # tied: the same weight twice
            emb.weight[no_text] = 0
    return lm


def save_random_lm(size: str, out: Path) -> Path:
    """The size's LM with random weights (`random_lm`), saved as a local checkpoint with a tokenizer and chat
    template: the job then loads it as it loads a user's (`model.lm_pretrained`), and the trained model saves only
    what trains."""
    from models.config import NAMED_SIZES
    from models.tokenizer import build_tiny_tokenizer

    if (out / "config.json").exists():
        return out
    tokenizer = build_tiny_tokenizer(WORDS)
    random_lm(NAMED_SIZES[size]().lm.config, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def recipe(size: str, corpus: str, lm_dir: Path, root: Path, strategy: str, workers: int, gpu: bool,
           steps: int) -> dict:
    """A speed run: no checkpoint (none periodic, `final_checkpoint: false`) and no promotion gate; the trained
    model is still logged and registered, for the serving part."""
    return {
        "run": {"name": f"gpu-check-{size}-{strategy}-{int(time.time())}", "experiment": "gpu-check",
                "storage_path": str(root / "runs"), "registered_model": f"gpu-check-{size}-{strategy}", "seed": 0},
        "promote": {"enabled": False},
        "model": {"size": size, "lm_pretrained": str(lm_dir), "lm_mode": "lora"},
        "data": {"sources": {"text": {"uris": [corpus], "ratio": 0.2, "batch_size": 1},
                             "asr_ast": {"uris": [corpus], "ratio": 0.8, "batch_size": 4}}},
        "train": {"max_steps": steps, "lr": 1e-4, "warmup_steps": 2, "precision": "bf16", "strategy": strategy,
                  "num_workers": workers, "use_gpu": gpu, "checkpoint_every": steps + 1, "final_checkpoint": False,
                  "log_every": max(1, steps // 6), "max_failures": 0},
    }


def train(raw: dict, root: Path, env: dict, timeout_s: float) -> dict:
    """`python -m jobs.train` on the recipe; the run's logged throughput, MFU and memory (windows after the first)."""
    import yaml

    from tracking.client import client_for

    path = root / f"{raw['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the training job failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    run_id = re.search(r"\[train\] MLflow run (\w+)", proc.stdout).group(1)
    client = client_for(env["MLFLOW_TRACKING_URI"])
    out = {"strategy": raw["train"]["strategy"], "workers": raw["train"]["num_workers"], "job_s": time.time() - t0,
           # the version itself (models:/name/N), whatever alias it got
           "run_id": run_id, "model": re.search(r"registered model: .*?(models:/[\w.-]+/\d+)", proc.stdout).group(1),
           # None: the speed run writes no checkpoint (train.final_checkpoint: false)
           "checkpoint": re.search(r"\[train\] last checkpoint: (\S+)", proc.stdout).group(1)}
    out["checkpoint"] = None if out["checkpoint"] == "None" else out["checkpoint"]
    for key, name in (("tokens_per_s", "throughput/tokens_per_s"), ("audio_s_per_s", "throughput/audio_s_per_s"),
                      ("mfu", "perf/mfu"), ("peak_gpu_gib", "gpu/max_memory_allocated_gib")):
        values = [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]
        if not values:
            out[key] = None
        elif key == "peak_gpu_gib":
            out[key] = max(values)
        else:
            out[key] = float(np.mean(values[1:] or values))  # the first window holds the warm-up
    return out


def _wav_b64(audio: np.ndarray) -> str:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def _one_request(client, model: str, audio_b64: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}},
            {"type": "text", "text": "Transcribe the audio."}]}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"first_content_s": first, "tokens": tokens, "total_s": time.perf_counter() - t0}


def _at_once(n: int, request) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: request(), range(n)))
    return results, time.perf_counter() - t0


def serve_and_measure(model_uri: str, env: dict, root: Path, clients=(1, 16), max_tokens: int = 32,
                      timeout_s: float = 900) -> dict:
    """Deploy the model with `serve deploy` (precision and GPUs: auto), then time requests of 10 s of audio plus a
    prompt at each number of concurrent clients: time to first token from `max_tokens=1` requests (what the first
    streamed chunk would say only if the first token decodes to text), decode tokens/s from `max_tokens` ones.
    Raises `TimeoutError` when the app is not up, or a request not answered, within `timeout_s`."""
    import requests
    import yaml
    from openai import OpenAI

    from infra.stack import free_port

    port = free_port()
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "gpu-check", "route_prefix": "/", "import_path": "services.chat_app:build_app",
                                "runtime_env": {"env_vars": {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}},
                                "args": {"model": model_uri, "served_model_name": "gpu-check",
                                         "engine": {"max_num_seqs": 16, "kv_cache_gib": 2}}}]}
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve = str(Path(sys.executable).with_name("serve"))
    address = ["-a", env["RAY_DASHBOARD_ADDRESS"]]
    subprocess.run([serve, "deploy", str(path), *address], env=env, check=True, capture_output=True, timeout=300)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"the Serve app did not come up on {base} within {timeout_s:.0f} s")
            time.sleep(1)
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                        timeout=max(1.0, deadline - time.time()))
        audio = _wav_b64(_audio(10.0, np.random.default_rng(1)))
        _one_request(client, "gpu-check", audio, 4)  # warm-up
        out = {}
        for n in clients:
            first, _ = _at_once(n, lambda: _one_request(client, "gpu-check", audio, 1))
            full, wall = _at_once(n, lambda: _one_request(client, "gpu-check", audio, max_tokens))
            streamed = [r["first_content_s"] for r in full if r["first_content_s"] is not None]
            out[str(n)] = {"clients": n, "ttft_s_median": float(np.median([r["total_s"] for r in first])),
                           "ttft_s_max": max(r["total_s"] for r in first),
                           "first_content_s_median": float(np.median(streamed)) if streamed else None,
                           "answers_with_content": len(streamed),
                           "completion_tokens": sum(r["tokens"] for r in full),
                           "tokens_per_s": sum(r["tokens"] for r in full) / wall}
        return out
    finally:
        subprocess.run([serve, "shutdown", "-y", *address], env=env, capture_output=True, timeout=120)


def cuda_tests(env: dict, timeout_s: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    return {"returncode": proc.returncode, "summary": summary.strip("= "), **counts}


SKIPPED_BY_DESIGN = ("the training job's last checkpoint (train.final_checkpoint: false) and its promotion gate "
                     "(promote.enabled: false): a speed check needs neither")


def run_part(result: dict, name: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, its outcome recorded in `result["parts"][name]`: ok, timed out or failed (with the
    last line of the error). Returns its value, None when it did not finish."""
    t0 = time.time()
    value, status = None, "ok"
    try:
        value = fn(*args, **kwargs)
    except (subprocess.TimeoutExpired, TimeoutError) as e:
        status = f"timed out ({e.timeout:.0f} s)" if isinstance(e, subprocess.TimeoutExpired) else f"timed out ({e})"
    except Exception as e:  # noqa: BLE001 - reported in the table and JSON; the parts after it still run or skip
        lines = str(e).strip().splitlines() or [""]
        status = f"failed: {type(e).__name__}: {lines[-1][:300]}"
    result["parts"][name] = {"status": status, "seconds": round(time.time() - t0, 1)}
    log(f"{name}: {status}")
    return value


def skip_part(result: dict, name: str, why: str) -> None:
    result["parts"][name] = {"status": f"skipped: {why}", "seconds": 0.0}
    log(f"{name}: skipped: {why}")


def table(result: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"device: {result['device']}  size: {result['size']}  ({result.get('seconds', 0):.0f} s)",
             f"CUDA tests: {(result.get('cuda_tests') or {}).get('summary', '-')}", "",
             "| part | status | s |", "|---|---|---|"]
    lines += [f"| {name} | {p['status']} | {p['seconds']:.0f} |" for name, p in result["parts"].items()]
    lines += [f"not run, by design: {SKIPPED_BY_DESIGN}", "",
              "| training | workers | tokens/s | audio-s/s | MFU | peak GPU GiB | job s |",
              "|---|---|---|---|---|---|---|"]
    for t in result["training"]:
        lines.append(f"| {t['strategy']} | {t['workers']} | {f(t['tokens_per_s'], '.0f')} | "
                     f"{f(t['audio_s_per_s'], '.1f')} | {f(t['mfu'] and 100 * t['mfu'], '.1f')}% | "
                     f"{f(t['peak_gpu_gib'], '.1f')} | {t['job_s']:.0f} |")
    lines += ["", "| serving: 10 s audio + prompt | TTFT median s | TTFT max s | decode tokens/s |",
              "|---|---|---|---|"]
    for s in (result.get("serving") or {}).values():
        lines.append(f"| {s['clients']} client(s) | {s['ttft_s_median']:.3f} | {s['ttft_s_max']:.3f} | "
                     f"{s['tokens_per_s']:.1f} |")
    lines.append("TTFT: a max_tokens=1 request (prefill and one token), end to end")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="auto", choices=["auto", "tiny", "vtblender_3b"],
                    help="auto: vtblender_3b on a GPU, tiny on CPU")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 30 on a GPU, 6 on CPU)")
    ap.add_argument("--root", default=".stack/gpu-check", help="work folder (corpus, LM checkpoint, runs)")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--skip-tests", action="store_true", help="skip step 1 (the CUDA-marked tests)")
    ap.add_argument("--timeouts", default="240,900,900", metavar="TESTS,TRAIN,SERVE",
                    help="seconds each part may take: the CUDA tests, each training job, serving "
                         "(default: %(default)s)")
    args = ap.parse_args(argv)
    tests_s, train_s, serve_s = (float(x) for x in args.timeouts.split(","))
    env = dict(os.environ)
    missing = [k for k in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "MLFLOW_TRACKING_URI") if k not in env]
    if missing:
        print(f"error: {', '.join(missing)} not set: run `make gpu-check`, or `eval \"$(python -m infra.stack env)\"` "
              "on a running stack first", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    size = args.size if args.size != "auto" else ("vtblender_3b" if gpus else "tiny")
    steps = args.steps or (30 if gpus else 6)
    root = Path(args.root).resolve() / size
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    device = torch.cuda.get_device_name(0) + f" x{gpus}" if gpus else "cpu"
    result: dict = {"device": device, "size": size, "steps": steps, "torch": torch.__version__, "parts": {},
                    "not_run_by_design": SKIPPED_BY_DESIGN, "cuda_tests": None, "training": [], "serving": None}
    log(f"{device}: {size}, {steps} training steps")
    try:
        if args.skip_tests:
            skip_part(result, "CUDA tests", "--skip-tests")
        else:
            result["cuda_tests"] = run_part(result, "CUDA tests", cuda_tests, env, tests_s)
        corpus = str(root / "corpus")
        if not (root / "corpus" / "manifest.json").exists():
            run_part(result, "synthetic corpus", write_corpus, corpus, clips=64 if gpus else 16,
                     clip_s=10.0 if gpus else 2.0)
        lm_dir = run_part(result, f"random {size} LM", save_random_lm, size, root / "lm")
        for strategy, workers in [("ddp", 1)] + ([("fsdp", gpus)] if gpus >= 2 else []):
            name = f"training {strategy} x{workers}"
            if lm_dir is None:
                skip_part(result, name, "no LM checkpoint")
                continue
            raw = recipe(size, corpus, lm_dir, root, strategy, workers, gpu=bool(gpus), steps=steps)
            trained = run_part(result, name, train, raw, root, env, timeout_s=train_s)
            if trained:
                result["training"].append(trained)
                log(f"trained {strategy} x{workers}: {json.dumps(trained)}")
        if result["training"]:
            result["serving"] = run_part(result, "serving", serve_and_measure, result["training"][0]["model"], env,
                                         root, timeout_s=serve_s)
        else:
            skip_part(result, "serving", "no trained model")
    finally:  # whatever happened, what ran is reported
        result["seconds"] = time.time() - t0
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(table(result), flush=True)
        log(f"wrote {args.out}")
    return 0 if all(p["status"] == "ok" or p["status"].startswith("skipped: --") for p in result["parts"].values()) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
