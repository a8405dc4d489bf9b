"""CTC pretraining of a speech encoder built from a config: the ablation miniature's stand-in for Canary.

    python -m jobs.pretrain_encoder --corpus .stack/ablation/corpus --size mini --tokenizer DIR --out DIR \
        [--steps 800 --batch-size 16 --lr 1e-3 --eval-corpus DIR --tracking-uri URI --experiment NAME]

The paper's encoder comes pretrained (Canary-1B); real recipes load one with `encoder_pretrained`. Encoders built
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
import time
from pathlib import Path

import numpy as np


def asr_batches(uri: str, batch_size: int, *, seed: int, endpoint_url: str | None = None):
    """Endless (audio, lens, texts) batches of a corpus's ASR cuts (AST cuts' targets are translations: skipped)."""
    import torch

    from data_ops.mix_sampler import TypeStream
    from data_ops.shar_datasource import row_to_conversation
    from models.conversation import AudioPart

    stream = TypeStream([uri], "asr_ast", batch_size, seed=seed, bucket_batches=4, endpoint_url=endpoint_url)
    rows: list[dict] = []
    while True:
        rows += [r for r in stream.next_batch() if r["task"] == "asr"]
        while len(rows) >= batch_size:
            batch, rows = rows[:batch_size], rows[batch_size:]
            convs = [row_to_conversation(r) for r in batch]
            audio = [torch.as_tensor(next(p for p in c.turns[0].parts if isinstance(p, AudioPart)).audio)
                     for c in convs]
            lens = torch.tensor([len(a) for a in audio])
            yield torch.nn.utils.rnn.pad_sequence(audio, batch_first=True), lens, [c.turns[-1].text_only
                                                                                    for c in convs]


def pretrain_encoder(corpus: str, cfg, tokenizer, out: Path, *, steps: int = 800, batch_size: int = 16,
                     lr: float = 1e-3, seed: int = 0, eval_corpus: str | None = None, eval_batches: int = 8,
                     endpoint_url: str | None = None, log_every: int = 100, on_metrics=None) -> dict:
    """Train `cfg`'s encoder with a CTC head; save the encoder (HF format) to `out` (written whole or not at all).
    Returns {"loss", "wer" (on eval_corpus, else None), "seconds"}."""
    import torch

    from data_ops.scoring import wer
    from jobs.training.loop import Trainer
    from jobs.training.optim import build_optimizer, build_scheduler
    from models.encoder_ctc import EncoderCTC
    from jobs.training.metrics import as_floats
    from models.speechlm import build_speech_encoder

    torch.manual_seed(seed)
    model = EncoderCTC(build_speech_encoder(cfg), len(tokenizer))
    opt = build_optimizer(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=1e-3)
    sched = build_scheduler(opt, warmup_steps=min(100, steps // 10), total_steps=steps, schedule="cosine")
    trainer = Trainer(model, opt, sched, max_grad_norm=1.0)
    batches = asr_batches(corpus, batch_size, seed=seed, endpoint_url=endpoint_url)
    t0, losses = time.time(), []
    model.train()
    while trainer.step < steps:
        audio, lens, texts = next(batches)
        targets = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        losses.append(trainer.train_step([{"audio": audio, "audio_lens": lens, "targets": targets}]))
        step = trainer.step
        if step % log_every == 0 or step == steps:
            mean = float(np.mean(as_floats(losses[-log_every:])))
            print(f"[pretrain_encoder] step {step}/{steps} ctc loss {mean:.3f} ({time.time() - t0:.0f} s)",
                  flush=True)
            if on_metrics:
                on_metrics({"encoder_ctc/loss": mean}, step)
    result = {"loss": float(np.mean(losses[-log_every:])), "wer": None}
    if eval_corpus:
        model.eval()
        refs, hyps = [], []
        for _, (audio, lens, texts) in zip(range(eval_batches), asr_batches(eval_corpus, batch_size, seed=0,
                                                                             endpoint_url=endpoint_url)):
            refs += texts
            hyps += [tokenizer.decode(t) for t in model.greedy(audio, lens)]
        result["wer"] = wer(refs, hyps, "multi")  # every language, Whisper's basic (non-English) normalizer
        print(f"[pretrain_encoder] greedy CTC WER on {len(refs)} held-out utterances: {result['wer']:.3f}", flush=True)
        if on_metrics:
            on_metrics({"encoder_ctc/wer": result["wer"]}, steps)
    tmp = out.with_name(out.name + ".partial")
    model.encoder.encoder.save_pretrained(tmp)
    tmp.rename(out)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.pretrain_encoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="a corpus written by jobs.data (its asr_ast shards)")
    ap.add_argument("--size", default="mini", choices=["tiny", "mini"], help="the named size whose encoder to build")
    ap.add_argument("--tokenizer", required=True, help="the LM's tokenizer (folder or id): CTC targets are its tokens")
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

    from jobs.training.console import quiet_console

    quiet_console(os.environ)
    from data_ops.shards import ManifestError
    from models.config import NAMED_SIZES

    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; give a new folder", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    log = client = run_id = None
    if args.tracking_uri:
        from jobs.training.tracking import client_for, create_run, log_metrics, log_params

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
