"""The worker side of joint speech-text SFT on Ray Train: what each `TorchTrainer` worker runs.

Per worker: build the SpeechLM (its structure on every rank, its weights read by rank 0 alone and broadcast:
`jobs.training.model_init`; DDP by default, FSDP selectable, sharded as it is built); open one `TypeStream`
per data type over this rank's share of its shards; draw each micro-batch's data type from the ratios
(`mix_sampler`, seeded by step: identical on all ranks), with the next batches read and tensorized ahead in a
thread (`BatchPrefetcher`); step (`Trainer`); every `checkpoint_every` steps report a checkpoint (weights,
optimizer, schedule, every rank's stream states and RNG) that Ray Train restarts failed workers from. Rank 0 logs
the metrics window, the content check and, after the last stage, the model to MLflow.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.training.plan import RunPlan, StagePlan


@dataclass
class WorkerJob:
    """What the driver hands every worker of one stage (pickled by Ray as it is: no dict round trip): the run's plan
    and this stage's, resolved once by the driver; a worker derives nothing from the recipe again."""

    plan: RunPlan
    stage: StagePlan
    tokenizer_files: dict | None
    tracking_uri: str
    mlflow_run_id: str
    init_from: Any = None
    """The previous stage's last `ray.train.Checkpoint` (under storage_path, so any node can read it), or None."""
    sample_log_dir: str | None = None


def log(msg: str) -> None:
    print(f"[train] {msg}", flush=True)


def build_model(plan: RunPlan, stage: StagePlan, tokenizer_files: dict | None, device="cpu",
                read_lm_weights: bool = True):
    """The stage's SpeechLM, whole, in this process (seeded): what `prepare_model` builds on every rank, read once
    (`jobs.training.model_init`), and what rank 0 gathers a sharded model into at the end."""
    import torch

    from jobs.training.tokenizer import load_tokenizer
    from models.speechlm import build_speechlm

    torch.manual_seed(plan.run.seed)
    return build_speechlm(stage.model, device=device, tokenizer=load_tokenizer(tokenizer_files),
                          read_lm_weights=read_lm_weights)


def probe_conversation():
    """A fixed mixed-modal conversation whose logits are logged at the end, to check a loaded model against."""
    from models.conversation import AudioPart, Conversation, TextPart, Turn

    t = np.arange(16000) / 16000
    tone = (0.2 * np.sin(2 * np.pi * 220 * t) * np.hanning(16000)).astype(np.float32)
    return Conversation([Turn("user", [TextPart("Listen:"), AudioPart(tone), TextPart("What is it?")]),
                         Turn.text("assistant", "A tone.")])


def open_streams(plan: RunPlan, stage: StagePlan, rank: int, world: int, processor=None) -> dict:
    """This rank's stream of each type the stage samples, of the stage's batch size. `processor` (the model's)
    counts a row's LM positions for `data.max_sample_tokens` and the types' `max_batch_tokens` budgets: in the
    prefetch thread, a second encoding of the rows that pass (the batch's own comes after), which is cheap next to a
    training step."""
    from data_ops.mix_sampler import TypeStream
    from data_ops.shar_datasource import reads_dataset, row_to_conversation

    d = plan.data
    counts = d.max_sample_tokens or any(src.max_batch_tokens for src in d.sources.values())
    count = (lambda row: len(processor.encode(row_to_conversation(row)))) if counts else None
    return {t: TypeStream(src.uris, t, stage.batch_sizes[t], seed=plan.run.seed,
                          rank=rank, world_size=world, manifests=plan.manifests,
                          bucket_batches=d.bucket_batches, endpoint_url=d.endpoint_url,
                          open_rows=lambda reads: reads_dataset(reads).iter_rows(),
                          max_audio_s=d.max_sample_audio_s, max_tokens=d.max_sample_tokens, count_tokens=count,
                          max_batch_audio_s=src.max_batch_audio_s, max_batch_tokens=src.max_batch_tokens)
            for t, src in d.sources.items() if stage.ratios.get(t, 0) > 0}


def skipped_samples(job: WorkerJob, prefetch, world: int, device, logged: dict | None) -> dict[str, float]:
    """Collective when a cap or budget is set: samples skipped over `data.max_sample_*` or a type's
    `max_batch_*` budget by the stage's streams, per type and limit, summed over the ranks, as metrics
    `data/skipped/<type>/<limit>`. With `logged` (rank 0): one log line for each count that grew since the counts
    in `logged`, which is updated."""
    from jobs.training.distributed import reduce_over_ranks

    d = job.plan.data
    caps = {name: v for name, v in (("max_sample_audio_s", d.max_sample_audio_s),
                                    ("max_sample_tokens", d.max_sample_tokens)) if v is not None}
    limits = {t: {**caps, **{name: v for name, v in (("max_batch_audio_s", d.sources[t].max_batch_audio_s),
                                                      ("max_batch_tokens", d.sources[t].max_batch_tokens))
                             if v is not None}} for t in prefetch.consumed}
    keys = [(t, cap) for t in sorted(prefetch.consumed) for cap in limits[t]]  # the same on every rank
    if not keys:
        return {}
    mine = [float(prefetch.consumed[t].get("skipped", {}).get(cap, 0)) for t, cap in keys]
    totals = [round(v * world) for v in reduce_over_ranks(mine, world, device)]  # mean * ranks = sum
    for (t, cap), n in zip(keys, totals):
        if logged is not None and n > logged.get((t, cap), 0):
            log(f"skipped {n - logged.get((t, cap), 0)} {t} samples over {cap}={limits[t][cap]:g} ({n} in all)")
            logged[(t, cap)] = n
    return {f"data/skipped/{t}/{cap}": float(n) for (t, cap), n in zip(keys, totals)}


def build_trainer(job: WorkerJob, core, device, world: int):
    """The DDP wrapper (`jobs.training.parallel`; under FSDP `core` is sharded already), then the optimizer
    (per-module groups) over the weights as they now are (shards under FSDP), transformers' schedule, and the
    `Trainer`."""
    import torch

    from jobs.training.loop import Trainer
    from jobs.training.optim import build_optimizer, build_scheduler, module_param_groups
    from jobs.training.parallel import wrap_model
    from models.precision import training_autocast_dtype

    tr = job.plan.train
    autocast_dtype = training_autocast_dtype(device, tr.precision)  # refuses bf16 on a GPU without it, first
    # `core` comes from `prepare_model` (`model_init.build_on_ranks`): rank 0's weights, broadcast to every rank
    model = wrap_model(core, tr.strategy, world, tr.fsdp_shard_size, torch.device(device).type, weights_synced=True)
    optimizer = build_optimizer(module_param_groups(core, job.stage.module_lrs), lr=job.stage.lr,
                                betas=tr.betas, weight_decay=tr.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=tr.warmup_steps, total_steps=job.stage.max_steps,
                                schedule=tr.schedule, min_lr_ratio=tr.min_lr_ratio)
    return Trainer(model, optimizer, scheduler, grad_accum=tr.grad_accum, max_grad_norm=tr.max_grad_norm,
                   clip=tr.clip, autocast_dtype=autocast_dtype, device_type=device.type)


def resume(trainer, streams: dict, rank: int, fingerprint: str, device) -> None:
    """Continue from Ray Train's latest checkpoint, if any: weights, optimizer, schedule, streams, RNG."""
    import ray.train

    from jobs.training.distributed import set_rng_state
    from jobs.training.checkpoint import check_same_recipe, load_checkpoint, read_train_state

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return
    with checkpoint.as_directory() as d:
        # before any weight: another recipe's model may not even have the same shapes
        check_same_recipe(read_train_state(Path(d)), fingerprint, str(checkpoint.path))
        state = load_checkpoint(Path(d), trainer.model, trainer.optimizer, trainer.scheduler)
    trainer.step = state.step
    for t, s in state.streams[rank].items():
        if t in streams:
            streams[t].load_state_dict(s)
    set_rng_state(state.rng[rank], device)
    if rank == 0:
        log(f"resumed stage {state.stage} at step {state.step} from {checkpoint.path}")


def report_checkpoint(trainer, stage: str, stream_states: dict, loss: float, rank: int, world: int,
                      sharded: bool = False, fingerprint: str = "", device="cpu") -> None:
    """Collective: gather every rank's stream states and RNG, write the checkpoint (whole: on rank 0; sharded: every
    rank its shards, Ray Train merging the ranks' folders), report it."""
    import ray.train
    import torch.distributed as dist

    from jobs.training.checkpoint import TrainState, save_checkpoint
    from jobs.training.distributed import rng_state

    mine = (dict(stream_states), rng_state(device))  # a snapshot: the next step updates it
    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    state = TrainState(step=trainer.step, stage=stage, scheduler=trainer.scheduler.state_dict(),
                       streams=[g[0] for g in gathered], rng=[g[1] for g in gathered], recipe=fingerprint)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d), trainer.model, trainer.optimizer, state, rank == 0, sharded=sharded)
        ray.train.report({"step": trainer.step, "stage": stage, "loss": loss},
                         checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 or sharded else None)


def log_window(window, job: WorkerJob, trainer, prefetch, rank: int, world: int, logger, progress,
               peak_flops: float | None = None, device="cpu", skips_logged: dict | None = None) -> None:
    """Collective (the loss is averaged over ranks, GPU memory maxed, skipped samples summed); rank 0 logs the
    window to MLflow and one console line (and one per grown count of samples skipped over a cap)."""
    import torch

    from jobs.training.distributed import reduce_over_ranks

    (loss,) = reduce_over_ranks([window.mean_loss], world, device)
    skipped = skipped_samples(job, prefetch, world, device, skips_logged if rank == 0 else None)
    gpu_gib = None
    if torch.device(device).type == "cuda":
        (gpu_gib,) = reduce_over_ranks([torch.cuda.max_memory_allocated(device) / 2**30], world, device, op="max")
    if rank != 0:
        return
    prefix = job.stage.metric_prefix
    metrics = window.metrics(world=world, prefix=prefix, loss=loss)
    if peak_flops:
        metrics["perf/mfu"] = metrics["perf/model_tflops_per_s"] * 1e12 / (peak_flops * world)
    if gpu_gib is not None:
        metrics["gpu/max_memory_allocated_gib"] = gpu_gib  # the largest of any rank
    metrics[f"{prefix}lr"] = trainer.scheduler.get_last_lr()[0]
    metrics["data/error_rows"] = float(prefetch.error_rows())
    metrics.update(skipped)
    logger.log_metrics(metrics, step=trainer.step + job.stage.step_offset)
    by_type = ", ".join(f"{t} {metrics[f'{prefix}loss/{t}']:.3f}" for t in sorted(window.by_type))
    log(f"{job.stage.name} step {trainer.step}/{job.stage.max_steps} loss {loss:.4f} ({by_type}) "
        f"{metrics['throughput/samples_per_s']:.1f} samples/s {metrics['throughput/audio_s_per_s']:.1f} audio-s/s "
        f"data-wait {100 * metrics['data/wait_share']:.0f}% "
        + (f"MFU {100 * metrics['perf/mfu']:.1f}% " if "perf/mfu" in metrics else "")
        + (f"GPU mem {gpu_gib:.1f} GiB " if gpu_gib is not None else "") + progress(trainer.step))


def log_final_model(job: WorkerJob, core, rank: int, logger, stream_states: dict) -> None:
    """Collective. The model as the run's `model` artifact (save_pretrained), the probe conversation's logits (to
    check a loaded copy against) and the final stream states, from rank 0. A sharded model is first gathered in
    full on rank 0 into an unsharded copy, which saves as a plain model."""
    import torch

    from jobs.training.parallel import full_state_dict, is_sharded
    from models.processor import move_batch

    from models.precision import cast_frozen_weights

    if is_sharded(core):
        weights = full_state_dict(core)
        if rank != 0:
            return
        # every weight comes from the gathered state: a pretrained LM's files are not read again
        core = build_model(job.plan, job.stage, job.tokenizer_files, read_lm_weights=False)
        core.load_state_dict(weights)  # into fp32 weights: bf16 frozen ones are widened
    elif rank != 0:
        return
    # the saved model is fp32 throughout, as every loader expects, and its probe logits are an fp32 model's (the
    # frozen weights trained in bf16: widening them is exact)
    cast_frozen_weights(core, torch.float32)
    core.eval()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "model"
        core.save_pretrained(out)
        logger.log_artifacts(str(out), "model")
        with torch.no_grad():
            batch = move_batch(core.processor([probe_conversation()]), core.device)
            batch.pop("labels")  # with labels the model computes the loss, not the logits
            logits = core(**batch).logits.float().cpu().numpy()
        np.save(Path(d) / "probe_logits.npy", logits)
        logger.log_artifact(str(Path(d) / "probe_logits.npy"))
    logger.log_dict(stream_states, "final_stream_states.json")


class SampleLog:
    """One JSON line per micro-batch on this rank: step, micro, data type, sample ids and loss (`--sample-log-dir`:
    an audit of the mix, and of a resume, which must replay the same samples with the same losses). It reads every
    loss as it is written: a host sync per step, the price of the audit."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")

    def write(self, micro_batches, losses: list) -> None:
        from jobs.training.metrics import as_floats

        for mb, loss in zip(micro_batches, as_floats(losses)):
            self.file.write(json.dumps({"step": mb.step, "micro": mb.micro, "type": mb.data_type,
                                        "ids": [r["id"] for r in mb.rows], "loss": loss}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Progress:
    """`step 40/100 ... ETA 12 s [30/90 steps this attempt]`: the rate of this attempt, not since step 0."""

    def __init__(self, start_step: int, max_steps: int):
        self.start, self.max, self.t0 = start_step, max_steps, time.perf_counter()

    def __call__(self, step: int) -> str:
        done = step - self.start
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        eta = (self.max - step) / rate if rate > 0 else float("inf")
        return f"ETA {eta:.0f} s [{done}/{self.max - self.start} steps this attempt]"


def prepare_model(job: WorkerJob, rank: int, world: int, device):
    """The stage's model on `device` (sharded under FSDP), its weights read by rank 0 alone and broadcast
    (`jobs.training.model_init`): the pretrained ones, then the previous stage's, if any; its FLOP curves and
    peak (for MFU), and its `Trainer`; then this rank's own random seed."""
    import contextlib

    import torch

    from jobs.training.distributed import worker_seed
    from jobs.training.flops import count_forward_flops, peak_flops_per_s
    from jobs.training.model_init import build_on_ranks
    from jobs.training.tokenizer import load_tokenizer

    from models.loss import answer_loss_kind
    from models.precision import cast_frozen_weights, training_autocast_dtype

    tr = job.plan.train
    autocast_dtype = training_autocast_dtype(device, tr.precision)

    def prepare(core):  # on the model's structure, before sharding
        if autocast_dtype is not None:
            # frozen weights in the compute dtype (half the memory, no per-step casts); trainable ones and Adam fp32
            cast_frozen_weights(core, autocast_dtype)
        if tr.activation_checkpointing:
            from models.activation_checkpointing import enable_activation_checkpointing

            enable_activation_checkpointing(core)  # before sharding: FSDP's hooks then sit outside each recompute

    # the previous stage's checkpoint: a local copy on rank 0's node only, the others receive the weights
    init = job.init_from.as_directory() if job.init_from is not None and rank == 0 else contextlib.nullcontext()
    with init as init_dir:
        core, flops = build_on_ranks(job.stage.model, load_tokenizer(job.tokenizer_files), job.plan.run.seed, rank,
                                     world, device,
                                     sharded=tr.strategy == "fsdp", shard_size=tr.fsdp_shard_size,
                                     prepare=prepare,
                                     init_dir=Path(init_dir) if init_dir else None,
                                     measure=count_forward_flops)  # on rank 0's whole model, sent to every rank
    peak = peak_flops_per_s(device, tr.peak_tflops)
    trainer = build_trainer(job, core, device, world)
    if rank == 0:  # once per stage: a GPU run without Liger's fused loss says so, and why
        log(f"answer loss: {answer_loss_kind(core.lm.get_output_embeddings(), device)}")
    # every rank has the same weights (rank 0's); from here on each draws its own random numbers (dropout)
    torch.manual_seed(worker_seed(job.plan.run.seed, rank))
    return core, trainer, flops, peak


def content_monitor(job: WorkerJob, rank: int, sharded: bool):
    """(probe conversations, `ContentMonitor`) of the content check; no probe when this rank takes no part or the
    stage trains no ASR. Under FSDP every rank takes part (each forward gathers the shards)."""
    from jobs.common.content import ContentMonitor, content_probe

    data = job.plan.data
    asr_src = data.sources.get("asr_ast")
    probe = (content_probe(asr_src.uris[:1], data.endpoint_url, manifests=job.plan.manifests)
             if (rank == 0 or sharded) and asr_src and job.stage.ratios.get("asr_ast", 0) > 0 else [])
    return probe, ContentMonitor(probe, job.plan.train.warmup_steps, log=log if rank == 0 else lambda _: None)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function; `config["job"]` is the stage's `WorkerJob`."""
    import os

    import ray.train
    import ray.train.torch

    from data_ops.mix_sampler import mix_sampler
    from data_ops.shar_datasource import row_to_conversation
    from jobs.training.batches import BatchPrefetcher
    from jobs.common.console import quiet_console, quiet_ray_data
    from jobs.training.metrics import MetricsWindow
    from tracking.logs import MlflowRunLogger
    from models.processor import move_batch

    quiet_console(os.environ)
    job: WorkerJob = config["job"]
    plan, stage, tr = job.plan, job.stage, job.plan.train
    quiet_ray_data()  # one small dataset per shard read plan: a progress block for each would bury the log
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    core, trainer, flops, peak = prepare_model(job, rank, world, device)
    sharded = tr.strategy == "fsdp"
    streams = open_streams(plan, stage, rank, world, core.processor)
    resume(trainer, streams, rank, plan.fingerprint, device)  # checkpoints say which recipe wrote them
    prefetch = BatchPrefetcher(streams, mix_sampler(stage.ratios, plan.run.seed),
                               lambda rows: core.processor([row_to_conversation(r) for r in rows]),
                               start_step=trainer.step, grad_accum=tr.grad_accum)

    probe, check_content = content_monitor(job, rank, sharded)
    check_every = tr.content_check_every or tr.checkpoint_every
    sample_log = SampleLog(Path(job.sample_log_dir) / f"{stage.name}-rank{rank}.jsonl") if job.sample_log_dir else None
    logger = MlflowRunLogger(job.tracking_uri, job.mlflow_run_id, system_metrics=True) if rank == 0 else None
    window, progress = MetricsWindow(), Progress(trainer.step, stage.max_steps)
    skips_logged: dict = {}  # (type, cap) -> skipped samples already in the log
    trainer.model.train()
    try:
        while trainer.step < stage.max_steps:
            micro_batches = [prefetch.next() for _ in range(tr.grad_accum)]
            batches = (move_batch(mb.batch, device) for mb in micro_batches)
            micro_losses = []  # device tensors: read when the window is logged
            step_loss = trainer.train_step(batches, on_micro=lambda i, loss, out=micro_losses: out.append(loss))
            for mb, loss in zip(micro_batches, micro_losses):
                window.add_batch(mb.stats(loss, flops))
            window.add_step(step_loss)
            if sample_log:
                sample_log.write(micro_batches, micro_losses)
            step, last = trainer.step, trainer.step == stage.max_steps
            if step % tr.log_every == 0 or last:
                log_window(window, job, trainer, prefetch, rank, world, logger, progress, peak, device, skips_logged)
                window = MetricsWindow()
            if probe and (step % check_every == 0 or last):
                content = check_content(core, step)
                if logger:
                    logger.log_metrics(content, step=step + stage.step_offset)
            if step % tr.checkpoint_every == 0 or (last and tr.final_checkpoint):
                report_checkpoint(trainer, stage.name, prefetch.consumed, float(step_loss), rank, world, sharded,
                                  plan.fingerprint, device)
        if stage.final:
            log_final_model(job, core, rank, logger, prefetch.consumed)
    finally:
        prefetch.close()
        if sample_log:
            sample_log.close()
        if logger:
            logger.close()
