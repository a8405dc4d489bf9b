"""OpenAI Chat Completions requests with audio -> `Conversation` + sampling settings, with limits and clear errors.

Accepted user content parts (any number, anywhere, in any user turn):
- `{"type": "text", "text": ...}`
- `{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"|"mp3"|"flac"|"ogg"|...}}` (OpenAI)
- `{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,..."}}` or `{"audio_url": "<url>"}` (vLLM)
Audio is decoded by sniffing the bytes (libsndfile: WAV, FLAC, OGG, MP3), averaged to mono and resampled to 16 kHz.
`format` is advisory, as in vLLM, but must name a format we can decode.

http(s) `audio_url`s are fetched only when the config allows it, only from allow-listed hosts, never from loopback,
link-local or private addresses, with a size and time cap (a server-side request forgery risk otherwise).

Every problem raises `APIError(status, message, param, code)`, rendered as OpenAI's error body.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import socket
from typing import Any
from urllib.parse import urlparse

import numpy as np
from pydantic import Field

from models.audio import AudioDecodeError, decode_audio
from models.config import StrictModel
from models.conversation import AudioPart, Conversation, TextPart, Turn, lone_surrogate

AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg", "oga", "opus", "aiff", "aif", "au"}  # what libsndfile decodes


class Limits(StrictModel):
    """Request limits (all enforced with a 4xx naming the limit; nothing is truncated silently)."""

    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    max_audio_seconds_per_part: float = Field(120.0, gt=0)
    max_audio_seconds_per_request: float = Field(300.0, gt=0)
    max_audio_parts: int = Field(16, ge=1)
    max_turns: int = Field(64, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    max_prompt_tokens: int = Field(8192, ge=16)
    fetch_urls: bool = False
    """Fetch http(s) audio_url parts (off by default: SSRF risk)."""
    fetch_allowed_hosts: list[str] = Field(default_factory=list)
    fetch_max_bytes: int = Field(10 * 1024 * 1024, ge=1)
    fetch_timeout_s: float = Field(10.0, gt=0)


def _part_schemas() -> list[dict]:
    text = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    input_audio = {"type": "object", "required": ["type", "input_audio"], "properties": {
        "type": {"const": "input_audio"},
        "input_audio": {"type": "object", "required": ["data"],
                        "properties": {"data": {"type": "string", "format": "byte"},
                                       "format": {"enum": sorted(AUDIO_FORMATS)}}}}}
    audio_url = {"type": "object", "required": ["audio_url"], "properties": {
        "type": {"const": "audio_url"},
        "audio_url": {"oneOf": [{"type": "string"},
                                {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}]}}}
    return [text, input_audio, audio_url]


CHAT_REQUEST_SCHEMA = {
    "type": "object", "required": ["messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"], "properties": {
                "role": {"enum": ["system", "developer", "user", "assistant"]},
                "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": _part_schemas()}},
                                      {"type": "null"}]}}}},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "seed": {"type": "integer"},
        "n": {"type": "integer", "const": 1},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    },
}
"""The request body as JSON Schema, for the app's OpenAPI document (what clients and API fuzzers read): the route
parses the body itself (`parse_chat_request`), so this documents the shape rather than enforcing it."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


DRAIN_FACTOR, DRAIN_MAX_BYTES = 8, 256 * 1024 * 1024


async def read_body(chunks, declared_length: str | None, limit: int) -> bytes:
    """The request body from its ASGI `chunks` (Starlette's `request.stream()`), refused with 413 once it is known to
    be over `limit` bytes: from its Content-Length, else while reading (a chunked body has none). An oversized body
    is never held in memory; it is read on and dropped, up to `DRAIN_FACTOR` times the limit (at most
    `DRAIN_MAX_BYTES`), before the 413 goes out.

    Why read what is refused: a server that answers while the client is still sending closes the connection under
    the upload, and curl, requests and the openai client then report a connection reset, never the 413 and its
    message. Past the drain cap the connection is dropped after all (the client still gets no answer, but the
    server does not read gigabytes for it)."""

    def too_large(size: str) -> APIError:
        return APIError(413, f"the request body ({size}) is over the limit of {limit} bytes", None, "body_too_large")

    drain = min(DRAIN_FACTOR * limit, DRAIN_MAX_BYTES)
    declared = int(declared_length) if declared_length is not None and declared_length.strip().isdigit() else None
    if declared is not None and declared > limit:
        if declared <= drain:
            async for _ in chunks:
                pass
        raise too_large(f"{declared} bytes")
    body, size = bytearray(), 0
    async for chunk in chunks:
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif body:
            body = bytearray()  # over: drop what was kept, count the rest
        if size > drain:
            break
    if size > limit:
        raise too_large(f"more than {limit} bytes")
    return bytes(body)


MIN_SAMPLING_TEMPERATURE = 1e-3


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None

    @property
    def greedy(self) -> bool:
        # below this, sampling is greedy for every practical purpose, and dividing the logits by the temperature
        # overflows to inf (5e-324 did: "probability tensor contains inf", found by the API fuzzing)
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    def key(self) -> tuple:
        """Requests with equal keys can share one batched generate() call."""
        return (self.max_new_tokens, self.temperature, self.top_p, self.seed)


@dataclasses.dataclass
class ChatRequest:
    model: str | None
    conversation: Conversation
    params: SamplingParams
    stream: bool
    include_usage: bool
    audio_seconds: float


def decode_audio_bytes(data: bytes, where: str, limits: Limits, sampling_rate: int) -> np.ndarray:
    """Request audio -> mono float32 at the model's rate (`models.audio`), its problems as 4xx API errors."""
    try:
        return decode_audio(data, sampling_rate, max_seconds=limits.max_audio_seconds_per_part)
    except AudioDecodeError as e:
        status = 413 if e.code == "audio_too_long" else 400
        suffix = " per audio part" if e.code == "audio_too_long" else ""
        raise APIError(status, f"{where}: {e}{suffix}", where, e.code) from None


def _b64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise APIError(400, f"{where}: the audio data is not valid base64", where, "invalid_base64") from None


def _unicode(text: str, where: str) -> str:
    at = lone_surrogate(text)
    if at is not None:
        raise APIError(400, f"{where} is not valid Unicode: a lone surrogate at character {at}", where,
                       "invalid_unicode")
    return text


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


def _host_is_public(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast
                or ip.is_unspecified):
            return False
    return True


def fetch_audio_url(url: str, where: str, limits: Limits) -> bytes:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise APIError(400, f"{where}: audio_url must be a data: URL or http(s) URL, got scheme {parsed.scheme!r}",
                       where, "invalid_audio_url")
    if not limits.fetch_urls:
        raise APIError(400, f"{where}: fetching audio from URLs is disabled on this server; send the audio inline "
                            "as input_audio or a data: URL", where, "url_fetch_disabled")
    host = parsed.hostname or ""
    if host not in limits.fetch_allowed_hosts:
        raise APIError(400, f"{where}: host {host!r} is not in this server's allow-list for audio URLs", where,
                       "url_host_not_allowed")
    if not _host_is_public(host):
        raise APIError(400, f"{where}: host {host!r} resolves to a private, loopback or link-local address",
                       where, "url_host_not_allowed")
    import requests

    try:
        with requests.get(url, stream=True, timeout=limits.fetch_timeout_s, allow_redirects=False) as r:
            if r.status_code != 200:
                raise APIError(400, f"{where}: fetching the audio URL gave HTTP {r.status_code}", where, "fetch_failed")
            chunks, size = [], 0
            for chunk in r.iter_content(64 * 1024):
                size += len(chunk)
                if size > limits.fetch_max_bytes:
                    raise APIError(413, f"{where}: the audio URL is over the limit of {limits.fetch_max_bytes} bytes",
                                   where, "audio_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as e:
        raise APIError(400, f"{where}: fetching the audio URL failed: {type(e).__name__}", where,
                       "fetch_failed") from None


def _audio_part(part: dict, where: str, limits: Limits, sampling_rate: int) -> AudioPart:
    kind = part.get("type", "audio_url" if "audio_url" in part else None)
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise APIError(400, f"{where}: input_audio needs {{'data': <base64>, 'format': ...}}", where)
        fmt = str(spec.get("format", "wav")).lower()
        if fmt not in AUDIO_FORMATS:
            raise APIError(400, f"{where}: unsupported audio format {fmt!r}; use one of {sorted(AUDIO_FORMATS)}",
                           where, "unsupported_audio_format")
        data = _b64(spec["data"], where)
    else:
        spec = part.get("audio_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{where}: audio_url needs a url", where)
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise APIError(400, f"{where}: data URLs must be base64-encoded", where, "invalid_audio_url")
            mime = header[5:].split(";")[0]
            if mime and not mime.startswith("audio/"):
                raise APIError(400, f"{where}: data URL type {mime!r} is not audio", where, "unsupported_audio_format")
            data = _b64(payload, where)
        else:
            data = fetch_audio_url(url, where, limits)
    return AudioPart(decode_audio_bytes(data, where, limits, sampling_rate), sampling_rate)


def _message_parts(m: dict, role: str, where: str, limits: Limits, sampling_rate: int, audio: dict) -> list:
    """One message's content as parts; `audio` counts the request's audio parts and seconds so far."""
    content = m.get("content")
    if isinstance(content, str):
        return [TextPart(_unicode(content, f"{where}.content"))]
    if content is None and role == "assistant":
        return [TextPart("")]
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", f"{where}.content")
    parts: list = []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise APIError(400, f"{pw} must be an object", pw)
        kind = part.get("type", "audio_url" if "audio_url" in part else None)
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{pw}.text must be a string", pw)
            parts.append(TextPart(_unicode(part["text"], f"{pw}.text")))
        elif kind in ("input_audio", "audio_url"):
            if role != "user":
                raise APIError(400, f"{pw}: audio is accepted in user messages only", pw)
            audio["parts"] += 1
            if audio["parts"] > limits.max_audio_parts:
                raise APIError(413, f"{pw}: more than {limits.max_audio_parts} audio parts in one request",
                               pw, "too_many_audio_parts")
            part_audio = _audio_part(part, pw, limits, sampling_rate)
            audio["seconds"] += part_audio.duration
            if audio["seconds"] > limits.max_audio_seconds_per_request:
                raise APIError(413, f"{pw}: {audio['seconds']:.1f} s of audio in this request is over the limit of "
                                    f"{limits.max_audio_seconds_per_request:g} s", pw, "audio_too_long")
            parts.append(part_audio)
        else:
            raise APIError(400, f"{pw}: content part type {kind!r} is not supported; use text, input_audio "
                                "or audio_url", f"{pw}.type", "unsupported_content_part")
    return parts


def _turns(messages: list, limits: Limits, sampling_rate: int) -> tuple[list[Turn], float]:
    """The messages as turns (consecutive messages of one role form one turn), and the seconds of audio."""
    turns: list[Turn] = []
    audio = {"parts": 0, "seconds": 0.0}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role must be system, user or assistant, got {role!r}", f"{where}.role")
        parts = _message_parts(m, role, where, limits, sampling_rate, audio)
        if turns and turns[-1].role == role and role != "system":
            turns[-1].parts.extend(parts)
        else:
            turns.append(Turn(role=role, parts=parts))
    if turns[-1].role != "user":
        raise APIError(400, "the last message must be from the user (the model answers it)", "messages")
    return turns, audio["seconds"]


def _sampling(body: dict, limits: Limits) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = min(256, limits.max_new_tokens) if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, "max_tokens must be a positive integer", "max_tokens")
    if max_tokens > limits.max_new_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_new_tokens}",
                       "max_tokens", "max_tokens_too_large")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise APIError(400, "temperature must be a number in [0, 2]", "temperature")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise APIError(400, "top_p must be a number in (0, 1]", "top_p")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    stop = [_unicode(s, "stop") for s in stop]
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise APIError(400, f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", "seed")
    return SamplingParams(max_tokens, float(temperature), float(top_p), stop, seed)


def parse_chat_request(body: Any, limits: Limits, sampling_rate: int) -> ChatRequest:
    """An OpenAI Chat Completions body -> `ChatRequest`, audio decoded at `sampling_rate` (the model's
    `config.sampling_rate`). Raises `APIError` (4xx) naming the field at fault."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    if len(messages) > limits.max_turns:
        raise APIError(413, f"{len(messages)} messages is over the limit of {limits.max_turns}", "messages",
                       "too_many_messages")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    turns, seconds = _turns(messages, limits, sampling_rate)
    params = _sampling(body, limits)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    return ChatRequest(
        model=model, conversation=Conversation(turns),
        params=params,
        stream=bool(body.get("stream", False)), include_usage=bool(stream_options.get("include_usage", False)),
        audio_seconds=seconds,
    )


def apply_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` at the first stop string; True when cut."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
