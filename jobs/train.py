"""Single-stage joint speech-text SFT (VoiceTextBlender) on Ray Train, tracked in MLflow.

    ray job submit --working-dir . -- python -m jobs.train --config jobs/recipes/tiny.yaml

Parse the recipe -> connect to Ray -> `run_training` (jobs/training/ray_run.py: data check, MLflow run, one
`TorchTrainer` per stage whose workers run jobs/training/sft.py) -> print where the run, model and checkpoint are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jobs.recipe import RecipeError, check_data, check_model, describe_model, load_recipe, parse_recipe
from jobs.training.console import quiet_console
from jobs.training.checkpoint import CheckpointMismatch
from jobs.training.tracking import TrackingError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="recipe YAML (jobs/recipes/*.yaml)")
    ap.add_argument("--name", help="override run.name (resubmitting with the same name resumes)")
    ap.add_argument("--tracking-uri", help="MLflow server (overrides run.tracking_uri and $MLFLOW_TRACKING_URI)")
    ap.add_argument("--check", action="store_true", help="validate the recipe and its data, then stop")
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
        if args.check:
            check_model(recipe)
            print(describe_model(recipe.model.speechlm_config()))
            print(json.dumps(check_data(recipe), indent=1))
            return 0
        import ray

        from jobs.training.ray_run import run_training

        ray.init(log_to_driver=True)  # the cluster of RAY_ADDRESS (set by `ray job submit`), else a local one
        out = run_training(recipe, env=dict(os.environ), sample_log_dir=args.sample_log_dir)
    except (RecipeError, TrackingError, CheckpointMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ui = out["tracking_uri"].rstrip("/")
    print(f"[train] done in {time.time() - t0:.0f} s")
    print(f"[train] MLflow run {out['run_id']}: {ui}/#/experiments (run name {recipe.run.name})")
    if out["registered"]:
        print(f"[train] registered model: models:/{recipe.run.registered_model}@{recipe.run.alias} "
              f"({out['registered']})")
    print(f"[train] last checkpoint: {out['checkpoint']}")
    if os.environ.get("RAY_DASHBOARD_ADDRESS"):
        print(f"[train] Ray dashboard: {os.environ['RAY_DASHBOARD_ADDRESS']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
