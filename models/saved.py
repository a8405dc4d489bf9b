"""Saved SpeechLMs in local folders (written by `SpeechLM.save_pretrained`): which names are folders, the check that
a folder holds one, loading it, and which fine-tunes share a base LM.

`load_speechlm` loads a folder as the trained PyTorch model (JSON + safetensors only, nothing unpickled), for
exporting and as the reference the serving engine (`models.engine`) is tested against. `base_lm_key` says which
fine-tunes share a base LM (and so one engine). Not for MLflow URIs (`models:/`, `runs:/`): `tracking.models`
resolves those to a folder first.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CONFIG_FILE = "speechlm_config.json"  # `models.speechlm.CONFIG_FILE`, here without importing torch


class ModelNotFound(LookupError):
    pass


def is_local_model(uri: str) -> bool:
    """`uri` names a folder (not the registry, a run or object storage)."""
    return "://" not in uri and not uri.startswith(("models:", "runs:"))


def local_model_dir(uri: str) -> Path:
    """The folder `uri` names, when it holds a saved SpeechLM (else `ModelNotFound`, saying so)."""
    path = Path(uri).expanduser()
    if not (path / CONFIG_FILE).is_file():
        raise ModelNotFound(f"{path} is not a saved SpeechLM (no {CONFIG_FILE})")
    return path


def load_speechlm(model_dir: str | Path, *, device: str = "cpu", dtype=None):
    """The trained PyTorch SpeechLM saved in the local folder `model_dir` (`tracking.models.load_speechlm` takes an
    MLflow URI)."""
    import torch

    from models.speechlm import SpeechLM

    return SpeechLM.from_pretrained(local_model_dir(str(model_dir)), device=device, dtype=dtype or torch.float32)


def base_lm_key(model_dir: Path) -> str | None:
    """What names the base LM weights under a saved LoRA fine-tune (fine-tunes with equal keys can share one
    base), or None when the fine-tune cannot share one (its LM is frozen or fully trained: no LoRA)."""
    from models.speechlm import LM_DIR, LORA_DIR

    lm = json.loads((model_dir / CONFIG_FILE).read_text())["lm"]
    if lm["mode"] != "lora" or not (model_dir / LORA_DIR).is_dir():
        return None
    weights = sorted((model_dir / LM_DIR).glob("*.safetensors"))
    if not weights:  # the base is a checkpoint named in the config (a hub id or a path)
        return f"pretrained:{lm['pretrained']}"
    digest = hashlib.sha256()  # saved base weights (a base trained here): equal only when the bytes are
    for f in weights:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"
