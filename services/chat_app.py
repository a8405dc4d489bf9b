"""Mixed-modal chat on Ray Serve, speaking OpenAI's Chat Completions API (with audio input).

    serve run services/serve_config.yaml                 # or: serve deploy services/serve_config.yaml
    serve run services.chat_app:build_app model=models:/vtblender-demo@candidate

Routes: `POST /v1/chat/completions` (streaming with SSE), `GET /v1/models`, `GET /v1/stats`, `GET /health` (no
auth) and `GET /` (no auth): a chat page (`services/chat_page.html`) that records from the microphone or takes an
audio file, puts typed text around it, streams the answer in, and keeps the conversation (it sends the key typed
into it to the API routes).

- Models: `model` (an MLflow URI `models:/name@alias` / `models:/name/3`, a `runs:/` URI or a local folder) is served
  as `served_model_name`; `models` adds more fine-tunes (id -> URI). The request's `model` field picks one; each
  replica keeps up to 3 extra fine-tunes loaded (`serve.multiplexed`, least recently used evicted). LoRA
  fine-tunes of one base LM share one copy of it (`services.model_store.ModelStore`): each adds its LoRA adapter,
  encoder and modality adapter (the method fine-tunes those too); `GET /v1/stats` says what is loaded.
- Throughput: every request, streaming or not, is batched: when generation is free, every request queued
  meanwhile (up to `max_batch_size`) is taken; requests with the same model and sampling settings share one
  left-padded `generate()`, whose prefill runs the encoder once per audio part; each
  request's tokens reach it as they are generated and each ends on its own (`services/chat_generation.py`).
  `GET /v1/stats` reports batches, requests, streamed requests, prefill and decode seconds, and the replica's
  resident memory.
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
from services.chat_generation import Row, generate_rows, prompt_tokens, sse
from services.model_store import process_rss_bytes
from services.openai_protocol import (CHAT_REQUEST_SCHEMA, APIError, ChatRequest, Limits, parse_chat_request,
                                     read_body)


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
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
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


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(app)
class ChatDeployment:
    def __init__(self, config: dict):
        from models.precision import inference_dtype, resolve_device

        self.cfg = ServeConfig.model_validate(config)
        self.device = resolve_device(self.cfg.device)
        self.dtype = inference_dtype(self.device, self.cfg.precision)
        self.uris = {self.cfg.served_model_name: self.cfg.model, **self.cfg.models}
        self.api_key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if self.cfg.api_key_env and not self.api_key:
            raise RuntimeError(f"api_key_env={self.cfg.api_key_env!r} but that environment variable is not set")
        self._pending: asyncio.Queue | None = None  # rows waiting for the next batch (made on the replica's loop)
        self._batcher: asyncio.Task | None = None
        self.created = int(time.time())
        from services.model_store import ModelStore

        self.store = ModelStore(self.cfg.tracking_uri, self.device, self.dtype)
        self.stats = {"batches": 0, "batched_requests": 0, "streamed_requests": 0, "generate_calls": 0,
                      "streamed_in_shared_calls": 0, "prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        # load the default model now, and hear a short silence with it: a replica is healthy only when it can answer
        # an audio turn (a model whose audio path fails on this device would otherwise fail every such request)
        self._default = self._load(self.cfg.served_model_name)
        self._self_test(self._default)
        # requests are decoded at the rate the served models were trained at (every model here shares one)
        self.sampling_rate = self._default.config.sampling_rate

    # -- models -------------------------------------------------------------------------------------------------
    def _load(self, model_id: str):
        return self.store.load(self.uris[model_id])

    @staticmethod
    def _self_test(model) -> None:
        import numpy as np

        from models.conversation import AudioPart, Conversation, TextPart, Turn

        silence = np.zeros(model.config.sampling_rate // 2, dtype=np.float32)
        model.generate([Conversation([Turn("user", [AudioPart(silence), TextPart("?")])])], max_new_tokens=1)

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

    # -- generation ---------------------------------------------------------------------------------------------
    # Not `serve.batch`: it forms the next batch as soon as its wait timeout passes, while the previous one still
    # runs, so under load batches hold only the requests of one timeout window (measured: 3.4 requests per
    # generate() with 16 clients). Here the next batch is taken when generation is free again: everything that
    # arrived meanwhile, up to `max_batch_size`.
    def _submit(self, row: Row) -> asyncio.Future:
        """Queue a row for the next batch; the future resolves when its generation has finished."""
        if self._pending is None:
            self._pending = asyncio.Queue()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.ensure_future(self._batch_loop())
        done = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((row, done))
        return done

    async def _next_batch(self) -> list[tuple[Row, asyncio.Future]]:
        """Wait for a row, then take every row queued (waiting up to `batch_wait_timeout_s` for more while the
        batch is small), up to `max_batch_size`. Rows whose client left are finished, not generated."""
        batch = [await self._pending.get()]
        deadline = asyncio.get_running_loop().time() + self.cfg.batch_wait_timeout_s
        while len(batch) < self.cfg.max_batch_size:
            if self._pending.empty():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._pending.get(), remaining))
                except asyncio.TimeoutError:
                    break
            else:
                batch.append(self._pending.get_nowait())
        live = []
        for row, done in batch:
            if row.done.is_set():  # cancelled while queued
                row.finish()
                if not done.done():
                    done.set_result(None)
            else:
                live.append((row, done))
        return live

    async def _batch_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                await self._generate_batch([row for row, _ in batch])
            except Exception as e:  # noqa: BLE001 - a failed batch answers its rows; the loop serves the next
                for row, _ in batch:
                    row.finish(e)
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def _generate_batch(self, rows: list[Row]) -> None:
        """Rows taken together; each group with one model and sampling settings is one `generate()`. Results
        land in the rows (streams read them while this runs)."""
        self.stats["batches"] += 1
        self.stats["batched_requests"] += len(rows)
        self.stats["streamed_requests"] += sum(row.queue is not None for row in rows)
        groups: dict[tuple, list[Row]] = {}
        for row in rows:
            groups.setdefault((row.model_id, row.req.params.key()), []).append(row)
        for group in groups.values():
            timing = await asyncio.to_thread(generate_rows, group)
            self.stats["generate_calls"] += 1
            if len(group) > 1:
                self.stats["streamed_in_shared_calls"] += sum(row.queue is not None for row in group)
            self.stats["prefill_s"] += timing["prefill_s"]
            self.stats["decode_s"] += timing["decode_s"]
            self.stats["decode_steps"] += max(0, timing["steps"] - 1)

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
        s = self.stats
        return {**s, **self.store.stats(), "replica_rss_mib": round(process_rss_bytes() / 2**20, 1),
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
        n_prompt, audio_tokens = prompt_tokens(model, req)
        if n_prompt > self.cfg.limits.max_prompt_tokens:
            raise APIError(413, f"the prompt is {n_prompt} tokens (audio included), over the limit of "
                                f"{self.cfg.limits.max_prompt_tokens}", "messages", "context_length_exceeded")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        usage = {"prompt_tokens": n_prompt, "prompt_tokens_details": {"audio_tokens": audio_tokens},
                 "audio_seconds": round(req.audio_seconds, 3)}
        if req.stream:
            row = Row(req, model_id, model, asyncio.get_running_loop())
            self._submit(row)  # generation runs in a batch while the response streams from the row
            return StreamingResponse(sse(row, rid, usage), media_type="text/event-stream")
        row = Row(req, model_id, model)
        try:
            await self._submit(row)
        except asyncio.CancelledError:  # the client went away: stop its generation too
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
