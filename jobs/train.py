"""Single-stage joint speech-text SFT (VoiceTextBlender) on Ray Train, tracked in MLflow.

    ray job submit --working-dir . -- python -m jobs.train --config jobs/recipes/tiny.yaml

Parse the recipe -> connect to Ray -> `run_training` (jobs/training/ray_run.py: data check, MLflow run, one
`TorchTrainer` per stage whose workers run jobs/training/sft.py) -> print where the run, model and checkpoint are.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time

from jobs.common.console import quiet_console
from jobs.recipe import RecipeError, load_recipe, parse_recipe
from jobs.training.checkpoint import CheckpointMismatch
from tracking.client import TrackingError


def stopped(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="recipe YAML (jobs/recipes/*.yaml)")
    ap.add_argument("--name", help="override run.name (resubmitting with the same name resumes)")
    ap.add_argument("--tracking-uri", help="MLflow server (overrides run.tracking_uri and $MLFLOW_TRACKING_URI)")
    ap.add_argument("--check", action="store_true",
                    help="validate the recipe and its data, print the model and its memory plan per GPU, then stop")
    ap.add_argument("--sample-log-dir",
                    help="write every micro-batch's sample ids and loss per rank here (audit of mixing/resume)")
    args = ap.parse_args(argv)
    quiet_console(os.environ)
    t0 = time.time()
    try:
        recipe = load_recipe(args.config)
        overrides = {k: v for k, v in (("name", args.name), ("tracking_uri", args.tracking_uri)) if v}
        if overrides:
            recipe = parse_recipe({**recipe.model_dump(mode="json"), "run": {**recipe.run.model_dump(), **overrides}})
        if args.check:  # the checks `run_training` makes before launch, and what they found
            from jobs.training.plan import resolve
            from jobs.training.preflight import check_report

            print(check_report(resolve(recipe)))
            return 0
        import ray

        from jobs.training.ray_run import run_training

        # the cluster of RAY_ADDRESS (set by `ray job submit`), else a local one
        ray.init(log_to_driver=True)  # noqa: TID251 - an entrypoint connects to Ray
        # `ray job stop` sends SIGTERM: end as a stop (the MLflow run is marked KILLED), not as a crash
        signal.signal(signal.SIGTERM, stopped)
        out = run_training(recipe, env=dict(os.environ), sample_log_dir=args.sample_log_dir,
                           entrypoint="python -m jobs.train " + shlex.join(argv if argv is not None else sys.argv[1:]))
    except (RecipeError, TrackingError, CheckpointMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[train] stopped; the MLflow run is marked KILLED, resubmit the same command to resume", file=sys.stderr)
        return 130
    ui = out["tracking_uri"].rstrip("/")
    print(f"[train] done in {time.time() - t0:.0f} s")
    print(f"[train] MLflow run {out['run_id']}: {ui}/#/experiments (run name {recipe.run.name})")
    if out["registered"] and out["promoted"]:
        print(f"[train] registered model: models:/{recipe.run.registered_model}@{recipe.run.alias} "
              f"({out['registered']})")
    elif out["registered"]:
        print(f"[train] registered model: {out['registered']}, not promoted to @{recipe.run.alias} (the gate "
              f"failed: {out['gate'].get('vtb.gate.failed')}; MLflow tags vtb.gate.* on the version say why)")
    print(f"[train] last checkpoint: {out['checkpoint']}")
    if os.environ.get("RAY_DASHBOARD_ADDRESS"):
        print(f"[train] Ray dashboard: {os.environ['RAY_DASHBOARD_ADDRESS']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
