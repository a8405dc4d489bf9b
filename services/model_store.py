"""Find trained SpeechLMs: an MLflow registry URI (`models:/name@alias`, `models:/name/3`), a run artifact
(`runs:/<run_id>/model`), or a local folder written by `SpeechLM.save_pretrained`.

Registered versions point at the run's `model` artifact folder (see jobs/train.py); MLflow downloads it into a
local cache folder. The serving engine (`services.engine`) serves that folder as it is (it is also a vLLM model
folder); `load_speechlm` loads it as the trained PyTorch model (JSON + safetensors only, nothing unpickled), for
exporting and as the reference the engine is tested against. `base_lm_key` says which fine-tunes share a base LM
(and so one engine).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class ModelNotFound(LookupError):
    pass


def is_local_model(uri: str) -> bool:
    """`uri` names a folder (not the registry, a run or object storage)."""
    return "://" not in uri and not uri.startswith(("models:", "runs:"))


def resolve_model_dir(uri: str, tracking_uri: str | None = None, dst: str | None = None) -> Path:
    """A local folder holding the saved SpeechLM named by `uri`."""
    if is_local_model(uri):
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
            version = registered_version(client, uri)
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


def registered_version(client, uri: str):
    """The MLflow `ModelVersion` a `models:/name@alias` or `models:/name/3` URI names."""
    rest = uri.removeprefix("models:/").rstrip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, number = rest.rsplit("/", 1)
    return client.get_model_version(name, number)


def load_speechlm(uri: str, *, tracking_uri: str | None = None, device: str = "cpu", dtype=None):
    import torch

    from models.speechlm import SpeechLM

    return SpeechLM.from_pretrained(resolve_model_dir(uri, tracking_uri), device=device,
                                    dtype=dtype or torch.float32)


def base_lm_key(model_dir: Path) -> str | None:
    """What names the base LM weights under a saved LoRA fine-tune (fine-tunes with equal keys can share one
    base), or None when the fine-tune cannot share one (its LM is frozen or fully trained: no LoRA)."""
    from models.speechlm import CONFIG_FILE, LM_DIR, LORA_DIR

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


def process_rss_bytes(children: bool = False) -> int:
    """This process's resident memory (`children`: that of the processes it started, e.g. its vLLM engines): a
    replica's leak shows in /v1/stats before it kills the node. Here, not in the app module: Ray Serve pickles the
    deployment class, and helpers it calls must come from an imported module."""
    import psutil

    me = psutil.Process()
    if not children:
        return me.memory_info().rss
    total = 0
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # it ended meanwhile
            pass
    return total
