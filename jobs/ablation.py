"""The ablation miniature: the paper's Table 4 at a size a 2-core CPU machine runs, with the product's own jobs.

    ray job submit --working-dir . -- python -m jobs.ablation --config jobs/ablations/table4_mini.yaml \
        --root $PWD/.stack/ablation --out $PWD/docs/ablation --tracking-uri $MLFLOW_TRACKING_URI --seed 0
    make ablation SEED=0            # the same, with the local stack started first (and left up for the MLflow UI)

One seed, top to bottom:
1. corpora (`data_ops.demo_corpus`): the training corpus (text SFT tasks; ASR/AST, speech QA and mixed-modal
   SFT spoken by espeak-ng in En/De/Es/Fr with the training voices), drawn from the seed; the evaluation corpus
   from a fixed seed (the same for every run) with other utterances, voices held out of training and the text
   tasks fully spoken (spoken instructions, which no recipe trains on);
2. the text LM (`text_lm` recipe, `jobs.train`): a random-init LM trained on the text SFT tasks alone, exported
   as a Hugging Face checkpoint (model + tokenizer) — the "Gemma after text SFT" the paper starts from;
3. the speech encoder, pretrained with CTC on the training corpus's ASR cuts (`jobs.pretrain_encoder`) — the
   stand-in for the paper's pretrained Canary encoder;
4. each speech recipe (joint SFT with LoRA, B1, B2, B3, SpeechCombine), all from those two checkpoints with the
   same number of steps and the same seed, via `jobs.train` (registered in MLflow);
5. every model, the text LM included, through `jobs.evaluate` (metrics logged to its training run);
6. `jobs.compare`: the table and chart, in MLflow (a comparison run) and in `--out/seed-<seed>/`, with
   `result.json` (metrics, the paper's claims checked, run time, peak memory, the command).

Each finished step is recorded in `--root/state-seed<seed>.json` with a fingerprint of its inputs; running the
command again skips what is done (a crash costs at most the step it was in, and within a training step no more
than its last checkpoint) and does again a step whose inputs changed (an edited config or recipe: more steps,
other ratios; an upstream step done again), with every step after it.

The steps, the config, the step cache, the claims and the reports are components in `jobs/ablation_study/`;
this file parses the arguments, connects to Ray and runs them seed after seed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from jobs.ablation_study.config import in_repo, load_config
from jobs.ablation_study.pipeline import run_seed
from jobs.ablation_study.report import seeds_table, summary
from jobs.recipe import RecipeError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="jobs/ablations/table4_mini.yaml")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds, run one after another")
    ap.add_argument("--root", default=".stack/ablation", help="work folder: corpora, text LM, checkpoints, state")
    ap.add_argument("--out", default="docs/ablation", help="tables, charts and result.json per seed")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = ap.parse_args(argv)
    from jobs.common.console import quiet_console

    quiet_console(os.environ)
    command = "python -m jobs.ablation " + shlex.join(argv if argv is not None else sys.argv[1:])
    from jobs.training.checkpoint import CheckpointMismatch
    from tracking.client import tracking_uri_or_report

    args.tracking_uri = tracking_uri_or_report(args.tracking_uri, dict(os.environ))
    if args.tracking_uri is None:
        return 2
    try:
        cfg = load_config(in_repo(args.config))
        import ray

        from jobs.common.console import quiet_ray_data

        ray.init(log_to_driver=True)  # noqa: TID251 - the cluster of RAY_ADDRESS (set by `ray job submit`), else a local one
        quiet_ray_data()
        for seed in args.seed:
            result = run_seed(cfg, seed, Path(args.root).resolve(), Path(args.out).resolve(), args.tracking_uri,
                              command)
            print(summary(result), flush=True)
        table = seeds_table(Path(args.out).resolve())
        if table:
            print(f"\nacross seeds ({Path(args.out).resolve() / 'seeds.md'}):\n{table}", flush=True)
    except (RecipeError, CheckpointMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
