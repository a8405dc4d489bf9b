"""Evaluate a trained SpeechLM on a suite of shard sets and log the paper's metrics to MLflow.

    ray job submit --working-dir . -- python -m jobs.evaluate --model models:/vtblender-demo@candidate \
        --suite jobs/suites/demo.yaml

1. read the suite (tasks: which shards, which rows, which metric; an optional LLM judge);
2. Ray Data batch inference: per task, the suite's shards streamed by the Shar datasource, rows filtered by task;
   all tasks' rows then go through one pool of actors holding the model (loaded once per actor, not per task),
   each conversation cut before its last assistant turn and answered greedily (the reference is that last
   assistant turn); the content check runs meanwhile as a Ray task;
3. score (data_ops.scoring): ASR WER per language, AST BLEU per direction, exact match for text tasks and spoken
   instructions, the Appendix B judge for speech QA and spoken instructions when a judge is configured (else
   those samples are reported as unscored); and the content check (`models.content_check`): does the right audio
   lower the answers' loss against another utterance of the same length;
4. log `eval/<suite>/<task>/<metric>` to the model's training run (found from the registry), or to a new run in
   `--experiment` for a local model folder, plus a per-sample table `eval/<suite>/samples.json`.
"""

from __future__ import annotations

import argparse
import os
import sys

from data_ops.shards import ManifestError
from jobs.config_files import ConfigError
from jobs.evaluation.run import Placement, evaluate_model
from jobs.evaluation.suite import load_suite


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="models:/name@alias, models:/name/3, runs:/id/model or a folder")
    ap.add_argument("--suite", required=True)
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    ap.add_argument("--experiment", default="vtblender-eval", help="for models not from the registry")
    ap.add_argument("--uris", nargs="*", help="override the suite's corpora (e.g. absolute paths under ray job submit)")
    ap.add_argument("--actors", type=int, default=1, help="predictor actors (model copies) running at once")
    ap.add_argument("--gpus-per-actor", type=float, default=None,
                    help="GPUs per predictor actor (default: 1 when the cluster has GPUs, else 0)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="the weights' dtype (default: bf16 on GPUs that have it, fp32 on older GPUs and CPU; "
                         "fp16 only when asked)")
    args = ap.parse_args(argv)
    if args.actors < 1 or (args.gpus_per_actor is not None and args.gpus_per_actor < 0):
        ap.error("--actors must be >= 1 and --gpus-per-actor >= 0")
    from jobs.common.console import quiet_console
    from models.saved import ModelNotFound

    quiet_console(os.environ)
    try:
        suite = load_suite(args.suite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.uris:
        suite.uris = list(args.uris)
    from tracking.client import tracking_uri_or_report

    args.tracking_uri = tracking_uri_or_report(args.tracking_uri, dict(os.environ))
    if args.tracking_uri is None:
        return 2
    try:
        import ray

        from jobs.common.console import quiet_ray_data

        # the cluster of RAY_ADDRESS (set by `ray job submit`), else a local one
        ray.init(log_to_driver=True)  # noqa: TID251 - an entrypoint connects to Ray
        quiet_ray_data()
        out = evaluate_model(args.model, suite, args.tracking_uri, args.experiment,
                             Placement(args.actors, args.gpus_per_actor, args.precision))
    except (ModelNotFound, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[eval] {out['samples']} samples in {out['seconds']:.0f} s, weights in {out['dtype']}; metrics logged to "
          f"MLflow run {out['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
