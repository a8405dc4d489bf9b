"""Benchmark (not a test): the training job vs. a plain in-process PyTorch loop, same tiny model, same data.

    python -m bench.train_throughput [--corpus DIR] [--steps 60] [--workers 1]

Prints, in one run:
- steps/s of a plain loop (one process, shards read in-process, same streams, sampler, model and optimizer) and
  of the Ray Train + Ray Data job (from the job's own MLflow throughput metrics, first window dropped as warm-up),
  and their ratio;
- the share of step time spent waiting for data in each;
- the padded share of speech frames per batch with duration grouping (bucket_batches=8) and without (1).

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


def plain_loop(recipe, steps: int) -> dict:
    from data_ops.mix_sampler import TypeStream, mix_sampler
    from data_ops.shar_datasource import row_to_conversation
    from jobs.training.loop import Trainer
    from jobs.training.optim import build_optimizer, build_scheduler, module_param_groups
    from jobs.training.ray_run import tokenizer_files_for
    from jobs.training.sft import build_model

    model = build_model(recipe, recipe.stage_list()[0], tokenizer_files_for(recipe))
    tr = recipe.train
    opt = build_optimizer(module_param_groups(model, tr.module_lrs()), lr=tr.lr, betas=tr.betas,
                          weight_decay=tr.weight_decay)
    sched = build_scheduler(opt, warmup_steps=tr.warmup_steps, total_steps=steps, schedule=tr.schedule)
    trainer = Trainer(model, opt, sched, max_grad_norm=tr.max_grad_norm, clip=tr.clip)
    streams = {t: TypeStream(s.uris, t, s.batch_size, seed=recipe.run.seed, bucket_batches=recipe.data.bucket_batches)
               for t, s in recipe.data.sources.items()}
    draw = mix_sampler(recipe.data.ratios, recipe.run.seed)
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
    from mlflow.tracking import MlflowClient

    from jobs.training.ray_run import run_training

    out = run_training(recipe)
    client = MlflowClient(tracking_uri)
    steps = [m.value for m in client.get_metric_history(out["run_id"], "throughput/steps_per_s")][1:]
    wait = [m.value for m in client.get_metric_history(out["run_id"], "data/wait_share")][1:]
    return {"steps_per_s": float(np.mean(steps)), "data_wait_share": float(np.mean(wait))}


def padding(recipe, bucket_batches: int, batches: int = 40) -> float:
    from data_ops.mix_sampler import TypeStream, padded_share

    shares = []
    for t, s in recipe.data.sources.items():
        if t == "text":
            continue
        stream = TypeStream(s.uris, t, s.batch_size, seed=recipe.run.seed, bucket_batches=bucket_batches)
        for _ in range(batches):
            shares.append(padded_share([r["duration"] for r in stream.next_batch()]))
    return float(np.mean(shares))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", help="a corpus folder (default: make the small demo corpus in a temp folder)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    import ray

    from jobs.recipe import parse_recipe

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(4, args.workers + 3), include_dashboard=False, log_to_driver=False)
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

    plain = plain_loop(recipe, args.steps)
    job = ray_job(recipe, tracking)
    ray.shutdown()
    pad_grouped, pad_plain = padding(recipe, 8), padding(recipe, 1)
    print(f"\ntiny model, {args.steps} steps, batch sizes "
          f"{ {t: s.batch_size for t, s in recipe.data.sources.items()} }, {args.workers} Ray Train worker(s)")
    print(f"{'':28s}{'steps/s':>10s}{'data wait':>12s}")
    print(f"{'plain PyTorch loop':28s}{plain['steps_per_s']:10.2f}{100 * plain['data_wait_share']:11.0f}%")
    print(f"{'Ray Train + Ray Data job':28s}{job['steps_per_s']:10.2f}{100 * job['data_wait_share']:11.0f}%")
    print(f"ratio job/plain: {job['steps_per_s'] / plain['steps_per_s']:.2f}")
    print(f"padded share of speech frames: {100 * pad_grouped:.1f}% with duration grouping (8 batches), "
          f"{100 * pad_plain:.1f}% without; ratio {pad_grouped / pad_plain:.2f}")


if __name__ == "__main__":
    main()
