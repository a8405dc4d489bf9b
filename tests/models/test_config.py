"""Typed model config: unknown keys and impossible values fail at load, with the field named."""

from __future__ import annotations

import pydantic
import pytest

from models.config import NAMED_SIZES, SpeechLMConfig, tiny


@pytest.mark.parametrize("name", sorted(NAMED_SIZES))
def test_named_sizes_validate_and_round_trip_through_json(name):
    cfg = NAMED_SIZES[name]()
    assert SpeechLMConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"adapter": {"num_layers": 2, "hidden_sise": 64}}, "hidden_sise"),
        ({"lm": {"mode": "qlora", "config": {"model_type": "gemma"}}}, "mode"),
        ({"adapter": {"hidden_size": 100, "num_heads": 8}}, "not divisible by num_heads"),
        ({"encoder": {"config": {"num_mel_bins": 128}}, "n_mels": 80}, "num_mel_bins=128 but n_mels=80"),
        ({"lm": {"config": {}}}, "model_type"),
    ],
)
def test_bad_config_names_the_problem(patch, field):
    base = tiny().model_dump()
    for k, v in patch.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    with pytest.raises(pydantic.ValidationError, match=field):
        SpeechLMConfig.model_validate(base)
