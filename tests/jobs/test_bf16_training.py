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




def test_frozen_weights_in_bf16_train_like_fp32_and_halve_their_memory(tokenizer, audio, tmp_path):
    """What the training job does under bf16 autocast (jobs/training/sft.py `prepare_model`): the frozen LM base
    held in bf16, LoRA, adapter, encoder and Adam in fp32. It tracks bf16 autocast over fp32 weights within the
    tolerances above (which bound bf16 against fp32; rounding the frozen weights once, as autocast did at every
    matmul, is a smaller change), the
    plan counts 2 bytes a frozen weight, and the model saved after widening them back loads as a plain fp32 model."""
    from jobs.training.memory_plan import Mode, fixed_bytes
    from models.skeleton import shapes as model_shapes
    from models.precision import cast_frozen_weights
    from models.speechlm import SpeechLM

    convs = conversations(audio, n=8)
    losses, models = {}, {}
    for frozen_bf16 in (False, True):
        torch.manual_seed(0)
        model = build_speechlm(tiny(), tokenizer=tokenizer)
        if frozen_bf16:
            assert cast_frozen_weights(model, torch.bfloat16) == model.parameter_counts()["lm"]
        batches = [move_batch(model.processor(convs[i:i + 2]), "cpu") for i in range(0, 8, 2)]
        losses[frozen_bf16] = np.array(_train(model, batches, torch.bfloat16, 10))
        models[frozen_bf16] = model
    model = models[True]
    dtypes = {(n.split(".", 1)[0] if "lora_" not in n else "lora", p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {("lm", torch.bfloat16), ("lora", torch.float32), ("adapter", torch.float32),
                      ("encoder", torch.float32)}
    assert model.encoder.features.mel_fb.dtype == torch.float32  # buffers stay fp32
    fp32, bf16 = losses[False], losses[True]  # fp32 weights vs frozen weights in bf16, both under autocast
    assert np.abs(bf16 - fp32).mean() < MEAN_STEP_TOLERANCE, np.abs(bf16 - fp32)
    assert abs(bf16[-5:].mean() - fp32[-5:].mean()) < LAST_STEPS_TOLERANCE, (bf16[-5:], fp32[-5:])

    shapes = model_shapes(model)
    frozen = shapes.total - sum(shapes.trainable.values())
    fp32_weights = fixed_bytes(shapes, Mode(autocast=True), "ddp", 1)
    bf16_weights = fixed_bytes(shapes, Mode(autocast=True, frozen_bf16=True), "ddp", 1)
    assert fp32_weights["weights"] - bf16_weights["weights"] == 2 * frozen
    assert bf16_weights["weight casts"] < fp32_weights["weight casts"]

    cast_frozen_weights(model, torch.float32)  # as log_final_model does before saving
    model.eval().save_pretrained(tmp_path / "m")
    loaded = SpeechLM.from_pretrained(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    batch = move_batch(model.processor(convs[:2]), "cpu")
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
