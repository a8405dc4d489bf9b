"""Generation for the chat app: prompt token counts, batched or streamed `generate()`, OpenAI SSE chunks.

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


def generate(model, convs, params, streamer=None, cancel: threading.Event | None = None):
    """`model.generate` with the request's sampling settings. Stop strings end each row's generation inside
    `generate()` (transformers' `stop_strings`), not after `max_tokens`; `cancel`, once set, ends all rows at the
    next token (a stream that was stopped or whose client went away)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    if params.seed is not None:
        torch.manual_seed(params.seed)
    kw: dict = {"streamer": streamer} if streamer is not None else {}
    if cancel is not None:
        kw["stopping_criteria"] = StoppingCriteriaList([Cancelled()])
    if params.stop:
        kw.update(stop_strings=list(params.stop), tokenizer=model.tokenizer)
    return model.generate(convs, max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
                          temperature=params.temperature or 1.0, top_p=params.top_p, return_ids=True, **kw)


async def sse(model, req: ChatRequest, rid: str, model_id: str, usage: dict):
    """OpenAI chunk stream: role chunk, content deltas, a finish chunk, an optional usage chunk, [DONE]."""
    from transformers import TextIteratorStreamer

    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, with_usage: dict | None = None, choices: bool = True) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
        if with_usage is not None:
            body["usage"] = with_usage
        return f"data: {json.dumps(body)}\n\n"

    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=300)
    cancel = threading.Event()
    result: dict = {}

    def run():
        try:
            result["out"] = generate(model, [req.conversation], req.params, streamer, cancel)
        except Exception as e:  # surfaced to the client as an error chunk
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield chunk({"role": "assistant", "content": ""})
        text, sent, stopped = "", 0, False
        hold = max((len(s) for s in req.params.stop), default=1) - 1  # keep back what could start a stop string
        iterator = iter(streamer)
        while True:
            piece = await asyncio.to_thread(next, iterator, None)
            if piece is None:
                break
            text += piece
            cut, stopped = apply_stop(text.lstrip(), req.params.stop)
            upto = len(cut) if stopped else max(sent, len(cut) - hold)
            if upto > sent:
                yield chunk({"content": cut[sent:upto]})
                sent = upto
            if stopped:
                break
    finally:
        # Stopped, or the client went away (Starlette closes this generator): generation ends at the next token,
        # and the event loop never waits on it.
        cancel.set()
        await asyncio.to_thread(thread.join)
    if "error" in result:
        yield f"data: {json.dumps({'error': {'message': str(result['error']), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"
        return
    texts, ids = result["out"]
    final, stopped2 = apply_stop(texts[0], req.params.stop)
    if len(final) > sent:
        yield chunk({"content": final[sent:]})
    n = len(ids[0])
    finish = "stop" if stopped or stopped2 or n < req.params.max_new_tokens else "length"
    yield chunk({}, finish)
    if req.include_usage:
        yield chunk({}, with_usage={**usage, "completion_tokens": n, "total_tokens": usage["prompt_tokens"] + n},
                    choices=False)
    yield "data: [DONE]\n\n"
