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
    from mlflow.tracking import MlflowClient

    # Everything explicit (no mlflow.set_tracking_uri/set_registry_uri): a process may talk to several servers.
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri and not uri.startswith(("file:", "s3:", "gs:", "http:", "https:")):
        # MLflow would look in ./mlruns and report only that the model does not exist
        raise ModelNotFound(
            f"{uri} names an MLflow model but no tracking server is given: set MLFLOW_TRACKING_URI in this "
            f"process's environment (for Serve replicas: the cluster's nodes or the app's runtime_env) or pass "
            f"tracking_uri"
        )
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if uri.startswith("models:/"):
            rest = uri[len("models:/"):].rstrip("/")
            if "@" in rest:
                name, alias = rest.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, number = rest.rsplit("/", 1)
                version = client.get_model_version(name, number)
            source = client.get_model_version_download_uri(version.name, version.version)
        else:
            source = uri
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=tracking_uri)
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
