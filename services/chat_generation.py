"""Generation for the chat app: requests as rows on the vLLM engine (`models.engine`), streamed or not, and OpenAI
SSE chunks.

Every request, streaming or not, becomes a `Row`, run on its fine-tune's engine as soon as it arrives: the engine
batches continuously (a request joins the running batch at its next step; the encoder hears each audio part once,
in the prompt's prefill). Each row's tokens reach it as they are generated, so a stream is sent while the engine
runs, and each row ends on its own: at the end-of-turn token, at its own stop strings, or when its client goes away
(`Row.cancel`: the engine request is aborted); the rest go on.

Kept apart from the deployment class: Ray Serve's ingress wrapping captures the class when it is decorated, so
helpers it calls must already exist in an imported module.
"""

import asyncio
import json
import threading
import time

from services.openai_protocol import ChatRequest, apply_stop


def prompt_tokens(model, req: ChatRequest) -> tuple[int, int]:
    enc = model.processor.encode(req.conversation, for_generation=True)
    return len(enc.input_ids), int(sum(enc.audio_mask))


class Row:
    """One request on the engine: the tokens it got so far and whether it is done. A streaming row is told of each
    change through its queue, on its event loop."""

    def __init__(self, req: ChatRequest, model_id: str, model, loop: asyncio.AbstractEventLoop | None = None,
                 prompt: dict | None = None):
        self.req, self.model_id, self.model, self.prompt = req, model_id, model, prompt
        self.shared = False
        self.ids: list[int] = []
        self.eos = self.stopped = False
        self.error: Exception | None = None
        self.done = threading.Event()  # set: generate() stops this row at its next step
        self.loop = loop
        self.queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None

    def cancel(self) -> None:
        """The client went away: stop generating for this row."""
        self.done.set()

    def add(self, token: int, stop_ids: set[int]) -> None:
        if self.done.is_set():  # a finished row's later tokens are padding
            return
        if token in stop_ids:
            self.eos = True
            self.done.set()
        else:
            self.ids.append(token)
            if self.req.params.stop and apply_stop(self.text(), self.req.params.stop)[1]:
                self.stopped = True
                self.done.set()
        self._notify(len(self.ids))

    def finish(self, error: Exception | None = None) -> None:
        self.error = error
        self.done.set()
        self._notify(None)  # the end of this row's stream

    def text(self, n: int | None = None) -> str:
        return self.model.tokenizer.decode(self.ids[:n], skip_special_tokens=True).strip()

    def result(self) -> dict:
        text, cut = apply_stop(self.text(), self.req.params.stop)
        finish = "stop" if self.eos or self.stopped or cut or len(self.ids) < self.req.params.max_new_tokens \
            else "length"
        return {"text": text, "completion_tokens": len(self.ids), "finish_reason": finish}

    def _notify(self, n: int | None) -> None:
        if self.queue is not None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, n)


class EngineLoad:
    """Counts of what the engine ran, for `/v1/stats`. The engine batches continuously, so a "batch" here is a busy
    period of one engine: from the first request it takes while idle until it is idle again; requests that arrive
    meanwhile join it at the next step. `generate_calls` counts busy periods, `batched_requests` requests, and a
    request ran `shared` when another ran on its engine at the same time."""

    def __init__(self):
        self.counts = {"batches": 0, "batched_requests": 0, "streamed_requests": 0, "generate_calls": 0,
                       "streamed_in_shared_calls": 0, "prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        self._running: dict[int, set] = {}

    def start(self, row: Row) -> None:
        running = self._running.setdefault(id(row.model.engine), set())
        if not running:
            self.counts["generate_calls"] += 1
            self.counts["batches"] += 1
        for other in running:
            other.shared = True
        row.shared = bool(running)
        running.add(row)
        self.counts["batched_requests"] += 1
        self.counts["streamed_requests"] += row.queue is not None

    def end(self, row: Row, timing: dict) -> None:
        running = self._running[id(row.model.engine)]
        running.discard(row)
        if not running:  # idle: an engine that stops leaves nothing behind here
            del self._running[id(row.model.engine)]
        self.counts["streamed_in_shared_calls"] += row.queue is not None and row.shared
        self.counts["prefill_s"] += timing["prefill_s"]
        self.counts["decode_s"] += timing["decode_s"]
        self.counts["decode_steps"] += max(0, timing["steps"] - 1)


async def generate_row(row: Row, load: EngineLoad | None = None) -> dict:
    """Run one row on its model's engine, on the running event loop: its tokens reach it as they come; it ends at a
    stop token, its stop strings, its token budget or its cancellation (the engine request is aborted then). The row
    ends finished (`row.result()`, or `row.error`). Returns its timing: prefill_s (to the first token), decode_s
    and steps (tokens generated, the first included)."""
    timing = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0}
    if row.done.is_set():  # cancelled before it started
        row.finish()
        return timing
    if load is not None:
        load.start(row)
    try:
        await _stream_tokens(row, timing)
    except Exception as e:  # noqa: BLE001 - the row answers with the error; the server goes on
        row.finish(e)
    else:
        row.finish()
    finally:  # a cancelled request (its client gone) is counted as it ran
        if load is not None:
            load.end(row, timing)
    return timing


async def _stream_tokens(row: Row, timing: dict) -> None:
    served, p = row.model, row.req.params
    stop_ids, seen = set(served.stop_token_ids()), 0
    start = last = time.perf_counter()
    prompt = row.prompt if row.prompt is not None else served.prompt(row.req.conversation)[0]
    stream = served.generate(prompt, served.sampling(p.max_new_tokens, p.greedy, p.temperature, p.top_p, p.seed))
    try:
        async for out in stream:
            ids = out.outputs[0].token_ids
            now = time.perf_counter()
            if timing["steps"] == 0:
                timing["prefill_s"] = now - start
            else:
                timing["decode_s"] += now - last
            last, timing["steps"] = now, len(ids)
            for token in ids[seen:]:
                row.add(int(token), stop_ids)
            seen = len(ids)
            if row.done.is_set():
                break
    finally:
        await stream.aclose()  # aborts the engine request when it is still running


async def generate_rows(rows: list[Row], load: EngineLoad | None = None) -> dict:
    """Run `rows` on their engines together (they join one continuous batch); returns their summed timing, steps
    the most of any row."""
    timings = await asyncio.gather(*(generate_row(row, load) for row in rows))
    return {"prefill_s": sum(t["prefill_s"] for t in timings), "decode_s": sum(t["decode_s"] for t in timings),
            "steps": max((t["steps"] for t in timings), default=0)}


async def sse(row: Row, rid: str, usage: dict):
    """OpenAI chunk stream of a streaming row, sent while its batch generates: role chunk, content deltas, a finish
    chunk, an optional usage chunk, [DONE]. Closing it early (the client went away) cancels the row."""
    req = row.req
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, with_usage: dict | None = None, choices: bool = True) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": row.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
        if with_usage is not None:
            body["usage"] = with_usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        sent = 0
        hold = max((len(s) for s in req.params.stop), default=1) - 1  # keep back what could start a stop string
        while (n := await row.queue.get()) is not None:
            text = row.text(n)
            if text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest of it
                continue
            cut, stopped = apply_stop(text, req.params.stop)
            upto = len(cut) if stopped else max(sent, len(cut) - hold)
            if upto > sent:
                yield chunk({"content": cut[sent:upto]})
                sent = upto
        if row.error is not None:
            yield f"data: {json.dumps({'error': {'message': str(row.error), 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"
            return
        out = row.result()
        if len(out["text"]) > sent:
            yield chunk({"content": out["text"][sent:]})
        yield chunk({}, out["finish_reason"])
        if req.include_usage:
            n = out["completion_tokens"]
            yield chunk({}, with_usage={**usage, "completion_tokens": n, "total_tokens": usage["prompt_tokens"] + n},
                        choices=False)
        yield "data: [DONE]\n\n"
    finally:
        row.cancel()  # no-op when it finished; else its generation stops at the next step
