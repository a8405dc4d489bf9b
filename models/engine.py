"""The serving engine: trained SpeechLMs on vLLM (`models/vllm_speechlm.py`), as the chat app and batch
evaluation use them.

`EngineStore.load(uri)` gives a `ServedModel` for a saved SpeechLM: a local folder, or whatever name the store's
`resolve` function turns into one (the callers give `tracking.models.model_resolver` for MLflow URIs; this module
knows nothing of MLflow).

Which fine-tunes share an engine (the rule, `EngineSettings.lora`): with `shared` (the default on a GPU), fine-tunes
whose LM is the same base (`models.saved.base_lm_key`: the same pretrained checkpoint, or byte-equal saved base
weights) share one vLLM engine, each with its LM's LoRA as a vLLM LoRA and its own audio tower (encoder and modality
adapter, which the method fine-tunes too), read by the engine the first time one of its audios comes. With `merged`
(the default on a CPU, where vLLM's LoRA costs an einsum per token), each fine-tune's LoRA is merged into a copy of
its LM and it has an engine of its own. A model without a LoRA (a frozen or fully trained LM) has an engine of its
own either way.

`ServedModel` does what a request needs: the exact training prompt (`prompt`: the model's own
`ConversationProcessor`, audio collapsed to one marker per part for vLLM to expand), and `generate`, an async
stream of the tokens so far. The engine batches continuously: a request joins the running batch at the next step
and leaves it when done; nothing waits for the longest.

Resources are explicit (`EngineSettings`): KV-cache bytes, CPU threads, sequences per step, LoRA slots.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

from pydantic import Field

from models.config import StrictModel
from models.saved import base_lm_key, local_model_dir


class EngineSettings(StrictModel):
    """What one vLLM engine may take (the serve config's `engine:`)."""

    kv_cache_gib: float = Field(1.0, gt=0)
    """KV-cache space per engine, GiB (vLLM would otherwise take most of the machine's memory on a CPU)."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """On a GPU: the share of its memory the engine may use for weights, activations and KV cache."""
    cpu_threads: int | None = Field(None, ge=1)
    """Threads of an engine on a CPU (vLLM's default is one)."""
    max_num_seqs: int = Field(16, ge=1)
    """Requests decoded together in one engine step."""
    max_model_len: int | None = Field(None, ge=64)
    """Prompt (audio positions included) plus answer, in tokens; None: the LM's own context length."""
    max_loras: int = Field(4, ge=1)
    """LoRA fine-tunes one engine step can mix."""
    max_lora_rank: int = Field(64, ge=1)
    enforce_eager: bool | Literal["auto"] = "auto"
    """auto: eager on a CPU (no graph capture there), CUDA graphs on a GPU."""
    lora: Literal["auto", "shared", "merged"] = "auto"
    """How a LoRA fine-tune's LM runs. shared: the base LM once per engine, each fine-tune's LoRA applied per
    request (vLLM's LoRA), so fine-tunes of one base share the engine. merged: the LoRA merged into a copy of the LM,
    an engine per fine-tune, no LoRA cost per token. auto: shared on a GPU (vLLM's punica kernels), merged on a CPU,
    where vLLM's LoRA is an einsum per token (measured here: a burst of 16 requests waits 151 ms for its first tokens
    with the LoRA applied, 36 ms merged)."""


class ServedModel:
    """One served fine-tune: its engine, its LoRA (None: the engine's base LM as it is) and its own prompt rules."""

    def __init__(self, folder: Path, engine, lora, processor, stop_token_ids: list[int], marker_id: int,
                 sampling_rate: int):
        self.folder, self.engine, self.lora = folder, engine, lora
        self.processor, self.tokenizer = processor, processor.tokenizer
        self._stop_ids, self.marker_id, self.sampling_rate = stop_token_ids, marker_id, sampling_rate

    def stop_token_ids(self) -> list[int]:
        return list(self._stop_ids)

    @property
    def max_model_len(self) -> int:
        """Prompt plus answer positions the engine takes."""
        return self.engine.model_config.max_model_len

    def prompt(self, conversation) -> tuple[dict, int, int]:
        """The engine prompt of `conversation` (its last turn a user turn), its length in tokens (audio positions
        included) and its audio positions."""
        enc = self.processor.encode(conversation, for_generation=True)
        return self._engine_prompt(enc), len(enc.input_ids), int(sum(enc.audio_mask))

    def _engine_prompt(self, encoded) -> dict:
        """An encoded conversation as the engine takes it, its audio heard by this fine-tune's tower."""
        from models.vllm_speechlm import TOWER_KWARG, engine_prompt

        prompt = engine_prompt(encoded, self.processor.audio_token_count, self.marker_id)
        if encoded.audios:
            prompt["mm_processor_kwargs"] = {TOWER_KWARG: str(self.folder)}
        return prompt

    def sampling(self, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                              top_p=1.0 if greedy else top_p, seed=seed, stop_token_ids=self.stop_token_ids(),
                              detokenize=False, skip_special_tokens=True)

    async def generate(self, prompt: dict, sampling) -> AsyncIterator:
        """vLLM's outputs for one request, each with every token so far; closing the stream aborts it."""
        async for out in self.engine.generate(prompt, sampling, f"req-{uuid.uuid4().hex}", lora_request=self.lora):
            yield out

    async def answer(self, conversation, max_new_tokens: int = 64) -> tuple[str, list[int]]:
        """Greedy answer of one conversation: its text and token ids (stop tokens dropped), as
        `SpeechLM.generate` gives them."""
        prompt, _, _ = self.prompt(conversation)
        out = None
        async for output in self.generate(prompt, self.sampling(max_new_tokens)):
            out = output
        stops = set(self._stop_ids)
        ids = list(out.outputs[0].token_ids) if out is not None else []
        ids = ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids

    async def answers(self, conversations, max_new_tokens: int = 64) -> list[str]:
        """Greedy answers of `conversations`, all in the engine at once (it batches them)."""
        import asyncio

        return [text for text, _ in await asyncio.gather(*(self.answer(c, max_new_tokens) for c in conversations))]

    async def answer_losses(self, conversations) -> list[tuple[float, int]]:
        """Per conversation: (summed cross-entropy over its answer tokens, how many), teacher-forced by the engine
        (its prompt log-probabilities) on the training encoding (`models.content_check.answer_token_losses` on the
        trained model computes the same)."""
        import asyncio

        from models.processor import IGNORE_INDEX

        async def one(conv) -> tuple[float, int]:
            enc = self.processor.encode(conv)
            out = None
            async for output in self.generate(self._engine_prompt(enc), self.scoring()):
                out = output
            # prompt_logprobs[i]: log p(token i | tokens before it), over the expanded prompt (= enc.input_ids)
            logprobs = out.prompt_logprobs
            picked = [(logprobs[i][t].logprob) for i, t in enumerate(enc.labels) if t != IGNORE_INDEX]
            return -float(sum(picked)), len(picked)

        return list(await asyncio.gather(*(one(c) for c in conversations)))

    def scoring(self):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)


class EngineStore:
    """vLLM engines for saved SpeechLMs, shared by fine-tunes of one base LM (module docstring). Thread-safe."""

    def __init__(self, settings: EngineSettings | None = None, resolve: Callable[[str], Path] | None = None,
                 device: str = "cpu", dtype=None):
        """`resolve`: a model's name -> its local folder (default: names are folders)."""
        self.settings = settings or EngineSettings()
        self.resolve = resolve or local_model_dir
        self.device, self.dtype = device, dtype
        self._engines: dict[str, object] = {}
        self._loras: dict[str, set[str]] = {}
        self._users: dict[str, int] = {}  # engine key -> served models using it
        self._loaded: weakref.WeakSet[ServedModel] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._lora_ids = itertools.count(1)
        self.start_seconds: list[float] = []

    def load(self, uri: str) -> ServedModel:
        from transformers import AutoTokenizer
        from vllm.lora.request import LoRARequest

        from models.config import SpeechLMConfig
        from models.engine_config import ENGINE_CONFIG_FILE, audio_marker_id
        from models.processor import ConversationProcessor
        from models.speechlm import CONFIG_FILE, LORA_DIR, TOKENIZER_DIR
        from models.vllm_speechlm import AudioGeometry

        folder = self.resolve(uri).resolve()
        if not (folder / ENGINE_CONFIG_FILE).is_file():
            _write_engine_config(folder)
        cfg = SpeechLMConfig.model_validate_json((folder / CONFIG_FILE).read_text())
        tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)
        geometry = AudioGeometry(str(folder))
        processor = ConversationProcessor(tokenizer, geometry.count, cfg.audio_placeholder, cfg.sampling_rate)
        merge = (folder / LORA_DIR).is_dir() and self._lora_mode() == "merged"
        key = f"merged:{folder}" if merge else base_lm_key(folder) or f"folder:{folder}"
        stop_ids, marker = processor.stop_token_ids(cfg.lm.end_of_turn), audio_marker_id(tokenizer)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = self._start(folder, _merged_lm(folder) if merge else None)
            lora = None
            if (folder / LORA_DIR).is_dir() and not merge:
                n = next(self._lora_ids)
                lora = LoRARequest(f"{folder.name}-{n}", n, str(folder / LORA_DIR))
                self._loras.setdefault(key, set()).add(lora.lora_name)
            # made in a frame of its own: a traceback kept by a module this function imported holds this frame,
            # and with it every local, which would keep the model (and its engine) alive for good
            return self._register(key, ServedModel(folder, engine, lora, processor, stop_ids, marker,
                                                   cfg.sampling_rate))

    def _register(self, key: str, served: ServedModel) -> ServedModel:
        self._loaded.add(served)
        self._users[key] = self._users.get(key, 0) + 1
        weakref.finalize(served, self._release, key, served.lora.lora_name if served.lora else None)
        return served

    def _release(self, key: str, lora_name: str | None) -> None:
        """A served model is gone (e.g. evicted by Serve's multiplexing): its engine stops when no other uses it."""
        with self._lock:
            if lora_name is not None:
                self._loras.get(key, set()).discard(lora_name)
            if key not in self._users:  # the store was shut down
                return
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                self._loras.pop(key, None)
                engine = self._engines.pop(key, None)
                if engine is not None:
                    engine.shutdown()

    def _lora_mode(self) -> str:
        import torch

        if self.settings.lora != "auto":
            return self.settings.lora
        return "shared" if torch.device(self.device).type == "cuda" else "merged"

    def _start(self, folder: Path, merged_lm: Path | None = None):
        """A vLLM engine on `folder` (the first fine-tune of its base; with `merged_lm`, its LM with the LoRA merged
        in), with the settings' resources."""
        import json

        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from models.engine_config import ENGINE_CONFIG_FILE

        s = self.settings
        on_gpu = torch.device(self.device).type == "cuda"
        overrides: dict = {}
        if merged_lm is not None:
            meta = json.loads((folder / ENGINE_CONFIG_FILE).read_text())["vtblender"]
            overrides = {"vtblender": {**meta, "lm_source": str(merged_lm)}}
        if s.cpu_threads and not on_gpu:
            # read by the engine process vLLM starts next (it sets torch to one thread without it)
            os.environ["OMP_NUM_THREADS"] = str(s.cpu_threads)
        args = AsyncEngineArgs(
            model=str(folder), dtype=_dtype_name(self.dtype), seed=0, max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs, enable_lora=merged_lm is None, max_loras=s.max_loras,
            max_lora_rank=s.max_lora_rank, hf_overrides=overrides,
            kv_cache_memory_bytes=int(s.kv_cache_gib * 2**30), gpu_memory_utilization=s.gpu_memory_utilization,
            enforce_eager=(not on_gpu) if s.enforce_eager == "auto" else s.enforce_eager,
            disable_log_stats=True)
        t0 = time.perf_counter()
        engine = AsyncLLM.from_engine_args(args)
        self.start_seconds.append(round(time.perf_counter() - t0, 2))
        return engine

    def stats(self) -> dict:
        """What is loaded: fine-tunes, the engines (one per base LM) they share, LoRA adapters on those."""
        return {"loaded_models": len(self._loaded), "shared_lm_bases": len(self._engines),
                "lora_adapters_on_shared_bases": sum(len(v) for v in self._loras.values()),
                "engine_start_s": list(self.start_seconds)}

    def shutdown(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.shutdown()
            self._engines.clear()
            self._users.clear()


def _dtype_name(dtype) -> str:
    import torch

    return {None: "float32", torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def _merged_lm(folder: Path) -> Path:
    """The fine-tune's LM with its LoRA merged into the weights (PEFT's `merge_and_unload`), saved once in a cache
    folder beside the system's temporary files, keyed by the fine-tune's folder and LoRA weights."""
    import hashlib
    import shutil
    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from models.config import SpeechLMConfig, checkpoint_source
    from models.speechlm import CONFIG_FILE, LM_DIR, LORA_DIR

    digest = hashlib.sha256(str(folder).encode())
    for f in sorted((folder / LORA_DIR).glob("*")):
        digest.update(f.read_bytes())
    out = Path(tempfile.gettempdir()) / "vtblender-merged-lm" / digest.hexdigest()[:24]
    if (out / "config.json").is_file():
        return out
    cfg = SpeechLMConfig.model_validate_json((folder / CONFIG_FILE).read_text())
    source = folder / LM_DIR if (folder / LM_DIR).is_dir() else checkpoint_source(cfg.lm.pretrained, "lm.pretrained")
    lm = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, dtype=torch.float32)  # merged in fp32
    merged = PeftModel.from_pretrained(lm, str(folder / LORA_DIR)).merge_and_unload()
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    try:
        tmp.rename(out)  # complete or absent
    except OSError:  # another process merged it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_engine_config(folder: Path) -> None:
    """A model saved before its folder carried `config.json`: write it now (the LM's config, where its weights
    are), from the saved files alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from models.config import SpeechLMConfig, checkpoint_source
    from models.engine_config import write_engine_config
    from models.speechlm import CONFIG_FILE, LM_DIR, TOKENIZER_DIR

    cfg = SpeechLMConfig.model_validate_json((folder / CONFIG_FILE).read_text())
    source = LM_DIR if (folder / LM_DIR).is_dir() else cfg.lm.pretrained
    lm_config = AutoConfig.from_pretrained(folder / LM_DIR if source == LM_DIR else checkpoint_source(source, "lm"))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(lm_config)
    write_engine_config(folder, lm, AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR), source)


class BlockingRunner:
    """An event loop in a thread of its own, for callers without one (batch evaluation, benchmarks): `runner(coro)`
    runs a coroutine there and returns its result. An engine serves the loop it first generated on, so one runner
    goes with one store."""

    def __init__(self):
        import asyncio

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()

    def __call__(self, coro, timeout: float | None = None):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
