"""Benchmark (not a test): the training job vs. a plain in-process PyTorch loop, same tiny model, same data.

    python -m bench.train_throughput [--corpus DIR] [--steps 60] [--workers 1]

Prints, in one run:
- steps/s of a plain loop (one process, shards read in-process, same streams, sampler, model and optimizer) and
  of the Ray Train + Ray Data job (from the job's own MLflow throughput metrics, first window dropped as warm-up),
  and their ratio;
- the share of step time spent waiting for data in each;
- the same two loops again with budget batches on the speech types (`max_batch_audio_s`, `--no-budget-run` skips
  them), and their ratio: the budget path must not slow the job against the plain loop;
- the padded share of speech frames per batch without grouping (bucket_batches=1), with duration grouping (8, and
  16: the rows the budget run buffers) and with budget batches (2-D buckets filled up to `BUDGET_S_PER_ROW` x the
  batch size in padded audio seconds, at most twice the batch size in rows), with the mean rows a batch: a budget
  that pads less by shrinking batches would be no gain.

Needs espeak-ng when it makes its own corpus (the `small` demo corpus, about 30 s).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

BUDGET_S_PER_ROW = 3.0
"""Budget batches in this benchmark: batch_size x 3 s of padded audio. The small demo corpus's speech clips are
0.8-6.6 s (median 2.2 s, 75th percentile 3.1 s), so batches average about batch_size rows, as the fixed ones."""


def plain_loop(recipe, steps: int) -> dict:
    from data_ops.mix_sampler import TypeStream, mix_sampler
    from data_ops.shar_datasource import row_to_conversation
    from jobs.training.loop import Trainer
    from jobs.training.optim import build_optimizer, build_scheduler, module_param_groups
    from jobs.training.plan import resolve
    from jobs.training.preflight import tokenizer_files_for
    from jobs.training.sft import build_model

    plan = resolve(recipe)
    stage = plan.stages[0]
    model = build_model(plan, stage, tokenizer_files_for(plan))
    tr = recipe.train
    opt = build_optimizer(module_param_groups(model, stage.module_lrs), lr=stage.lr, betas=tr.betas,
                          weight_decay=tr.weight_decay)
    sched = build_scheduler(opt, warmup_steps=tr.warmup_steps, total_steps=steps, schedule=tr.schedule)
    trainer = Trainer(model, opt, sched, max_grad_norm=tr.max_grad_norm, clip=tr.clip)
    streams = {t: TypeStream(s.uris, t, s.batch_size, seed=recipe.run.seed, bucket_batches=recipe.data.bucket_batches,
                             max_batch_audio_s=s.max_batch_audio_s)
               for t, s in recipe.data.sources.items()}
    draw = mix_sampler(stage.ratios, recipe.run.seed)
    warm = max(1, steps // 10)
    data_s = t_start = 0.0
    model.train()
    for step in range(steps):
        if step == warm:
            t_start, data_s = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        rows = streams[draw(step, 0)].next_batch()
        batch = model.processor([row_to_conversation(r) for r in rows])
        data_s += time.perf_counter() - t0
        trainer.train_step([batch])
    elapsed = time.perf_counter() - t_start
    return {"steps_per_s": (steps - warm) / elapsed, "data_wait_share": data_s / elapsed}


def ray_job(recipe, tracking_uri: str) -> dict:
    from jobs.training.ray_run import run_training
    from tracking.client import client_for

    out = run_training(recipe)
    client = client_for(tracking_uri)
    steps = [m.value for m in client.get_metric_history(out["run_id"], "throughput/steps_per_s")][1:]
    wait = [m.value for m in client.get_metric_history(out["run_id"], "data/wait_share")][1:]
    return {"steps_per_s": float(np.mean(steps)), "data_wait_share": float(np.mean(wait))}


def padding(recipe, bucket_batches: int, batches: int = 40) -> dict:
    """Over `batches` batches of each speech type: the mean padded share of a batch's speech frames, the padded
    share of all frames (long batches weigh more), and the mean rows a batch."""
    from data_ops.mix_sampler import TypeStream, padded_share

    shares, rows, padded, frames = [], [], 0.0, 0.0
    for t, s in recipe.data.sources.items():
        if t == "text":
            continue
        stream = TypeStream(s.uris, t, s.batch_size, seed=recipe.run.seed, bucket_batches=bucket_batches,
                            max_batch_audio_s=s.max_batch_audio_s)
        for _ in range(batches):
            durations = [r["duration"] for r in stream.next_batch()]
            shares.append(padded_share(durations))
            rows.append(len(durations))
            padded += len(durations) * max(durations) - sum(durations)
            frames += len(durations) * max(durations)
    return {"share": float(np.mean(shares)), "frames": padded / frames, "rows": float(np.mean(rows))}


def with_budget(recipe):
    """`recipe` with budget batches on its speech types: batch_size x `BUDGET_S_PER_ROW` padded audio seconds, at
    most twice batch_size rows; run name `bench-budget` (a run of its own)."""
    from jobs.recipe import parse_recipe

    raw = recipe.model_dump(mode="json", exclude_none=True)
    raw["run"]["name"] = "bench-budget"
    for t, src in raw["data"]["sources"].items():
        if t != "text":
            src.update(max_batch_audio_s=BUDGET_S_PER_ROW * src["batch_size"], batch_size=2 * src["batch_size"])
    return parse_recipe(raw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", help="a corpus folder (default: make the small demo corpus in a temp folder)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-budget-run", action="store_true", help="skip the two loops with budget batches")
    args = ap.parse_args()

    import ray

    from jobs.recipe import parse_recipe

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(4, args.workers + 3), include_dashboard=False, log_to_driver=False)  # noqa: TID251 - an entrypoint
    tmp = Path(tempfile.mkdtemp(prefix="vtb-bench-"))
    corpus = args.corpus
    if corpus is None:
        from data_ops.demo_corpus import build_demo_corpus

        corpus = str(tmp / "corpus")
        build_demo_corpus(corpus, "small", seed=0, progress=False)
    tracking = f"sqlite:///{tmp}/mlflow.db"
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs/recipes/tiny.yaml").read_text())
    raw.pop("stages", None)  # one joint stage: the same work in both loops
    raw["run"].update(name="bench", storage_path=str(tmp / "runs"), tracking_uri=tracking, registered_model=None)
    raw["train"].update(max_steps=args.steps, num_workers=args.workers, checkpoint_every=args.steps,
                        log_every=max(1, args.steps // 6))
    for src in raw["data"]["sources"].values():
        src["uris"] = [corpus]
    recipe = parse_recipe(raw)

    budget = with_budget(recipe)
    runs = {"count": (recipe,)} | ({} if args.no_budget_run else {"budget": (budget,)})
    for key, (r,) in runs.items():
        runs[key] = (r, plain_loop(r, args.steps), ray_job(r, tracking))
    ray.shutdown()
    pads = {"no grouping (1 batch buffered)": padding(recipe, 1),
            "duration grouping (8 batches)": padding(recipe, 8),
            "duration grouping (16 batches)": padding(recipe, 16),
            "budget batches (8 batches)": padding(budget, 8)}
    print(f"\ntiny model, {args.steps} steps, batch sizes "
          f"{ {t: s.batch_size for t, s in recipe.data.sources.items()} }, {args.workers} Ray Train worker(s)")
    print(f"{'':40s}{'steps/s':>10s}{'data wait':>12s}")
    for key, (_, plain, job) in runs.items():
        name = "" if key == "count" else ", budget batches"
        print(f"{'plain PyTorch loop' + name:40s}{plain['steps_per_s']:10.2f}{100 * plain['data_wait_share']:11.0f}%")
        print(f"{'Ray Train + Ray Data job' + name:40s}{job['steps_per_s']:10.2f}{100 * job['data_wait_share']:11.0f}%")
        print(f"ratio job/plain{name}: {job['steps_per_s'] / plain['steps_per_s']:.2f}")
    speech = {t: s for t, s in budget.data.sources.items() if t != "text"}
    print(f"padded share of speech frames (40 batches a speech type; budget batches: "
          f"{ {t: s.max_batch_audio_s for t, s in speech.items()} } s padded audio, at most "
          f"{ {t: s.batch_size for t, s in speech.items()} } rows):")
    print(f"  {'':38s}{'per batch':>10s}{'all frames':>12s}{'rows a batch':>14s}")
    for name, p in pads.items():
        print(f"  {name:38s}{100 * p['share']:9.1f}%{100 * p['frames']:11.1f}%{p['rows']:14.2f}")


if __name__ == "__main__":
    main()
