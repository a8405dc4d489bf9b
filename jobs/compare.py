"""The paper-style comparison table of evaluated runs: models as rows, metrics as columns, the best in bold.

    python -m jobs.compare --experiment vtblender-ablation [--suite demo] [--out docs/ablation]
    python -m jobs.compare RUN_ID RUN_ID ...

Writes `comparison.md` (Markdown table) and `comparison.png` (one bar chart per metric) to `--out` and logs both
to a new MLflow run (tagged `vtb.kind=comparison`) in the experiment of the first run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from jobs.evaluation.compare import compare_runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="MLflow run ids")
    ap.add_argument("--experiment", help="compare every evaluated run of this experiment")
    ap.add_argument("--suite", help="only metrics of this evaluation suite")
    ap.add_argument("--metrics", nargs="*", help="metric names (default: every eval/... metric but sample counts)")
    ap.add_argument("--out", default=None, help="folder for comparison.md and comparison.png")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = ap.parse_args(argv)
    from tracking.client import client_for, tracking_uri_or_report

    args.tracking_uri = tracking_uri_or_report(args.tracking_uri, dict(os.environ))
    if args.tracking_uri is None:
        return 2
    client = client_for(args.tracking_uri)
    if args.experiment:
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None:
            print(f"error: no experiment named {args.experiment!r}", file=sys.stderr)
            return 2
        runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
                if r.data.tags.get("vtb.kind") != "comparison"]
    else:
        runs = [client.get_run(r) for r in args.runs]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vtb-compare-"))
    try:
        table, _ = compare_runs(args.tracking_uri, runs, out, suite=args.suite, metrics=args.metrics)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"written to {out}/comparison.md and comparison.png, and logged to MLflow")
    return 0


if __name__ == "__main__":
    sys.exit(main())
