"""Find and load trained SpeechLMs: an MLflow registry URI (`models:/name@alias`, `models:/name/3`), a run artifact
(`runs:/<run_id>/model`), or a local folder written by `SpeechLM.save_pretrained`.

Registered versions point at the run's `model` artifact folder (see jobs/train.py); MLflow downloads it into a
local cache folder and `SpeechLM.from_pretrained` loads it (JSON + safetensors only, nothing unpickled).

`ModelStore` is how a server holds several fine-tunes: LoRA fine-tunes of the same base LM share one copy of it
(each adds its LoRA as a named PEFT adapter, its own encoder and modality adapter), so a replica's memory grows by
what a fine-tune trained, not by the base. The method fine-tunes the encoder too, so that is part of what each
fine-tune brings.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import threading
import weakref
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


class SharedBase:
    """One PEFT-wrapped base LM holding the LoRA adapters of several fine-tunes. Only one adapter is active at a
    time, so each use takes `lock` and activates its own. An adapter is deleted once no loaded fine-tune uses it:
    `release` only queues the name (it may be called from any thread, e.g. a garbage collection on the event loop,
    which must not wait for a generation), and the next holder of the lock deletes it."""

    def __init__(self, lm):
        self._lm = weakref.ref(lm)
        self.lock = threading.RLock()
        self._released: list[str] = []
        self._released_lock = threading.Lock()

    @property
    def lm(self):
        return self._lm()

    def release(self, lora_name: str) -> None:
        with self._released_lock:
            self._released.append(lora_name)

    def activate(self, lora_name: str) -> None:
        """Delete released adapters, then make `lora_name` the active one. Call with `lock` held."""
        lm = self.lm
        with self._released_lock:
            released, self._released = self._released, []
        for name in released:
            if name in lm.peft_config and len(lm.peft_config) > 1:
                lm.delete_adapter(name)
        if lora_name is not None:
            lm.set_adapter(lora_name, inference_mode=True)

    def adapters(self) -> int:
        lm = self.lm
        return 0 if lm is None else len(lm.peft_config)


class ServedModel:
    """A loaded SpeechLM as a server uses it. What runs the LM (`generate`, and anything inside `active()`) holds
    the shared base with this fine-tune's LoRA active; the rest (`processor`, `tokenizer`, `config`,
    `stop_token_ids`) is this fine-tune's own and touches no LM weight. Nothing else of the model is forwarded: a
    use of its LM outside `active()` would run with whichever adapter another request left active."""

    def __init__(self, model, base: SharedBase | None = None, lora_name: str | None = None):
        self.model, self.base, self.lora_name = model, base, lora_name
        if base is not None:
            weakref.finalize(self, base.release, lora_name)

    @property
    def processor(self):
        return self.model.processor

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def config(self):
        return self.model.config

    def stop_token_ids(self) -> list[int]:
        return self.model.stop_token_ids()

    @contextlib.contextmanager
    def active(self):
        """Hold this fine-tune's base with its LoRA active: every use of `.model`'s LM belongs inside."""
        if self.base is None:
            yield self.model
            return
        with self.base.lock:
            self.base.activate(self.lora_name)
            yield self.model

    def generate(self, conversations, **kwargs):
        with self.active() as model:
            return model.generate(conversations, **kwargs)


class ModelStore:
    """Loads served models (`load(uri)`), putting LoRA fine-tunes of one base LM on one shared copy of it
    (`share_bases=False`: every fine-tune whole, as `load_speechlm` gives). Safe to call from several threads."""

    def __init__(self, tracking_uri: str | None = None, device: str = "cpu", dtype=None, share_bases: bool = True):
        self.tracking_uri, self.device, self.dtype, self.share_bases = tracking_uri, device, dtype, share_bases
        self._bases: dict[str, SharedBase] = {}
        self._loaded: weakref.WeakSet[ServedModel] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._names = itertools.count(1)

    def load(self, uri: str) -> ServedModel:
        import torch

        from models.speechlm import SpeechLM

        path = resolve_model_dir(uri, self.tracking_uri)
        key = base_lm_key(path) if self.share_bases else None
        dtype = self.dtype or torch.float32
        with self._lock:
            base = self._bases.get(key) if key is not None else None
            if base is None or base.lm is None:
                model = SpeechLM.from_pretrained(path, device=self.device, dtype=dtype)
                base = None
                if key is not None:  # the first fine-tune of this base: its adapter is PEFT's "default"
                    base = self._bases[key] = SharedBase(model.lm)
                served = ServedModel(model, base, model.lm.active_adapter if base else None)
            else:
                name = f"finetune-{next(self._names)}"
                with base.lock:  # not while another fine-tune of this base generates
                    base.activate(None)
                    model = SpeechLM.from_pretrained(path, device=self.device, dtype=dtype, share_lm=base.lm,
                                                     lora_name=name)
                served = ServedModel(model, base, name)
            self._loaded.add(served)
            return served

    def stats(self) -> dict:
        """What is loaded: fine-tunes, base LMs they share, LoRA adapters on those bases."""
        bases = [b for b in self._bases.values() if b.lm is not None]
        return {"loaded_models": len(self._loaded), "shared_lm_bases": len(bases),
                "lora_adapters_on_shared_bases": sum(b.adapters() for b in bases)}


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
