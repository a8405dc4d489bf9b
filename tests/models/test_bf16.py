"""bf16 on CPU, as GPUs run it: a model loaded with bf16 weights (serving and evaluation on a GPU) hears its audio,
with the features it was trained on; the precision each device gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import tiny
from models.conversation import AudioPart, Conversation, TextPart, Turn
from models.precision import (
    KeepComputedBuffers,
    PrecisionError,
    cast_frozen_weights,
    computed_buffers,
    inference_dtype,
    training_autocast_dtype,
)
from models.processor import move_batch
from models.speechlm import SpeechLM, build_speechlm

def conversations(audio, n=4):
    return [Conversation([Turn("user", [TextPart("Listen:"), AudioPart(audio(0.6 + 0.2 * i, seed=i)),
                                        TextPart("What is it?")]),
                          Turn.text("assistant", "the answer is five")]) for i in range(n)]


@pytest.mark.parametrize("kind", ["fastconformer", "whisper"])
def test_a_bf16_model_hears_its_audio_with_the_features_it_was_trained_on(kind, tokenizer, audio, tmp_path):
    torch.manual_seed(0)
    fp32 = build_speechlm(tiny(encoder_kind=kind), tokenizer=tokenizer).eval()
    fp32.save_pretrained(tmp_path / "m")
    bf16 = SpeechLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert bf16.adapter.proj_in.weight.dtype == torch.bfloat16
    # the filterbank and window keep their exact fp32 values (a cast would round them)
    for name, buf in bf16.encoder.features.named_buffers():
        assert buf.dtype == torch.float32 and torch.equal(buf, dict(fp32.encoder.features.named_buffers())[name])
    moved = build_speechlm(tiny(encoder_kind=kind), tokenizer=tokenizer).to(dtype=torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in moved.encoder.features.buffers())

    convs = conversations(audio)
    batch = move_batch(fp32.processor(convs), "cpu") | {"labels": None}  # the logits, not the loss
    with torch.no_grad():
        want = fp32(**batch).logits
        got = bf16(**batch).logits  # fp32 features into bf16 weights: refused before the cast at the encoder
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().numpy(), want.numpy(), atol=0.05)  # measured: <= 0.01
    # the audio still matters in bf16: another utterance changes the logits
    other = move_batch(fp32.processor([Conversation([Turn("user", [TextPart("Listen:"), AudioPart(audio(0.6, seed=9)),
                                                                    TextPart("What is it?")]),
                                                     Turn.text("assistant", "the answer is five")])]), "cpu")
    other["labels"] = None
    with torch.no_grad():
        assert not torch.equal(bf16(**other).logits[0], got[0, : other["input_ids"].shape[1]])
    prompts = [Conversation(c.turns[:1]) for c in convs[:2]]
    assert len(bf16.generate(prompts, max_new_tokens=3)) == 2  # the serving path: generation with bf16 weights


def _computed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ids = {id(b) for _, _, b in computed_buffers(model)}
    return {name: b for name, b in model.named_buffers() if id(b) in ids}


@pytest.mark.parametrize("kind", ["fastconformer", "whisper"])
def test_computed_buffers_keep_their_fp32_values_through_every_dtype_move(kind, tokenizer, tmp_path):
    torch.manual_seed(0)
    fp32 = build_speechlm(tiny(encoder_kind=kind), tokenizer=tokenizer)
    want = _computed(fp32)
    # found by the code (non-persistent floating buffers), not by name: the LM's rotary frequencies, the features'
    # filterbank and window, FastConformer's position frequencies; BatchNorm's running statistics are state, cast
    # with the weights (a GPU's batch norm takes bf16 statistics with bf16 weights, not fp32 ones)
    names = {n.rsplit(".", 1)[-1] for n in want}
    assert {"inv_freq", "original_inv_freq", "mel_fb", "window"} <= names
    assert not any("running_" in n for n in want)
    fp32.save_pretrained(tmp_path / "m")
    loaded = {"from_pretrained bf16": SpeechLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16),
              "from_pretrained fp16": SpeechLM.from_pretrained(tmp_path / "m", dtype=torch.float16),
              "build bf16": build_speechlm(tiny(encoder_kind=kind), tokenizer=tokenizer, dtype=torch.bfloat16),
              ".half()": build_speechlm(tiny(encoder_kind=kind), tokenizer=tokenizer).half(),
              "encoder.to(bf16)": build_speechlm(tiny(encoder_kind=kind), tokenizer=tokenizer).encoder.to(
                  torch.bfloat16)}
    for how, model in loaded.items():
        got = _computed(model)
        assert got, how
        for name, b in got.items():
            assert b.dtype == torch.float32, (how, name, b.dtype)
            torch.testing.assert_close(b, want.get(name, want.get(f"encoder.{name}")), rtol=0, atol=0)
        assert next(model.parameters()).dtype != torch.float32, how  # the weights did move
    if kind == "fastconformer":
        bn = dict(loaded["from_pretrained bf16"].named_buffers())["encoder.encoder.layers.0.conv.norm.running_mean"]
        assert bn.dtype == torch.bfloat16


def test_a_new_architectures_computed_buffers_are_kept_without_naming_them():
    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("freqs_of_some_new_kind", 1.0 / 10000 ** (torch.arange(8) / 8), persistent=False)
            self.register_buffer("stats", torch.ones(3))  # persistent: a checkpoint holds it, it moves with weights
            self.proj = torch.nn.Linear(4, 4)

    class Model(KeepComputedBuffers):
        def __init__(self):
            super().__init__()
            self.inner = Rotary()

    model = Model()
    freqs = model.inner.freqs_of_some_new_kind.clone()
    model.to(torch.bfloat16)
    assert model.inner.proj.weight.dtype == torch.bfloat16 and model.inner.stats.dtype == torch.bfloat16
    assert model.inner.freqs_of_some_new_kind.dtype == torch.float32
    assert torch.equal(model.inner.freqs_of_some_new_kind, freqs)


def test_served_bf16_logits_match_the_trained_models_over_600_positions(tokenizer, tmp_path):
    """The served model (weights loaded in bf16) against the model as training computes it (fp32 trainable
    weights, frozen ones in bf16, bf16 autocast), on a 600-token prompt. Attention is made sharp (q/k weights of
    std 1, as a trained LM's are, not init's 0.02: with near-uniform attention the rotary phase barely matters) and
    LoRA non-zero, as after training.

    Measured (CPU, torch 2.13): the two are bit-identical (max |diff| 0.0 at every position). Before the computed
    buffers kept fp32, the rotary frequencies were rounded to bf16 and the difference grew along the sequence: max
    |diff| per 100 positions 0.027, 0.067, 0.103, 0.111, 0.118, 0.104 (logits of magnitude ~1.6). The bound, 0.02,
    leaves room for other kernels (a GPU's) and is exceeded by the old code in every 100 positions."""
    torch.manual_seed(0)
    trained = build_speechlm(tiny(), tokenizer=tokenizer)
    with torch.no_grad():
        for name, p in trained.lm.named_parameters():
            if name.endswith(("q_proj.base_layer.weight", "k_proj.base_layer.weight")):
                p.normal_(0, 1.0)
            elif "lora_B" in name:
                p.normal_(0, 0.02)
    trained.save_pretrained(tmp_path / "m")
    served = SpeechLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    trained.eval()
    cast_frozen_weights(trained, torch.bfloat16)  # as the training job holds the model

    ids = torch.randint(10, len(tokenizer), (2, 600), generator=torch.Generator().manual_seed(1))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), audio_mask=torch.zeros_like(ids, dtype=torch.bool))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = trained(**batch).logits.float()
        got = served(**batch).logits.float()
    diff = (got - want).abs()
    assert diff[:, 500:].max() <= 0.02 and diff.max() <= 0.02, [round(diff[:, a:a + 100].max().item(), 3)
                                                                for a in range(0, 600, 100)]


def test_precision_is_chosen_per_device():
    assert inference_dtype("cpu") == torch.float32 and inference_dtype("cpu", "bf16") == torch.bfloat16
    assert training_autocast_dtype("cpu") is None and training_autocast_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(PrecisionError, match="loss scaling"):
        training_autocast_dtype("cpu", "fp16")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_gpu_is_bf16_where_native_else_fp32_never_fp16(native, monkeypatch):
    # a V100 or T4 (no native bf16), played on CPU: `auto` must not pick fp16, which a Gemma overflows
    import models.precision as precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    monkeypatch.setattr(precision, "_gpu_name", lambda device: "Tesla V100-SXM2-16GB")
    assert inference_dtype("cuda") == (torch.bfloat16 if native else torch.float32)
    assert training_autocast_dtype("cuda") == (torch.bfloat16 if native else None)
    assert inference_dtype("cuda", "fp16") == torch.float16  # asked for by name: given
    if not native:
        with pytest.raises(PrecisionError, match="V100"):
            inference_dtype("cuda", "bf16")


@pytest.mark.gpu
def test_precision_on_this_gpu_follows_its_native_bf16():
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert inference_dtype("cuda") == (torch.bfloat16 if native else torch.float32)
    if native:
        assert training_autocast_dtype("cuda", "bf16") == torch.bfloat16
    else:
        with pytest.raises(PrecisionError, match=torch.cuda.get_device_name()):
            training_autocast_dtype("cuda", "bf16")
