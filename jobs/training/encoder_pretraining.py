"""CTC pretraining of a speech encoder built from a config (the ablation miniature's stand-in for Canary): the
component behind `python -m jobs.pretrain_encoder` and the ablation's encoder step.

Encoders built from configs start random, and one trained only through the LM learns acoustics slowly
(models/encoder_ctc.py says why), so it is first trained with CTC on a corpus's ASR cuts (targets: the LM
tokenizer's tokens) and written as a Hugging Face checkpoint that `encoder_pretrained` loads. One process: the
encoders this is for are a few hundred thousand parameters, where Ray Train's workers would cost more than they give.
"""

from __future__ import annotations

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
    from jobs.training.metrics import as_floats
    from jobs.training.optim import build_optimizer, build_scheduler
    from models.encoder_ctc import EncoderCTC
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
