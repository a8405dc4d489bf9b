"""Generation for the chat app: requests as rows of one batched `generate()`, streamed or not, and OpenAI SSE chunks.

Every request, streaming or not, becomes a `Row`; rows with the same model and sampling settings share one
left-padded `generate()` (the encoder runs once per audio part, in its prefill). Each row's tokens reach it as they
are generated (`RowStreamer`), so a stream is sent while its batch runs, and each row ends on its own: at the
end-of-turn token, at its own stop strings, or when its client goes away (`Row.cancel`); the rest go on.

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
    """One request in a batched `generate()`: the tokens it got so far and whether it is done. Written by the
    generation thread; a streaming row is told of each change through its queue, on its event loop."""

    def __init__(self, req: ChatRequest, model_id: str, model, loop: asyncio.AbstractEventLoop | None = None):
        self.req, self.model_id, self.model = req, model_id, model
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


def _streamer(rows: list[Row], stop_ids: set[int], timing: dict):
    from transformers.generation.streamers import BaseStreamer

    class RowStreamer(BaseStreamer):
        """Hands each step's tokens (one per row) to the rows, and times prefill (to the first token) and decode."""

        def __init__(self):
            self.prompt_seen = False
            self.start = self.last = time.perf_counter()

        def put(self, value):
            if not self.prompt_seen:  # generate() first puts the prompt's ids
                self.prompt_seen = True
                return
            now = time.perf_counter()
            if timing["steps"] == 0:  # the first token comes out of the prefill (encoder, adapter, whole prompt)
                timing["prefill_s"] = now - self.start
            else:  # each later one out of a decode step (one token per row, the KV cache)
                timing["decode_s"] += now - self.last
            timing["steps"] += 1
            self.last = now
            for row, token in zip(rows, value.reshape(-1).tolist()):
                row.add(int(token), stop_ids)

        def end(self):
            pass

    return RowStreamer()


def generate_rows(rows: list[Row]) -> dict:
    """Run one batched `generate()` for `rows` (same model and sampling settings) in this thread; every row ends
    finished (its result in `row.result()`, or `row.error`). Returns the batch's timing: prefill_s, decode_s and
    steps (tokens per row generated, the prefill's included)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class RowsDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([row.done.is_set() for row in rows], dtype=torch.bool, device=input_ids.device)

    model, params = rows[0].model, rows[0].req.params
    timing = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0}
    try:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        model.generate([row.req.conversation for row in rows], max_new_tokens=params.max_new_tokens,
                       do_sample=not params.greedy, temperature=params.temperature or 1.0, top_p=params.top_p,
                       streamer=_streamer(rows, set(model.stop_token_ids()), timing),
                       stopping_criteria=StoppingCriteriaList([RowsDone()]))
    except Exception as e:  # every row of the batch answers with the error; the server goes on
        for row in rows:
            row.finish(e)
        return timing
    for row in rows:
        row.finish()
    return timing


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
