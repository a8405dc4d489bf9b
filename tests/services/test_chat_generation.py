"""Generation for the chat app without a server: requests run together on the engine as rows, and each ends on
its own (its stop string, its client gone) while the others go on; a stream closed early cancels its row."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from services.chat_generation import Row, generate_rows, sse
from services.openai_protocol import Limits, parse_chat_request

MAX = 60


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model(tmp_path_factory, loop):  # the engine stops before its event loop does
    from models.config import tiny
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer
    from models.engine import EngineSettings, EngineStore

    torch.manual_seed(3)
    m = build_speechlm(tiny(), tokenizer=build_tiny_tokenizer(["hello there, how are you?"]))
    store = EngineStore(EngineSettings(kv_cache_gib=0.25, max_num_seqs=4))
    yield store.load(str(m.save_pretrained(tmp_path_factory.mktemp("gen") / "m")))
    store.shutdown()


def _request(stop=None, stream=False):
    # sampled with a seed: reproducible, and varied text (this random model's greedy answer is one token repeated)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": MAX, "temperature": 1.0, "seed": 0,
            "stream": stream}
    if stop:
        body["stop"] = stop
    if stream:
        body["stream_options"] = {"include_usage": True}
    return parse_chat_request(body, Limits(), 16000)


def test_rows_of_one_batch_end_on_their_own(model, loop):
    free = [Row(_request(), "m", model) for _ in range(3)]
    loop(generate_rows(free))
    # the first two letters in a row of row 0's answer, and how many tokens it took to write them
    k, stop = next((k, m.group()) for k in range(1, MAX) if (m := re.search("[A-Za-z]{2}", free[0].text(k))))
    assert k < len(free[0].ids) and len(free[2].ids) > k + 10  # row 0 goes on after `stop`, row 2 long after

    # the same batch (same seed and shape: the same samples), now with a stop string and a client gone
    stopped, cancelled, other = Row(_request(stop=[stop]), "m", model), Row(_request(), "m", model), \
        Row(_request(), "m", model)
    cancelled.cancel()  # its client went away before its first token
    timing = loop(generate_rows([stopped, cancelled, other]))
    assert len(stopped.ids) == k and stopped.result()["finish_reason"] == "stop"  # at the token completing `stop`
    assert free[0].text().startswith(stopped.result()["text"]) and stop not in stopped.result()["text"]
    assert cancelled.ids == []
    assert other.ids == free[2].ids  # the batch went on for the row still wanted, unchanged
    assert timing["steps"] >= len(other.ids) and timing["prefill_s"] > 0 and timing["decode_s"] > 0


def test_a_stream_closed_early_cancels_its_row(model):
    async def read_the_first_chunk_then_leave():
        row = Row(_request(stream=True), "m", model, asyncio.get_running_loop())
        stream = sse(row, "id", {"prompt_tokens": 1})
        first = await stream.__anext__()
        await stream.aclose()  # what Starlette does when the client disconnects
        return row, first

    row, first = asyncio.run(read_the_first_chunk_then_leave())
    assert '"role": "assistant"' in first and row.done.is_set()


def test_a_stream_sends_its_tokens_as_they_come_and_the_usage(model, loop):
    async def run():
        row = Row(_request(stream=True), "m", model, asyncio.get_running_loop())
        generation = asyncio.ensure_future(generate_rows([row]))
        chunks = [c async for c in sse(row, "id", {"prompt_tokens": 1})]
        await generation
        return row, chunks

    row, chunks = loop(run())
    deltas = [re.search(r'"content": "(.*?)"}', c) for c in chunks[1:]]
    assert len([d for d in deltas if d and d.group(1)]) > 3  # many content chunks, not one at the end
    assert '"finish_reason": "length"' in chunks[-3] and f'"completion_tokens": {MAX}' in chunks[-2]
    assert chunks[-1] == "data: [DONE]\n\n"
