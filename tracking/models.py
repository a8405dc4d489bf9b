"""Trained SpeechLMs found through MLflow: a registry URI (`models:/name@alias`, `models:/name/3`) or a run artifact
(`runs:/<run_id>/model`) resolved to a local folder; a local folder written by `SpeechLM.save_pretrained` is checked
and passed through (`models.saved.local_model_dir`).

Registered versions point at the run's `model` artifact folder (see jobs/train.py); MLflow downloads it into a
local cache folder. The serving engine (`models.engine`) serves that folder as it is (it is also a vLLM model
folder), given `model_resolver(tracking_uri)` to resolve with; `load_speechlm` loads it as the trained PyTorch
model (`models.saved.load_speechlm`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from models.saved import CONFIG_FILE, ModelNotFound, is_local_model, local_model_dir
from tracking.artifacts import download
from tracking.client import client_for
from tracking.registry import registered_version


def resolve_model_dir(uri: str, tracking_uri: str | None = None, dst: str | None = None) -> Path:
    """A local folder holding the saved SpeechLM named by `uri`."""
    if is_local_model(uri):
        return local_model_dir(uri)
    from mlflow.exceptions import MlflowException

    # Everything explicit (no mlflow.set_tracking_uri/set_registry_uri): a process may talk to several servers.
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri and not uri.startswith(("file:", "s3:", "gs:", "http:", "https:")):
        # MLflow would look in ./mlruns and report only that the model does not exist
        raise ModelNotFound(
            f"{uri} names an MLflow model but no tracking server is given: set MLFLOW_TRACKING_URI in this "
            f"process's environment (for Serve replicas: the cluster's nodes or the app's runtime_env) or pass "
            f"tracking_uri"
        )
    client = client_for(tracking_uri)
    try:
        if uri.startswith("models:/"):
            version = registered_version(client, uri)
            source = client.get_model_version_download_uri(version.name, version.version)
        else:
            source = uri
        path = download(source, tracking_uri, dst)
    except MlflowException as e:
        raise ModelNotFound(f"{uri}: {e.message}") from e
    if not (path / CONFIG_FILE).is_file():
        raise ModelNotFound(f"{uri} resolved to {path}, which holds no saved SpeechLM")
    return path


def model_resolver(tracking_uri: str | None):
    """`uri -> local folder` through this tracking server: what the serving engine (`models.engine.EngineStore`)
    is given to find the models it is asked for."""
    return functools.partial(resolve_model_dir, tracking_uri=tracking_uri)


def load_speechlm(uri: str, *, tracking_uri: str | None = None, device: str = "cpu", dtype=None):
    """The trained PyTorch SpeechLM `uri` names (resolved here, loaded by `models.saved.load_speechlm`)."""
    from models.saved import load_speechlm as load_saved

    return load_saved(resolve_model_dir(uri, tracking_uri), device=device, dtype=dtype)
