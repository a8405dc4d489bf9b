"""Request parsing without a server: shapes, turn merging, limits, the URL-fetch guard, stop strings."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf

from services.openai_protocol import APIError, Limits, apply_stop, fetch_audio_url, parse_chat_request


def _b64(audio, sr=16000, fmt="WAV"):
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_parts_in_order_turns_merged_and_resampled():
    a8k = (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32)  # 1 s at 8 kHz
    body = {"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "First"},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": _b64(a8k, 8000), "format": "wav"}},
                                     {"audio_url": "data:audio/flac;base64," + _b64(a8k, 8000, "FLAC")}]}],
        "max_completion_tokens": 7, "temperature": 0, "stop": "END", "seed": 3,
        "stream": True, "stream_options": {"include_usage": True}}
    req = parse_chat_request(body, Limits(), 16000)
    roles = [t.role for t in req.conversation.turns]
    assert roles == ["system", "user"]  # developer -> system; consecutive user messages form one turn
    kinds = [type(p).__name__ for p in req.conversation.turns[1].parts]
    assert kinds == ["TextPart", "AudioPart", "AudioPart"]
    assert all(p.num_samples == 16000 for p in req.conversation.audio_parts)
    assert req.audio_seconds == pytest.approx(2.0)
    assert (req.params.max_new_tokens, req.params.greedy, req.params.stop, req.params.seed) == (7, True, ["END"], 3)
    assert req.stream and req.include_usage


@pytest.mark.parametrize("limits,body,status,code", [
    (Limits(max_turns=1), {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 413,
     "too_many_messages"),
    (Limits(max_audio_parts=1), {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": _b64(np.zeros(1600, np.float32)), "format": "wav"}}] * 2}]},
     413, "too_many_audio_parts"),
    (Limits(max_audio_seconds_per_request=0.15), {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": _b64(np.zeros(1600, np.float32)), "format": "wav"}}] * 2}]},
     413, "audio_too_long"),
    (Limits(), {"messages": [{"role": "assistant", "content": [
        {"type": "input_audio", "input_audio": {"data": _b64(np.zeros(1600, np.float32)), "format": "wav"}}]},
        {"role": "user", "content": "x"}]}, 400, None),
    (Limits(), {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, None),
    (Limits(), {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, None),
    (Limits(), {"messages": [{"role": "tool", "content": "x"}]}, 400, None),
])
def test_limits_and_bad_fields(limits, body, status, code):
    with pytest.raises(APIError) as e:
        parse_chat_request(body, limits, 16000)
    assert e.value.status == status and (code is None or e.value.code == code)
    assert e.value.body()["error"]["message"]


def test_url_fetch_guard():
    with pytest.raises(APIError, match="disabled"):
        fetch_audio_url("http://example.com/a.wav", "p", Limits())
    allow = Limits(fetch_urls=True, fetch_allowed_hosts=["localhost", "127.0.0.1"])
    with pytest.raises(APIError, match="not in this server's allow-list"):
        fetch_audio_url("http://example.com/a.wav", "p", allow)
    for url in ("http://127.0.0.1:9/a.wav", "http://localhost/a.wav"):  # allow-listed but loopback: still refused
        with pytest.raises(APIError, match="private, loopback or link-local"):
            fetch_audio_url(url, "p", allow)
    with pytest.raises(APIError, match="scheme 'file'"):
        fetch_audio_url("file:///etc/passwd", "p", allow)


def test_apply_stop():
    assert apply_stop("one two. three", ["."]) == ("one two", True)
    assert apply_stop("abc", ["x", "b"]) == ("a", True)
    assert apply_stop("abc", []) == ("abc", False)


async def _chunks(*parts: bytes):
    for p in parts:
        yield p


@pytest.mark.parametrize("declared, parts, expect", [
    (None, [b"a" * 600, b"b" * 600], "more than 1024 bytes"),  # no Content-Length: counted while reading
    ("2048", [b"a" * 2048], "(2048 bytes)"),  # refused from the header
    ("10", [b"a" * 1000, b"b" * 1000], "more than 1024 bytes"),  # a header that lies does not let it through
])
def test_body_over_the_limit_is_refused_while_reading(declared, parts, expect):
    import asyncio

    from services.openai_protocol import read_body

    with pytest.raises(APIError) as e:
        asyncio.run(read_body(_chunks(*parts), declared, 1024))
    assert e.value.status == 413 and expect in e.value.message
    assert asyncio.run(read_body(_chunks(b"x" * 1000, b"y" * 24), None, 1024)) == b"x" * 1000 + b"y" * 24


@pytest.mark.parametrize("with_length", [True, False])
def test_an_oversized_body_is_read_and_dropped_up_to_the_drain_cap_so_the_client_sees_the_413(with_length):
    """A server answering mid-upload resets the client's connection: the 413 is sent once the body is read, unless
    the body is past DRAIN_FACTOR x the limit (then reading stops there)."""
    import asyncio

    from services.openai_protocol import DRAIN_FACTOR, read_body

    read = []

    async def kib(n: int):
        for i in range(n):
            read.append(i)
            yield b"z" * 1024

    for n, header in ((4, "4096"), (100, "102400")):
        read.clear()
        with pytest.raises(APIError) as e:
            asyncio.run(read_body(kib(n), header if with_length else None, 1024))
        assert e.value.status == 413
        # 4 KiB: read to its end; 100 KiB: declared past the cap, not read at all, or read only to the cap
        assert len(read) == (n if n <= DRAIN_FACTOR else 0 if with_length else DRAIN_FACTOR + 1), (n, read)
