"""Which fine-tunes share a base LM (and so one serving engine), and an engine's audio towers in bf16: the weights
in bf16, the buffers the code computes kept fp32, as in training."""

from __future__ import annotations

import torch

from models.config import tiny
from models.precision import computed_buffers
from models.saved import base_lm_key
from tests.services.serve_app import save_fine_tunes


def test_only_equal_bases_are_shared(tmp_path):
    fine_tunes = save_fine_tunes(tmp_path, ["a", "b"])
    other = save_fine_tunes(tmp_path, ["x"], seed=5)["x"]  # another random base
    assert base_lm_key(fine_tunes["b"]) == base_lm_key(fine_tunes["a"]) is not None
    assert base_lm_key(other) != base_lm_key(fine_tunes["a"])
    f = save_fine_tunes(tmp_path, ["f"], config=tiny(lm_mode="frozen"))["f"]
    assert base_lm_key(f) is None  # no LoRA: nothing to put on a shared base, an engine of its own


def test_an_engines_audio_tower_in_bf16_keeps_its_computed_buffers_fp32(tmp_path):
    """The tower `models.vllm_speechlm` builds for each fine-tune (the engine builds under its dtype as torch's
    default): the mel filterbank, window and position frequencies stay fp32 beside bf16 weights."""
    from models.vllm_speechlm import _build_tower, _speech_config

    folder = save_fine_tunes(tmp_path, ["a"], config=tiny(encoder_kind="whisper"))["a"]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        encoder, adapter = _build_tower(_speech_config(str(folder)), lm_hidden=64)
    finally:
        torch.set_default_dtype(default)
    kept = [(name, b.dtype) for _, name, b in computed_buffers(encoder)]
    assert "mel_fb" in {n for n, _ in kept} and all(d == torch.float32 for _, d in kept), kept
    assert adapter.proj_in.weight.dtype == torch.bfloat16 and next(encoder.encoder.parameters()).dtype == torch.bfloat16
