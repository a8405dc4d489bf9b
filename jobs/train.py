"""Single-stage joint speech-text SFT (VoiceTextBlender) on Ray Train, tracked in MLflow.

    ray job submit --working-dir . -- python -m jobs.train --config jobs/recipes/tiny.yaml

The recipe, top to bottom:
1. driver: validate the recipe and its data (before any worker starts), find or create the MLflow run of this run
   name (the same run across restarts and resubmissions), build the offline tokenizer when the LM has none;
2. per stage: a `TorchTrainer` whose workers each
   - build the SpeechLM (same seed on every rank; DDP by default, FSDP selectable),
   - open one `TypeStream` per data type: a Ray Data dataset over this rank's share of that type's Shar shards,
     duration-grouped batches of the type's batch size, exact position in its state,
   - draw each micro-batch's data type from the recipe's ratios (`mix_sampler`, seeded by step: identical on all
     ranks), forward/backward under bf16 autocast on GPU (fp32 on CPU), accumulate, clip, step Adam + schedule,
   - every `checkpoint_every` steps report a checkpoint holding trainable weights, optimizer, scheduler, step,
     torch RNG and every rank's stream states; Ray Train restarts failed workers from it (`FailureConfig`);
   - rank 0 logs loss (overall and per type), lr, throughput, padding, data wait, errors to MLflow;
3. driver: after the last stage, rank 0 has logged the model (save_pretrained: PEFT adapter, encoder/adapter
   safetensors, tokenizer, config) as the run's `model` artifact; the driver registers it with an alias.

Why each rank reads its own shards instead of `get_dataset_shard`: Ray Data's `streaming_split` hands rows to
whichever rank asks first, so no rank knows which rows it will get after a restart and an epoch cannot resume
mid-way (ray #37633); it also cannot reshuffle shard order per epoch. Here every rank plans its own share of each
epoch's seeded shard order (`plan_reads`) and streams it through Ray Data (one read task per shard, ordered), so a
checkpoint's stream states say exactly what was consumed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.recipe import Recipe, RecipeError, StageSection, check_data, load_recipe, parse_recipe

CKPT_WEIGHTS, CKPT_OPTIM, CKPT_STATE = "trainable.safetensors", "optimizer.pt", "train_state.json"
RUN_TAG = "vtb.run_name"
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE")


# ---------------------------------------------------------------------------------------------------------------
# Pieces used by the workers (and by bench/ for the plain-PyTorch baseline)
# ---------------------------------------------------------------------------------------------------------------

def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float):
    """Linear warm-up, then cosine decay to `min_ratio` of the peak (or constant)."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def write_tokenizer_files(tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_text() for p in Path(d).iterdir() if p.is_file()}


def load_tokenizer_files(files: dict[str, str] | None):
    if not files:
        return None
    from transformers import AutoTokenizer

    d = tempfile.mkdtemp(prefix="vtb-tok-")
    for name, text in files.items():
        (Path(d) / name).write_text(text)
    return AutoTokenizer.from_pretrained(d)


def build_model(recipe: Recipe, stage: StageSection, tokenizer_files: dict | None, device="cpu"):
    """The stage's SpeechLM, identical on every rank (seeded)."""
    import torch

    from models.speechlm import build_speechlm

    torch.manual_seed(recipe.run.seed)
    cfg = recipe.model.speechlm_config(stage.lm_mode)
    return build_speechlm(cfg, device=device, tokenizer=load_tokenizer_files(tokenizer_files))


def probe_conversation():
    """A fixed mixed-modal conversation whose logits are logged at the end, to check a loaded model against."""
    from models.conversation import AudioPart, Conversation, TextPart, Turn

    t = np.arange(16000) / 16000
    tone = (0.2 * np.sin(2 * np.pi * 220 * t) * np.hanning(16000)).astype(np.float32)
    return Conversation([Turn("user", [TextPart("Listen:"), AudioPart(tone), TextPart("What is it?")]),
                         Turn.text("assistant", "A tone.")])


def module_param_groups(model, train) -> list[dict]:
    """AdamW parameter groups, one per module that trains (encoder, adapter, lm), each at its peak lr."""
    lrs = train.module_lrs()
    groups = []
    for name, module in (("encoder", model.encoder), ("adapter", model.adapter), ("lm", model.lm)):
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"name": name, "params": params, "lr": lrs[name]})
    return groups


def clip_gradients(optimizer, train) -> None:
    """Clip to `train.max_grad_norm`: one norm over all trainable weights, or each module's on its own."""
    import torch

    if not train.max_grad_norm:
        return
    if train.clip == "global":
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], train.max_grad_norm)
    else:
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], train.max_grad_norm)


# Below this the right audio lowers the answers' loss by less than 0.05 nats per token against another utterance
# of the same length: the LM answers as if it had heard nothing (a model that reads the audio is well above 0.5).
CONTENT_GAP_FLOOR = 0.05
CONTENT_PROBE_SIZE = 16


def content_probe(recipe: Recipe, ratios: dict[str, float]) -> list:
    """A fixed set of speech conversations (the first ASR/AST rows of the corpus) for the content check; empty
    when the stage samples no ASR/AST data."""
    from data_ops.shar_datasource import is_error_row, iter_corpus_rows, row_to_conversation

    src = recipe.data.sources.get("asr_ast")
    if src is None or ratios.get("asr_ast", 0) <= 0:
        return []
    probe = []
    for row in iter_corpus_rows(src.uris[0], "asr_ast", endpoint_url=recipe.data.endpoint_url):
        if not is_error_row(row):
            probe.append(row_to_conversation(row))
        if len(probe) == CONTENT_PROBE_SIZE:
            break
    return probe if len(probe) >= 2 else []  # the check swaps audio between conversations: one is not enough


def check_content(model, probe: list, step: int, warn: bool) -> dict[str, float]:
    """The content check (`models.content_check`) on the probe: metrics to log, and a warning in the job log
    when the audio path carries no content."""
    from models.content_check import content_gap

    result = content_gap(model, probe)
    print(f"[train] step {step}: content gap {result.gap:.3f} nats/token (loss {result.matched:.3f} with the right "
          f"audio, {result.other:.3f} with another utterance of the same length, {result.reversed:.3f} reversed)",
          flush=True)
    if warn and result.gap < CONTENT_GAP_FLOOR:
        print(f"[train] WARNING: the audio path carries no content (content gap {result.gap:.3f} < "
              f"{CONTENT_GAP_FLOOR}): the model answers the same whatever is said. Check the encoder's init or "
              "checkpoint, and lower encoder_lr / adapter_lr (docs/ablation.md).", flush=True)
    return result.metrics()


def batch_stats(rows: list[dict], batch: dict) -> dict:
    from data_ops.mix_sampler import padded_share

    durations = [r["duration"] for r in rows if r["num_samples"]]
    return {"samples": len(rows), "audio_s": sum(durations), "tokens": int(batch["attention_mask"].sum()),
            "padded_share": padded_share(durations) if durations else None}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, stage: str, stream_states: list,
                    rng_states: list, is_rank0: bool) -> None:
    """Collective: every rank calls it (full state dicts gather on rank 0); rank 0 writes the files."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_rank0:
        return
    path.mkdir(parents=True, exist_ok=True)
    # clone: tied weights (embeddings = LM head when the LM trains fully) share storage, which safetensors refuses
    save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, str(path / CKPT_WEIGHTS))
    torch.save(optim, path / CKPT_OPTIM)
    (path / CKPT_STATE).write_text(json.dumps({
        "step": step, "stage": stage, "scheduler": scheduler.state_dict(), "streams": stream_states,
        "rng": rng_states}))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer and scheduler in place; return the train state (step, streams, rng)."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, load_file(str(path / CKPT_WEIGHTS)), options=opts)
    optim = torch.load(path / CKPT_OPTIM, weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    state = json.loads((path / CKPT_STATE).read_text())
    scheduler.load_state_dict(state["scheduler"])
    return state


def load_initial_weights(model, path: Path) -> int:
    """Start a stage from the previous stage's trainable weights (e.g. B3: frozen-LM stage, then LoRA)."""
    from safetensors.torch import load_file

    def canonical(name: str) -> str:  # the same weight with or without PEFT's LoRA wrapping
        return name.replace("base_model.model.", "").replace(".base_layer", "")

    init = {canonical(k): v for k, v in load_file(str(path / CKPT_WEIGHTS)).items()}
    loaded = 0
    for name, param in model.named_parameters():
        tensor = init.get(canonical(name))
        if tensor is not None and param.shape == tensor.shape:
            param.data.copy_(tensor)
            loaded += 1
    if loaded == 0:
        raise RuntimeError(f"none of the weights in {path} fit this model")
    return loaded


# ---------------------------------------------------------------------------------------------------------------
# The worker loop
# ---------------------------------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    import mlflow
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from data_ops.mix_sampler import TypeStream, mix_sampler
    from data_ops.shar_datasource import reads_dataset, row_to_conversation

    import ray.data

    recipe = parse_recipe(config["recipe"])
    stage = StageSection(**config["stage"])
    tr = recipe.train
    data_ctx = ray.data.DataContext.get_current()  # this worker's streams: no progress bars in the job log
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    bf16 = tr.precision == "bf16" or (tr.precision == "auto" and on_gpu)

    model = build_model(recipe, stage, config["tokenizer_files"], device)
    core = model
    if config.get("init_from"):
        load_initial_weights(core, Path(config["init_from"]))
    groups = module_param_groups(core, tr)
    # Adam with decoupled weight decay (AdamW), as NeMo's default fused Adam (adam_w_mode) that the paper used
    optimizer = torch.optim.AdamW(groups, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tr.warmup_steps, stage.max_steps, tr.schedule, tr.min_lr_ratio))
    if tr.strategy == "fsdp":
        model = ray.train.torch.prepare_model(model, parallel_strategy="fsdp",
                                              parallel_strategy_kwargs={"use_orig_params": True})
    elif world > 1:
        # text-only batches leave the encoder and adapter without gradients: DDP must allow unused parameters
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    ratios = stage.ratios or recipe.data.ratios
    streams = {
        t: TypeStream(src.uris, t, src.batch_size, seed=recipe.run.seed, rank=rank, world_size=world,
                      bucket_batches=recipe.data.bucket_batches, endpoint_url=recipe.data.endpoint_url,
                      open_rows=lambda reads: reads_dataset(reads).iter_rows())
        for t, src in recipe.data.sources.items() if ratios.get(t, 0) > 0
    }
    draw = mix_sampler(ratios, recipe.run.seed)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d), model, optimizer, scheduler)
        step = int(state["step"])
        for t, s in state["streams"][rank].items():
            if t in streams:
                streams[t].load_state_dict(s)
        torch.set_rng_state(torch.tensor(state["rng"][rank], dtype=torch.uint8))
        if rank == 0:
            print(f"[train] resumed stage {stage.name} at step {step} from {checkpoint.path}", flush=True)

    probe = content_probe(recipe, ratios) if rank == 0 and tr.strategy != "fsdp" else []
    check_every = tr.content_check_every or tr.checkpoint_every

    sample_log = None
    if config.get("sample_log_dir"):
        Path(config["sample_log_dir"]).mkdir(parents=True, exist_ok=True)
        sample_log = open(Path(config["sample_log_dir"]) / f"{stage.name}-rank{rank}.jsonl", "a")

    run = None
    if rank == 0:
        mlflow.set_tracking_uri(config["tracking_uri"])
        run = mlflow.start_run(run_id=config["mlflow_run_id"], log_system_metrics=True)
    prefix = "" if len(recipe.stage_list()) == 1 else f"{stage.name}/"
    step_offset = config.get("step_offset", 0)  # stages log on one step axis
    window: dict = {"t0": time.perf_counter(), "data_s": 0.0, "samples": 0, "audio_s": 0.0, "tokens": 0, "steps": 0,
                    "pad": [], "loss": [], "by_type": {}}
    start_step, t_start = step, time.perf_counter()
    model.train()
    try:
        while step < stage.max_steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(tr.grad_accum):
                dtype_name = draw(step, micro)
                t0 = time.perf_counter()
                rows = streams[dtype_name].next_batch()
                convs = [row_to_conversation(r) for r in rows]
                batch = {k: v.to(device) for k, v in core.processor(convs).items()}
                window["data_s"] += time.perf_counter() - t0
                stats = batch_stats(rows, batch)
                sync = tr.grad_accum == 1 or micro == tr.grad_accum - 1 or not hasattr(model, "no_sync")
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = model(**batch).loss
                    if loss.requires_grad:
                        (loss / tr.grad_accum).backward()
                    # else: nothing trainable took part (a text batch with a frozen LM): the batch only counts
                    # in the loss metrics; every rank drew the same type, so they all skip alike
                value = loss.detach().float().item()
                step_loss += value / tr.grad_accum
                window["by_type"].setdefault(dtype_name, []).append(value)
                window["samples"] += stats["samples"]
                window["audio_s"] += stats["audio_s"]
                window["tokens"] += stats["tokens"]
                if stats["padded_share"] is not None:
                    window["pad"].append(stats["padded_share"])
                if sample_log:
                    sample_log.write(json.dumps({"step": step, "micro": micro, "type": dtype_name,
                                                 "ids": [r["id"] for r in rows]}) + "\n")
            clip_gradients(optimizer, tr)
            optimizer.step()
            scheduler.step()
            step += 1
            window["loss"].append(step_loss)
            window["steps"] += 1
            if sample_log:
                sample_log.flush()

            if step % tr.log_every == 0 or step == stage.max_steps:
                _log_window(window, step, step_offset, stage, scheduler, streams, rank, world, run, prefix,
                            start_step, t_start, dist)
            if probe and (step % check_every == 0 or step == stage.max_steps):
                mlflow.log_metrics(check_content(core, probe, step, warn=step > tr.warmup_steps),
                                   step=step + step_offset)
            if step % tr.checkpoint_every == 0 or step == stage.max_steps:
                stream_states = {t: s.state_dict() for t, s in streams.items()}
                gathered = [None] * world
                rng = torch.get_rng_state().tolist()
                if world > 1:
                    dist.all_gather_object(gathered, (stream_states, rng))
                else:
                    gathered = [(stream_states, rng)]
                with tempfile.TemporaryDirectory() as d:
                    save_checkpoint(Path(d), model, optimizer, scheduler, step, stage.name,
                                    [g[0] for g in gathered], [g[1] for g in gathered], rank == 0)
                    metrics = {"step": step, "stage": stage.name, "loss": window.get("last_loss", step_loss)}
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)

        if rank == 0 and config.get("final"):
            _log_final_model(core, run, streams)
    finally:
        if sample_log:
            sample_log.close()
        if run is not None:
            mlflow.end_run()


def _log_window(window, step, step_offset, stage, scheduler, streams, rank, world, run, prefix, start_step,
                t_start, dist) -> None:
    import mlflow
    import torch

    elapsed = time.perf_counter() - window["t0"]
    loss = float(np.mean(window["loss"])) if window["loss"] else float("nan")
    by_type = {t: float(np.mean(v)) for t, v in window["by_type"].items()}
    if world > 1:  # average loss over ranks (each rank saw different samples)
        t = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(t)
        loss = float(t.item()) / world
    window["last_loss"] = loss
    if rank == 0:
        done, total = step - start_step, stage.max_steps - start_step
        rate = done / max(1e-9, time.perf_counter() - t_start)
        eta = (stage.max_steps - step) / rate if rate > 0 else float("inf")
        metrics = {
            f"{prefix}loss": loss, f"{prefix}lr": scheduler.get_last_lr()[0],
            "throughput/samples_per_s": window["samples"] * world / elapsed,
            "throughput/audio_s_per_s": window["audio_s"] * world / elapsed,
            "throughput/tokens_per_s": window["tokens"] * world / elapsed,
            "throughput/steps_per_s": window["steps"] / elapsed,
            "data/wait_share": window["data_s"] / elapsed,
            "data/error_rows": float(sum(sum(s.errors.values()) for s in streams.values())),
        }
        if window["pad"]:
            metrics["data/padded_share"] = float(np.mean(window["pad"]))
        for t, v in by_type.items():
            metrics[f"{prefix}loss/{t}"] = v
            metrics[f"mix/{t}_batches"] = float(len(window["by_type"][t]))
        mlflow.log_metrics(metrics, step=step + step_offset)
        print(f"[train] {stage.name} step {step}/{stage.max_steps} loss {loss:.4f} "
              f"({', '.join(f'{t} {v:.3f}' for t, v in sorted(by_type.items()))}) "
              f"{metrics['throughput/samples_per_s']:.1f} samples/s {metrics['throughput/audio_s_per_s']:.1f} audio-s/s "
              f"data-wait {100 * metrics['data/wait_share']:.0f}% ETA {eta:.0f} s "
              f"[{done}/{total} steps this attempt]", flush=True)
    window.update({"t0": time.perf_counter(), "data_s": 0.0, "samples": 0, "audio_s": 0.0, "tokens": 0, "steps": 0,
                   "pad": [], "loss": [], "by_type": {}})


def _log_final_model(core, run, streams) -> None:
    import mlflow
    import torch

    core.eval()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "model"
        core.save_pretrained(out)
        mlflow.log_artifacts(str(out), "model")
        with torch.no_grad():
            batch = core.processor([probe_conversation()])
            batch = {k: v.to(next(core.parameters()).device) for k, v in batch.items()}
            logits = core(**batch).logits.float().cpu().numpy()
        np.save(Path(d) / "probe_logits.npy", logits)
        mlflow.log_artifact(str(Path(d) / "probe_logits.npy"))
    mlflow.log_dict({t: s.state_dict() for t, s in streams.items()}, "final_stream_states.json")


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------

def resolve_tracking_uri(recipe: Recipe) -> str:
    uri = recipe.run.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RecipeError("no MLflow tracking server: set run.tracking_uri in the recipe or MLFLOW_TRACKING_URI")
    if not (uri.startswith(("http://", "https://", "databricks")) or uri.startswith("sqlite:////")
            or uri.startswith("file:/")):
        raise RecipeError(f"run.tracking_uri {uri!r} must be absolute (http(s)://... or sqlite:////abs/path): "
                          "Ray Train workers run in their own working directories")
    return uri


def flat_params(recipe: Recipe) -> dict[str, str]:
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(obj)[:6000] if not isinstance(obj, str) else obj[:6000]

    walk("", recipe.model_dump(mode="json"))
    return out


def mlflow_run_for(recipe: Recipe, tracking_uri: str, data_summary: dict) -> str:
    """The MLflow run of this run name: found by tag (resubmission) or created with the recipe as params."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.set_experiment(recipe.run.experiment)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{recipe.run.name}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp.experiment_id, run_name=recipe.run.name, tags={RUN_TAG: recipe.run.name})
    params = flat_params(recipe)
    params.update({f"data_summary.{t}.{k}": str(v) for t, d in data_summary.items() for k, v in d.items()})
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
    return run.info.run_id


def tokenizer_files_for(recipe: Recipe) -> dict | None:
    """An offline tokenizer trained on the corpora's text when the LM names none (tiny / random-init LMs).

    It reads every data type of every corpus the recipe names, not only the types this recipe samples: a text-only
    recipe (the ablation's text LM) must still get a vocabulary that covers the transcripts and translations its
    LM will later be trained to write, as a real LM's tokenizer covers the languages it will be asked about.
    Otherwise those words fall apart into single letters and transcription becomes spelling.
    """
    from data_ops.shar_datasource import iter_cut_dicts
    from data_ops.shards import read_manifest
    from models.tokenizer import build_tiny_tokenizer

    cfg = recipe.model.speechlm_config()
    if cfg.lm.tokenizer or cfg.lm.pretrained:
        return None
    texts = []
    uris = dict.fromkeys(uri for src in recipe.data.sources.values() for uri in src.uris)
    for uri in uris:
        for dtype in read_manifest(uri, recipe.data.endpoint_url).types:
            for i, cut in enumerate(iter_cut_dicts(uri, dtype, endpoint_url=recipe.data.endpoint_url)):
                if i >= 2000:
                    break
                for turn in cut["custom"]["conversation"]["turns"]:
                    texts += [p.get("text", "") for p in turn["parts"] if p.get("type") == "text"]
    return write_tokenizer_files(build_tiny_tokenizer(texts, vocab_size=recipe.model.tokenizer_vocab_size))


def ray_storage(path: str, endpoint_url: str | None):
    """(storage_path, storage_filesystem) for RunConfig: local paths as they are, s3:// through pyarrow with the
    configured endpoint (MinIO, moto, ...)."""
    if not path.startswith("s3://"):
        return str(Path(path).expanduser().resolve()), None
    import pyarrow.fs

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return path, None
    scheme, _, host = endpoint.partition("://")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme,
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return path[len("s3://"):], fs


def register_model(recipe: Recipe, tracking_uri: str, run_id: str) -> str | None:
    """Register the run's `model` artifact as a new version of `run.registered_model` with `run.alias`; return
    its URI `models:/name/version` (None without a registered_model)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name = recipe.run.registered_model
    if not name:
        return None
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="VoiceTextBlender SpeechLM (vtblender)")
    run = client.get_run(run_id)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                          tags={RUN_TAG: recipe.run.name})
    client.set_registered_model_alias(name, recipe.run.alias, version.version)
    return f"models:/{name}/{version.version}"


def absolute_paths(recipe: Recipe) -> Recipe:
    """Local corpus, storage and checkpoint paths made absolute (workers run in other directories)."""
    def fix(p: str) -> str:
        return p if "://" in p else str(Path(p).expanduser().resolve())

    obj = recipe.model_dump(mode="json")
    obj["run"]["storage_path"] = fix(obj["run"]["storage_path"])
    for key in ("lm_pretrained", "encoder_pretrained"):  # local checkpoints; hub ids stay as they are
        if obj["model"].get(key) and Path(obj["model"][key]).expanduser().exists():
            obj["model"][key] = fix(obj["model"][key])
    for src in obj["data"]["sources"].values():
        src["uris"] = [fix(u) for u in src["uris"]]
    return parse_recipe(obj)


def run_training(recipe: Recipe, *, sample_log_dir: str | None = None) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    recipe = absolute_paths(recipe)
    data_summary = check_data(recipe)
    tracking_uri = resolve_tracking_uri(recipe)
    print(f"[train] recipe OK; data: {json.dumps(data_summary)}", flush=True)
    run_id = mlflow_run_for(recipe, tracking_uri, data_summary)
    tokenizer_files = tokenizer_files_for(recipe)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    need = recipe.train.num_workers * recipe.train.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0.0)
    # Ray Data's read tasks need CPU too: a fixed cluster that fits the workers exactly would hang, not fail. (A
    # cluster with fewer CPUs than the workers need is left alone: an autoscaler adds nodes, or Ray Train waits.)
    if need <= have < need + 0.5:
        raise RecipeError(f"the Ray cluster has {have:g} CPUs and the recipe's {recipe.train.num_workers} workers take "
                          f"{need:g}, leaving none for the Ray Data tasks that read the shards; use fewer workers or "
                          "cpus_per_worker, or a larger cluster (the local stack: --ray-num-cpus)")
    storage_path, fs = ray_storage(recipe.run.storage_path, recipe.data.endpoint_url)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    stages = recipe.stage_list()
    init_from, offset, result = None, 0, None
    for i, stage in enumerate(stages):
        name = recipe.run.name if len(stages) == 1 else f"{recipe.run.name}-{stage.name}"
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "recipe": recipe.model_dump(mode="json"), "stage": stage.model_dump(mode="json"),
                "tokenizer_files": tokenizer_files, "tracking_uri": tracking_uri, "mlflow_run_id": run_id,
                "init_from": init_from, "final": i == len(stages) - 1, "step_offset": offset,
                "sample_log_dir": sample_log_dir,
            },
            scaling_config=ScalingConfig(num_workers=recipe.train.num_workers, use_gpu=recipe.train.use_gpu,
                                         resources_per_worker={"CPU": recipe.train.cpus_per_worker}),
            run_config=RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=recipe.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=recipe.train.keep_checkpoints),
                worker_runtime_env={"env_vars": env},
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        offset += stage.max_steps
        if i < len(stages) - 1:  # the next stage starts from this one's weights (local copy for the workers)
            init_from = result.checkpoint.to_directory(tempfile.mkdtemp(prefix=f"vtb-{stage.name}-"))
    registered = register_model(recipe, tracking_uri, run_id)
    return {"run_id": run_id, "tracking_uri": tracking_uri, "registered": registered,
            "checkpoint": result.checkpoint.path if result and result.checkpoint else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="recipe YAML (jobs/recipes/*.yaml)")
    ap.add_argument("--name", help="override run.name (resubmitting with the same name resumes)")
    ap.add_argument("--tracking-uri", help="MLflow server (overrides run.tracking_uri and $MLFLOW_TRACKING_URI)")
    ap.add_argument("--check", action="store_true", help="validate the recipe and its data, then stop")
    ap.add_argument("--sample-log-dir", help="write every step's sample ids per rank here (audit of mixing/resume)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        recipe = load_recipe(args.config)
        overrides = {k: v for k, v in (("name", args.name), ("tracking_uri", args.tracking_uri)) if v}
        if overrides:
            recipe = parse_recipe({**recipe.model_dump(mode="json"), "run": {**recipe.run.model_dump(), **overrides}})
        if args.check:
            print(json.dumps(check_data(recipe), indent=1))
            return 0
        out = run_training(recipe, sample_log_dir=args.sample_log_dir)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ui = out["tracking_uri"].rstrip("/")
    print(f"[train] done in {time.time() - t0:.0f} s")
    print(f"[train] MLflow run {out['run_id']}: {ui}/#/experiments (run name {recipe.run.name})")
    if out["registered"]:
        print(f"[train] registered model: models:/{recipe.run.registered_model}@{recipe.run.alias} "
              f"({out['registered']})")
    print(f"[train] last checkpoint: {out['checkpoint']}")
    if os.environ.get("RAY_ADDRESS", "").startswith("http"):
        print(f"[train] Ray dashboard: {os.environ['RAY_ADDRESS']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
