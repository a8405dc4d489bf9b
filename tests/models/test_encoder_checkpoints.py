"""Encoders from their own checkpoints: tiny Parakeet (FastConformer) and Whisper checkpoint folders, saved as
transformers writes them (config, weights, feature extractor), load and run; a checkpoint that does not fit the
config (another encoder kind, mel bins, sampling rate) is refused before anything is built, every problem named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import (ParakeetEncoder, ParakeetEncoderConfig, ParakeetFeatureExtractor, WhisperConfig,
                          WhisperFeatureExtractor, WhisperModel)

from jobs.recipe import RecipeError, parse_recipe
from jobs.training.plan import resolve
from jobs.training.preflight import check_model
from models.config import tiny
from models.conversation import AudioPart, Conversation, TextPart, Turn
from models.checkpoint_check import checkpoint_problems
from models.speechlm import build_speechlm
from models.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def parakeet_128(tmp_path_factory):
    """A FastConformer taking 128 mel bins (as Canary-1B does)."""
    out = tmp_path_factory.mktemp("parakeet")
    cfg = dict(tiny().encoder.config, num_mel_bins=128)
    torch.manual_seed(0)
    ParakeetEncoder(ParakeetEncoderConfig(**cfg)).save_pretrained(out)
    ParakeetFeatureExtractor(feature_size=128, sampling_rate=16000).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def whisper_80(tmp_path_factory):
    out = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    WhisperModel(WhisperConfig(**tiny(encoder_kind="whisper").encoder.config)).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000).save_pretrained(out)
    return out


def _answer(model) -> str:
    audio = np.random.default_rng(0).uniform(-0.3, 0.3, 16000).astype(np.float32)
    conv = Conversation([Turn("user", [TextPart("Transcribe:"), AudioPart(audio)])])
    return model.generate([conv], max_new_tokens=3)[0]


def test_a_parakeet_checkpoint_loads_with_its_own_mel_count_and_runs(parakeet_128):
    cfg = tiny()
    cfg.encoder.pretrained, cfg.n_mels = str(parakeet_128), 128
    assert checkpoint_problems(cfg) == []
    model = build_speechlm(cfg, tokenizer=build_tiny_tokenizer())
    assert model.encoder.features.mel_fb.shape[0] == 128  # the mel filterbank the checkpoint needs
    saved = ParakeetEncoder.from_pretrained(parakeet_128)
    for (name, p), q in zip(model.encoder.encoder.named_parameters(), saved.parameters()):
        assert torch.equal(p, q), name  # the checkpoint's weights, not a fresh init
    assert isinstance(_answer(model), str)


def test_a_whisper_checkpoint_loads_and_runs(whisper_80):
    cfg = tiny(encoder_kind="whisper")
    cfg.encoder.pretrained, cfg.encoder.config = str(whisper_80), {}
    assert checkpoint_problems(cfg) == []
    assert isinstance(_answer(build_speechlm(cfg, tokenizer=build_tiny_tokenizer())), str)


def test_a_checkpoint_that_does_not_fit_is_refused_with_every_problem(parakeet_128, whisper_80, tmp_path):
    cfg = tiny()  # fastconformer, 80 mels
    cfg.encoder.pretrained = str(parakeet_128)
    problems = checkpoint_problems(cfg)
    assert len(problems) == 2 and all("128" in p and "n_mels=80" in p for p in problems), problems

    cfg.encoder.pretrained = str(whisper_80)
    assert any("'whisper' model, but encoder.kind is 'fastconformer'" in p for p in checkpoint_problems(cfg))

    at_8k = tmp_path / "whisper-8k"
    shutil.copytree(whisper_80, at_8k)
    pre = at_8k / "preprocessor_config.json"
    pre.write_text(pre.read_text().replace('"sampling_rate": 16000', '"sampling_rate": 8000'))
    cfg = tiny(encoder_kind="whisper")
    cfg.encoder.pretrained = str(at_8k)
    assert any("8000 Hz" in p for p in checkpoint_problems(cfg))

    # the training job says it before any worker starts
    recipe = parse_recipe({
        "run": {"name": "x", "experiment": "x", "storage_path": str(tmp_path)},
        "model": {"size": "tiny", "encoder_pretrained": str(parakeet_128)},
        "data": {"sources": {"text": {"uris": [str(tmp_path)], "ratio": 1.0, "batch_size": 1}}},
        "train": {"max_steps": 1}})
    with pytest.raises(RecipeError, match=r"(?s)cannot be built from its checkpoints.*128 mel bins.*n_mels=80"):
        check_model(resolve(recipe))


def test_a_missing_local_checkpoint_is_named_not_taken_for_a_hub_id(tmp_path):
    """A local path that is not there says so; transformers alone would try it as a hub id and complain about
    the id's form."""
    missing = str(tmp_path / "models" / "canary-encoder")
    cfg = tiny()
    cfg.encoder.pretrained = missing
    with pytest.raises(FileNotFoundError, match=r"encoder\.pretrained '.*canary-encoder': no such local folder"):
        build_speechlm(cfg, tokenizer=build_tiny_tokenizer())
    (problem,) = checkpoint_problems(cfg)
    assert "no such local folder" in problem and "Repo id" not in problem

    cfg = tiny()
    cfg.lm.pretrained = missing
    with pytest.raises(FileNotFoundError, match=r"lm\.pretrained '.*canary-encoder': no such local folder"):
        build_speechlm(cfg)
    assert all("no such local folder" in p for p in checkpoint_problems(cfg))
