"""Does a SpeechLM config fit the checkpoints it names? Read from their configs alone (no weights), before anything
is built or any worker starts, so a mismatch is one message naming every problem instead of a failure deep inside
training: the encoder's kind, mel bins and sampling rate (its config and feature extractor), LoRA targets that match
no layer of the LM, an LM tokenizer without a chat template."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from models.config import SpeechLMConfig, checkpoint_source
from models.skeleton import lm_skeleton
from models.speechlm import check_lora_targets


def checkpoint_problems(cfg: SpeechLMConfig) -> list[str]:
    """What does not fit between `cfg` and the checkpoints it names, read from their configs alone (no weights):
    the encoder's kind, mel bins and sampling rate, the LM's tokenizer and chat template. Empty when all fits.
    Called before any worker starts, so a mismatch is one message, not a failure deep inside training."""
    problems = []
    e = cfg.encoder
    if e.pretrained:
        try:
            enc = AutoConfig.from_pretrained(checkpoint_source(e.pretrained, "encoder.pretrained"))
        except (OSError, ValueError) as err:
            problems.append(f"encoder checkpoint {e.pretrained}: cannot read its config ({err})")
            enc = None
        if enc is not None:
            kind = "whisper" if enc.model_type == "whisper" else (
                "fastconformer" if enc.model_type.startswith("parakeet") else None)
            if kind != e.kind:
                problems.append(f"encoder checkpoint {e.pretrained} is a {enc.model_type!r} model, but encoder.kind "
                                f"is {e.kind!r} (fastconformer takes Parakeet/Canary checkpoints, whisper Whisper)")
            enc = getattr(enc, "encoder_config", enc)  # ParakeetCTC checkpoints hold the encoder's config inside
            mels = getattr(enc, "num_mel_bins", None)
            if mels is not None and mels != cfg.n_mels:
                problems.append(f"encoder checkpoint {e.pretrained} takes {mels} mel bins, the config says "
                                f"n_mels={cfg.n_mels}")
        pre = _preprocessor_config(e.pretrained)
        if pre:
            if pre.get("sampling_rate") not in (None, cfg.sampling_rate):
                problems.append(f"encoder checkpoint {e.pretrained} was trained on {pre['sampling_rate']} Hz audio, "
                                f"the config says sampling_rate={cfg.sampling_rate}")
            if pre.get("feature_size") not in (None, cfg.n_mels):
                problems.append(f"encoder checkpoint {e.pretrained}'s feature extractor makes {pre['feature_size']} "
                                f"mel bins, the config says n_mels={cfg.n_mels}")
    if cfg.lm.mode == "lora" and not isinstance(cfg.lm.lora.target_modules, str):
        try:  # the LM's layers, built on the meta device from its config (no weights read)
            check_lora_targets(lm_skeleton(cfg), cfg.lm.lora.target_modules)
        except ValueError as err:
            problems.append(str(err))
        except OSError as err:
            problems.append(f"LM {cfg.lm.pretrained}: cannot read its config ({err})")
    source = cfg.lm.tokenizer or cfg.lm.pretrained
    if source:
        what = "lm.tokenizer" if cfg.lm.tokenizer else "lm.pretrained"
        try:
            tok = AutoTokenizer.from_pretrained(checkpoint_source(source, what))
            if tok.chat_template is None:
                problems.append(f"the tokenizer of {source} has no chat template: use an instruction-tuned LM's")
        except (OSError, ValueError) as err:
            problems.append(f"LM {source}: cannot load its tokenizer ({err})")
    return problems


def _preprocessor_config(source: str) -> dict | None:
    path = Path(source) / "preprocessor_config.json"
    if path.is_file():  # a local checkpoint; a hub id's is read when it is downloaded, not here
        return json.loads(path.read_text())
    return None
