"""CTC pretraining of a speech encoder built from a config: the ablation miniature's stand-in for Canary.

    python -m jobs.pretrain_encoder --corpus .stack/ablation/corpus --size mini --out DIR [--tokenizer DIR] \
        [--steps 800 --batch-size 16 --lr 1e-3 --eval-corpus DIR --tracking-uri URI --experiment NAME]

The paper's encoder comes pretrained (Canary-1B); real recipes load one with `encoder_pretrained`; the demo and the
ablation miniature make theirs with this job. Encoders built
here from configs start random, and one trained only through the LM learns acoustics slowly (models/encoder_ctc.py
says why), so this job first trains it with CTC on a corpus's ASR cuts (targets: the LM tokenizer's tokens) and
writes it as a Hugging Face checkpoint that `encoder_pretrained` loads. One process: the encoders this is for are
a few hundred thousand parameters, where Ray Train's workers would cost more than they give.

Logs loss and, with --eval-corpus, the greedy-CTC WER on that corpus's ASR cuts to MLflow when --tracking-uri is
given.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jobs.training.encoder_pretraining import pretrain_encoder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.pretrain_encoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="a corpus written by jobs.data (its asr_ast shards)")
    ap.add_argument("--size", default="mini", choices=["tiny", "mini"], help="the named size whose encoder to build")
    ap.add_argument("--tokenizer", help="the LM's tokenizer (folder or id): CTC targets are its tokens; default: the "
                    "offline tokenizer a training run on this corpus builds for an LM that names none")
    ap.add_argument("--tokenizer-vocab-size", type=int, default=1024,
                    help="the default tokenizer's vocabulary (a recipe's model.tokenizer_vocab_size)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-corpus")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    ap.add_argument("--experiment", default="vtblender-encoder")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from jobs.common.console import quiet_console

    quiet_console(os.environ)
    from data_ops.shards import ManifestError
    from models.config import NAMED_SIZES

    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; give a new folder", file=sys.stderr)
        return 2
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:  # the encoder keeps no trace of the tokenizer (its CTC head is dropped); any tokenization of the text works
        from jobs.training.tokenizer import corpus_tokenizer_files, load_tokenizer

        tokenizer = load_tokenizer(corpus_tokenizer_files([args.corpus], args.tokenizer_vocab_size))
    log = client = run_id = None
    if args.tracking_uri:
        from tracking.client import client_for
        from tracking.logs import log_metrics, log_params
        from tracking.runs import create_run

        client = client_for(args.tracking_uri)
        run_id = create_run(client, args.experiment, f"encoder-ctc-{out.name}")
        log_params(client, run_id, vars(args))
        log = lambda metrics, step: log_metrics(client, run_id, metrics, step)  # noqa: E731
    try:
        res = pretrain_encoder(args.corpus, NAMED_SIZES[args.size](), tokenizer, out, steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_corpus=args.eval_corpus,
                               on_metrics=log)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if client:
            client.set_terminated(run_id)
    print(f"[pretrain_encoder] encoder written to {out} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
