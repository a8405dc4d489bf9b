"""Mixed-modal chat on Ray Serve, speaking OpenAI's Chat Completions API (with audio input).

    serve run services/serve_config.yaml                 # or: serve deploy services/serve_config.yaml
    serve run services.chat_app:build_app model=models:/vtblender-demo@candidate

Routes: `POST /v1/chat/completions` (streaming with SSE), `GET /v1/models`, `GET /v1/stats`, `GET /health` (no
auth) and `GET /` (no auth): a chat page (`services/chat_page.html`) that records from the microphone or takes an
audio file, puts typed text around it, streams the answer in, and keeps the conversation (it sends the key typed
into it to the API routes).

- Models: `model` (an MLflow URI `models:/name@alias` / `models:/name/3`, a `runs:/` URI or a local folder) is served
  as `served_model_name`; `models` adds more fine-tunes (id -> URI). The request's `model` field picks one; each
  replica keeps up to 3 extra fine-tunes loaded (`serve.multiplexed`, least recently used evicted).
- Engine: vLLM (`models.engine`; the model class is `models.vllm_speechlm`), finding MLflow URIs through
  `tracking.models`. With `engine.lora: shared` (the
  GPU default) LoRA fine-tunes of one base LM share one engine: each adds its LoRA (a vLLM LoRA) and its own encoder
  and modality adapter (the method fine-tunes those too); `merged` (the CPU default) gives each its own engine with
  the LoRA merged in. `GET /v1/stats` says what is loaded. Resources are the config's `engine:` (KV-cache space,
  threads, sequences per step).
- Throughput: the engine batches continuously: every request, streaming or not, joins the running batch at the
  engine's next step and leaves it when done; its tokens reach it as they are generated and each ends on its own
  (`services/chat_generation.py`). `GET /v1/stats` reports the engine's busy periods and the requests they held,
  streamed requests, prefill and decode seconds, and the replica's and its engines' resident memory.
- Limits and access: `services.openai_protocol.Limits`; an optional API key (from the environment variable named
  by `api_key_env`) is required as `Authorization: Bearer ...` on every route but `/health`.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation on the routes.

import asyncio
import hmac
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import Field
from ray import serve

from models.config import StrictModel
from models.conversation import ConversationError
from models.engine import EngineSettings
from services.chat_generation import EngineLoad, Row, generate_row, sse
from services.openai_protocol import (CHAT_REQUEST_SCHEMA, APIError, ChatRequest, Limits, parse_chat_request,
                                     read_body)
from services.replica_memory import process_rss_bytes


class ServeConfig(StrictModel):
    model: str
    """The default model: models:/name@alias, models:/name/version, runs:/id/model, or a local folder."""
    served_model_name: str = "vtblender"
    models: dict[str, str] = Field(default_factory=dict)
    """More fine-tunes served from the same deployment: model id -> URI (chosen by the request's `model`)."""
    tracking_uri: str | None = None
    api_key_env: str | None = None
    """Name of the environment variable holding the API key; None: no key required."""
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """The weights' dtype: auto is bf16 on GPUs that compute it natively, fp32 on older GPUs (V100,
    T4) and CPU; fp16 only when asked (Gemma overflows it)."""
    engine: EngineSettings = Field(default_factory=EngineSettings)
    """The vLLM engines' resources: KV-cache space, CPU threads, sequences per step, LoRA slots."""
    limits: Limits = Field(default_factory=Limits)
    num_replicas: int | str = 1
    """An int, or "auto" with `autoscaling` below."""
    autoscaling: dict[str, Any] | None = None
    num_gpus_per_replica: float | Literal["auto"] = "auto"
    """GPUs each replica holds; auto: 1 when the cluster has GPUs (a replica without one would run on its CPU
    while the GPUs idle), else 0."""


app = FastAPI(title="vtblender chat", docs_url=None, redoc_url=None)
CHAT_PAGE = Path(__file__).with_name("chat_page.html").read_text()


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    """Every route raises APIError for bad requests; one handler renders OpenAI's error body."""
    return JSONResponse(status_code=e.status, content=e.body())


@app.exception_handler(ConversationError)
async def _conversation_error(request: Request, e: ConversationError) -> JSONResponse:
    # a conversation the model cannot take (e.g. text containing the audio placeholder): 400, not 500
    return JSONResponse(status_code=400, content=APIError(400, str(e), "messages").body())


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class ChatDeployment:
    async def __init__(self, config: dict):
        from models.precision import inference_dtype, resolve_device
        from models.engine import EngineStore
        from tracking.models import model_resolver

        self.cfg = ServeConfig.model_validate(config)
        self.device = resolve_device(self.cfg.device)
        self.dtype = inference_dtype(self.device, self.cfg.precision)
        self.uris = {self.cfg.served_model_name: self.cfg.model, **self.cfg.models}
        self.api_key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if self.cfg.api_key_env and not self.api_key:
            raise RuntimeError(f"api_key_env={self.cfg.api_key_env!r} but that environment variable is not set")
        self.created = int(time.time())
        self.store = EngineStore(self.cfg.engine, model_resolver(self.cfg.tracking_uri), str(self.device), self.dtype)
        self.load = EngineLoad()
        self._streams: set[asyncio.Task] = set()  # streaming generations running (kept referenced)
        # load the default model now, and hear a short silence with it: a replica is healthy only when it can answer
        # an audio turn (a model whose audio path fails on this device would otherwise fail every such request)
        self._default = self._load(self.cfg.served_model_name)
        await self._self_test(self._default)
        # requests are decoded at the rate the served models were trained at (every model here shares one)
        self.sampling_rate = self._default.sampling_rate

    # -- models -------------------------------------------------------------------------------------------------
    def _load(self, model_id: str):
        return self.store.load(self.uris[model_id])

    @staticmethod
    async def _self_test(served) -> None:
        import numpy as np

        from models.conversation import AudioPart, Conversation, TextPart, Turn

        silence = np.zeros(served.sampling_rate // 2, dtype=np.float32)
        await served.answer(Conversation([Turn("user", [AudioPart(silence), TextPart("?")])]), max_new_tokens=1)

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str):
        if model_id == self.cfg.served_model_name:
            return self._default
        return await asyncio.to_thread(self._load, model_id)

    async def _model_for(self, req: ChatRequest):
        model_id = req.model or self.cfg.served_model_name
        if model_id not in self.uris:
            raise APIError(404, f"model {model_id!r} is not served here; available: {sorted(self.uris)}", "model",
                           "model_not_found")
        return model_id, await self.get_model(model_id)

    # -- routes -------------------------------------------------------------------------------------------------
    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        # constant time: how long a wrong key takes to refuse says nothing of how much of it was right
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key")

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page(self) -> str:
        return CHAT_PAGE

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        self._check_key(request)
        models = [{"id": m, "object": "model", "created": self.created, "owned_by": "vtblender"}
                  for m in sorted(self.uris)]
        return {"object": "list", "data": models}

    @app.get("/v1/stats")
    async def batch_stats(self, request: Request):
        self._check_key(request)
        s = self.load.counts
        return {**s, **self.store.stats(), "replica_rss_mib": round(process_rss_bytes() / 2**20, 1),
                "engine_rss_mib": round(process_rss_bytes(children=True) / 2**20, 1),
                "mean_batch_size": round(s["batched_requests"] / max(1, s["generate_calls"]), 3),
                "decode_ms_per_step": round(1000 * s["decode_s"] / max(1, s["decode_steps"]), 3)}

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": CHAT_REQUEST_SCHEMA}}}})
    async def chat_completions(self, request: Request):
        self._check_key(request)
        raw = await read_body(request.stream(), request.headers.get("content-length"), self.cfg.limits.max_body_bytes)
        try:
            body = json.loads(raw)
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        except RecursionError:  # nesting deeper than Python's recursion limit: valid JSON, but not a request
            raise APIError(400, "the request body is nested too deeply") from None
        req = await asyncio.to_thread(parse_chat_request, body, self.cfg.limits, self.sampling_rate)
        model_id, model = await self._model_for(req)
        prompt, n_prompt, audio_tokens = await asyncio.to_thread(model.prompt, req.conversation)
        if n_prompt > self.cfg.limits.max_prompt_tokens:
            raise APIError(413, f"the prompt is {n_prompt} tokens (audio included), over the limit of "
                                f"{self.cfg.limits.max_prompt_tokens}", "messages", "context_length_exceeded")
        if n_prompt >= model.max_model_len:
            raise APIError(413, f"the prompt is {n_prompt} tokens (audio included); the model takes at most "
                                f"{model.max_model_len - 1}", "messages", "context_length_exceeded")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        usage = {"prompt_tokens": n_prompt, "prompt_tokens_details": {"audio_tokens": audio_tokens},
                 "audio_seconds": round(req.audio_seconds, 3)}
        if req.stream:
            row = Row(req, model_id, model, asyncio.get_running_loop(), prompt)
            task = asyncio.ensure_future(generate_row(row, self.load))  # runs while the response streams from the row
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)
            return StreamingResponse(sse(row, rid, usage), media_type="text/event-stream")
        row = Row(req, model_id, model, prompt=prompt)
        try:
            await generate_row(row, self.load)
        except asyncio.CancelledError:  # the client went away: its engine request was aborted
            row.cancel()
            raise
        if row.error is not None:
            raise APIError(500, f"generation failed: {row.error}", None, "generation_failed")
        out = row.result()
        usage.update(completion_tokens=out["completion_tokens"], total_tokens=n_prompt + out["completion_tokens"])
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": out["finish_reason"]}],
                "usage": usage}


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run` / `serve deploy` (`import_path: services.chat_app:build_app`)."""
    import ray

    cfg = ServeConfig.model_validate(args)
    gpus = cfg.num_gpus_per_replica
    if gpus == "auto":
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    options: dict[str, Any] = {"ray_actor_options": {"num_gpus": gpus, "num_cpus": 1}}
    if cfg.autoscaling:
        options["autoscaling_config"] = cfg.autoscaling
    else:
        options["num_replicas"] = cfg.num_replicas
    return ChatDeployment.options(**options).bind(cfg.model_dump(mode="json"))
