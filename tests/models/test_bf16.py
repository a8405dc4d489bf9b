"""bf16 on CPU, as GPUs run it: a model loaded with bf16 weights (serving and evaluation on a GPU) hears its audio,
with the features it was trained on; the precision each device gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import tiny
from models.conversation import AudioPart, Conversation, TextPart, Turn
from models.precision import PrecisionError, inference_dtype, training_autocast_dtype
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


def test_precision_is_chosen_per_device():
    assert inference_dtype("cpu") == torch.float32 and inference_dtype("cpu", "bf16") == torch.bfloat16
    assert training_autocast_dtype("cpu") is None and training_autocast_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(PrecisionError, match="loss scaling"):
        training_autocast_dtype("cpu", "fp16")


@pytest.mark.gpu
def test_precision_on_this_gpu_follows_its_native_bf16():
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert inference_dtype("cuda") == (torch.bfloat16 if native else torch.float16)
    if native:
        assert training_autocast_dtype("cuda", "bf16") == torch.bfloat16
    else:
        with pytest.raises(PrecisionError, match=torch.cuda.get_device_name()):
            training_autocast_dtype("cuda", "bf16")
