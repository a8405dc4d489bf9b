"""Shared fixtures: the tiny tokenizer and models, deterministic audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import tiny
from models.speechlm import build_speechlm
from models.tokenizer import build_tiny_tokenizer


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer(["hello world", "the answer is five", "Two plus three is five."])


@pytest.fixture
def make_model(tokenizer):
    """make_model(lm_mode="lora", encoder_kind="fastconformer", seed=0, **overrides) -> SpeechLM on CPU."""

    def _make(lm_mode="lora", encoder_kind="fastconformer", seed=0, encoder_train=True, adapter_train=True):
        torch.manual_seed(seed)
        cfg = tiny(lm_mode=lm_mode, encoder_kind=encoder_kind)
        cfg.encoder.train = encoder_train
        cfg.adapter.train = adapter_train
        return build_speechlm(cfg, tokenizer=tokenizer)

    return _make


@pytest.fixture
def audio():
    """audio(seconds, seed=0) -> 16 kHz float32 noise-like waveform with some structure."""

    def _audio(seconds: float, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        n = int(seconds * 16000)
        t = np.arange(n) / 16000
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)
        return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)

    return _audio
