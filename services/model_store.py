"""Find a trained SpeechLM: an MLflow registry URI (`models:/name@alias`, `models:/name/3`), a run artifact
(`runs:/<run_id>/model`), or a local folder written by `SpeechLM.save_pretrained`.

Registered versions point at the run's `model` artifact folder (see jobs/train.py); MLflow downloads it into a
local cache folder and `SpeechLM.from_pretrained` loads it (JSON + safetensors only, nothing unpickled).
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFound(LookupError):
    pass


def resolve_model_dir(uri: str, tracking_uri: str | None = None, dst: str | None = None) -> Path:
    """A local folder holding the saved SpeechLM named by `uri`."""
    if "://" not in uri and not uri.startswith(("models:", "runs:")):
        path = Path(uri).expanduser()
        if not (path / "speechlm_config.json").is_file():
            raise ModelNotFound(f"{path} is not a saved SpeechLM (no speechlm_config.json)")
        return path
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except MlflowException as e:
        raise ModelNotFound(f"{uri}: {e.message}") from e
    path = Path(local)
    if not (path / "speechlm_config.json").is_file():
        raise ModelNotFound(f"{uri} resolved to {path}, which holds no saved SpeechLM")
    return path


def load_speechlm(uri: str, *, tracking_uri: str | None = None, device: str = "cpu", dtype=None):
    import torch

    from models.speechlm import SpeechLM

    return SpeechLM.from_pretrained(resolve_model_dir(uri, tracking_uri), device=device,
                                    dtype=dtype or torch.float32)
