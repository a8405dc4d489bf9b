"""Generation for the chat app without a server: stop strings end generation inside `generate()`, and a stream
closed early (stopped, or its client gone) ends its generation instead of running on to max_tokens."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from services import chat_generation
from services.openai_protocol import Limits, parse_chat_request

MAX = 120


@pytest.fixture(scope="module")
def model():
    from models.config import tiny
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer

    torch.manual_seed(3)
    m = build_speechlm(tiny(), tokenizer=build_tiny_tokenizer(["hello there, how are you?"]))
    m.eval()
    return m


def _request(stop=None, stream=False):
    # sampled with a seed: reproducible, and varied text (this random model's greedy answer is one token repeated)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": MAX, "temperature": 1.0, "seed": 0,
            "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    if stop:
        body["stop"] = stop
    return parse_chat_request({k: v for k, v in body.items() if v is not None}, Limits(), 16000)


def test_stop_string_ends_generation_inside_generate(model):
    (free_text,), (free_ids,) = chat_generation.generate(model, [_request().conversation], _request().params)
    assert len(free_ids) == MAX  # this random model never ends on its own: without a stop it runs to max_tokens
    # the first two letters in a row of the answer, and how many tokens it took to write them
    k, stop = next((k, m.group()) for k in range(1, MAX) if (m := re.search(
        "[A-Za-z]{2}", model.tokenizer.decode(free_ids[:k], skip_special_tokens=True))))
    assert k < MAX // 4
    req = _request(stop=[stop])
    (text,), (ids,) = chat_generation.generate(model, [req.conversation], req.params)
    assert len(ids) == k  # it stopped at the token that completed the stop string
    assert stop in text and free_text.startswith(text.strip())


def test_a_stream_closed_early_stops_its_generation(model, monkeypatch):
    lengths = []
    original = chat_generation.generate

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        lengths.append(len(out[1][0]))
        return out

    monkeypatch.setattr(chat_generation, "generate", recording)

    async def read_two_chunks_then_leave():
        stream = chat_generation.sse(model, _request(stream=True), "id", "m", {"prompt_tokens": 1})
        chunks = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()  # what Starlette does when the client disconnects
        return chunks

    chunks = asyncio.run(read_two_chunks_then_leave())
    assert '"role": "assistant"' in chunks[0] and '"content"' in chunks[1]
    assert lengths and lengths[0] < MAX  # generation ended when the stream did, not at max_tokens
