"""LoRA lands on attention and MLP whatever the architecture names them, and a named target that matches nothing
is an error (PEFT alone only fails when no target matches, so Gemma's names on Phi-3 silently wrapped 2 of 7)."""

from __future__ import annotations

import pytest

from models.config import tiny
from models.speechlm import build_speechlm
from models.tokenizer import build_tiny_tokenizer

PHI3 = dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def _wrapped(model) -> set[str]:
    suffix = ".lora_A.default.weight"
    return {name[: -len(suffix)].rsplit(".", 1)[-1] for name, _ in model.lm.named_parameters() if name.endswith(suffix)}


@pytest.mark.parametrize("lm_config, expected", [
    (None, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),  # Gemma (tiny's own)
    (PHI3, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),  # fused projections
])
def test_default_targets_are_attention_and_mlp_of_any_architecture(lm_config, expected):
    cfg = tiny()
    if lm_config:
        cfg.lm.config = dict(lm_config)
    model = build_speechlm(cfg, tokenizer=build_tiny_tokenizer())
    assert _wrapped(model) == expected
    assert not any("lm_head" in n and "lora_" in n for n, _ in model.lm.named_parameters())


def test_a_target_that_matches_nothing_is_an_error_naming_the_layers():
    cfg = tiny()
    cfg.lm.config = dict(PHI3)
    cfg.lm.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(ValueError) as e:
        build_speechlm(cfg, tokenizer=build_tiny_tokenizer())
    msg = str(e.value)
    assert "['q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj'] match no linear layer of this phi3 LM" in msg
    assert "'qkv_proj'" in msg and "'gate_up_proj'" in msg


def test_the_checkpoint_check_names_a_wrong_target_before_anything_is_built():
    from models.checkpoint_check import checkpoint_problems

    cfg = tiny()
    cfg.lm.config = dict(PHI3)
    cfg.lm.lora.target_modules = ["q_proj", "o_proj"]
    (problem,) = checkpoint_problems(cfg)
    assert "['q_proj'] match no linear layer of this phi3 LM" in problem
    cfg.lm.lora.target_modules = ["qkv_proj", "o_proj"]
    assert checkpoint_problems(cfg) == []
