"""A bf16-autocast training run (what GPUs run: bf16 compute over fp32 weights) tracks the fp32 run, step by step,
for both encoder kinds; on CPU, as the suite runs everything."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import tiny
from models.processor import move_batch
from models.speechlm import build_speechlm
from tests.models.test_bf16 import conversations

# |bf16 - fp32| of the per-step losses over 30 steps of the tiny model at lr 1e-2 (the loss falls by ~1.1-1.2 nats
# over them). Measured on seeds 0-2 x both encoders: mean over the steps 0.0006-0.032, last five steps' mean
# 0.0002-0.020; a single step can differ by up to 0.41 (one run; most under 0.04), where the two runs' paths
# part for a step and meet again, so single steps are not compared. Tolerances ~3x the largest measured.
MEAN_STEP_TOLERANCE = 0.1
LAST_STEPS_TOLERANCE = 0.06


def _train(model, batches, autocast_dtype, steps):
    from jobs.training.loop import Trainer
    from jobs.training.optim import build_optimizer, build_scheduler

    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.98),
                          weight_decay=0.0)
    trainer = Trainer(model, opt, build_scheduler(opt, warmup_steps=2, total_steps=steps, schedule="cosine"),
                      autocast_dtype=autocast_dtype)
    model.train()
    return [float(trainer.train_step([batches[s % len(batches)]])) for s in range(steps)]


@pytest.mark.parametrize("kind", ["fastconformer", "whisper"])
def test_bf16_autocast_training_tracks_fp32(kind, tokenizer, audio):
    convs = conversations(audio, n=8)
    losses = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = build_speechlm(tiny(encoder_kind=kind), tokenizer=tokenizer)
        batches = [move_batch(model.processor(convs[i:i + 2]), "cpu") for i in range(0, 8, 2)]
        losses[dtype] = _train(model, batches, dtype, steps=30)
    fp32, bf16 = np.array(losses[None]), np.array(losses[torch.bfloat16])
    assert fp32[-5:].mean() < fp32[:5].mean() - 0.8  # it learns: the comparison is over a moving loss
    assert np.abs(bf16 - fp32).mean() < MEAN_STEP_TOLERANCE, np.abs(bf16 - fp32)
    assert abs(bf16[-5:].mean() - fp32[-5:].mean()) < LAST_STEPS_TOLERANCE, (bf16[-5:], fp32[-5:])


