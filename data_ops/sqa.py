"""Speech QA from ASR transcripts (paper 3.2.2, prompt in Appendix A), through any OpenAI-compatible chat endpoint.

For each English ASR transcript an LLM is asked for one question/answer pair as JSON. Answers that are 'none' (the
prompt's escape for meaningless text) or malformed are dropped and counted; an endpoint that keeps failing after
retries counts as failed and is retried on the next run. The job runs on Ray Data with at most `concurrency`
requests in flight (one per actor), and writes results in parts under a work folder (local or S3) as they arrive:
a rerun reads those parts and asks only for what is missing.

The SQA conversation: user [speech context, text question] -> assistant answer. Its audio is the ASR cut's audio.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
import uuid
from typing import Iterable, Iterator

from tqdm import tqdm

from data_ops.llm_client import ChatClient, ChatEndpoint, EndpointError
from data_ops.schema import SAMPLING_RATE, conversation_to_cut
from data_ops.storage import open_storage
from models.conversation import AudioPart, Conversation, TextPart, Turn

logger = logging.getLogger("vtblender.data")

# Appendix A of the paper, verbatim but for the placeholder.
SQA_PROMPT = (
    "I will provide you with several sentences. Please generate **one** question that is closely related to the "
    "content of these sentences, along with a corresponding answer. Ensure that your answer is **accurate** and "
    "clearly stated. Write your output in a single line in json format:\n"
    '{"question": "xxx", "answer": "xxx"}\n'
    "If the question and answer contain a double quote, insert backslash before it to ensure the output can be "
    "loaded by python library 'json.loads()'. Do not add unnecessary backslash for symbols like dollar $, "
    "ampersand &, etc. However, if the sentences are meaningless, please return **none** in those fields.\n\n"
    "Here are the sentences:\n\n{transcript}"
)
_NONE = {"none", "null", "n/a", ""}
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)


def parse_qa(text: str | None) -> tuple[str, str | None, str | None]:
    """LLM output -> (status, question, answer); status is 'ok', 'none' or 'malformed'.

    Accepts the JSON object anywhere in the reply (models add prose or code fences), tolerates raw newlines
    inside strings, requires string 'question' and 'answer'."""
    if not text or not text.strip():
        return "malformed", None, None
    body = _FENCE.sub("", text.strip())
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        return ("none", None, None) if body.strip().strip('."').lower() in _NONE else ("malformed", None, None)
    try:
        obj = json.loads(body[start:end + 1], strict=False)
    except json.JSONDecodeError:
        return "malformed", None, None
    if not isinstance(obj, dict):
        return "malformed", None, None
    q, a = obj.get("question"), obj.get("answer")
    if isinstance(q, str) and q.strip().lower() in _NONE or isinstance(a, str) and a.strip().lower() in _NONE:
        return "none", None, None
    if not isinstance(q, str) or not isinstance(a, (str, int, float)) or isinstance(a, bool):
        return "malformed", None, None
    return "ok", q.strip(), str(a).strip()


class SQAMapper:
    """Ray Data callable class: rows {id, transcript} -> {id, status, question, answer, detail}."""

    def __init__(self, endpoint: ChatEndpoint, api_key: str | None):
        self.endpoint = endpoint
        self.client = ChatClient(endpoint, api_key)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"id": [], "status": [], "question": [], "answer": [], "detail": []}
        for item_id, transcript in zip(batch["id"], batch["transcript"]):
            try:
                prompt = SQA_PROMPT.replace("{transcript}", transcript)
                reply = self.client.complete(prompt)
                status, q, a = parse_qa(reply)
                detail = None if status == "ok" else reply[:300]
            except EndpointError as e:
                status, q, a, detail = "failed", None, None, str(e)
            out["id"].append(item_id)
            out["status"].append(status)
            out["question"].append(q)
            out["answer"].append(a)
            out["detail"].append(detail)
        return out


@dataclasses.dataclass
class SQASummary:
    kept: int = 0
    none: int = 0
    malformed: int = 0
    failed: int = 0
    resumed: int = 0  # items answered by an earlier run, not asked again

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_results(work_uri: str, endpoint_url: str | None = None) -> dict[str, dict]:
    """Every finished item (ok, none or malformed) of earlier runs, by id."""
    storage = open_storage(work_uri, endpoint_url)
    done: dict[str, dict] = {}
    for name in storage.list("results"):
        with storage.open_read(name) as f:
            for line in f.read().decode("utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    done[row["id"]] = row
    return done


def generate_sqa(items: Iterable[dict], endpoint: ChatEndpoint, work_uri: str, *, concurrency: int = 4,
                 flush_every: int = 32, endpoint_url: str | None = None,
                 progress: bool = True) -> tuple[SQASummary, dict[str, dict]]:
    """Ask the endpoint for a QA pair per `{id, transcript}` item; returns the summary and the kept pairs by id.

    Results are flushed to `work_uri/results/part-*.jsonl` every `flush_every` items, so a crash loses at most that
    many answers; failed items are not written and are asked again by the next run."""
    import ray.data

    storage = open_storage(work_uri, endpoint_url)
    done = load_results(work_uri, endpoint_url)
    summary = SQASummary()
    todo = []
    for item in items:
        if item["id"] in done:
            summary.resumed += 1
        else:
            todo.append({"id": item["id"], "transcript": item["transcript"]})
    buffer: list[dict] = []

    def flush() -> None:
        if buffer:
            storage.put_bytes("".join(json.dumps(r) + "\n" for r in buffer).encode("utf-8"),
                              f"results/part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.jsonl")
            buffer.clear()

    if todo:
        ds = ray.data.from_items(todo).map_batches(
            SQAMapper, batch_size=2, num_cpus=0.5,
            fn_constructor_kwargs={"endpoint": endpoint,
                                   "api_key": os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None},
            # each actor sends one request at a time: at most `concurrency` requests in flight
            compute=ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1))
        try:
            for row in tqdm(ds.iter_rows(), total=len(todo), desc="speech QA", unit="item", disable=not progress):
                status = row["status"]
                if status == "failed":
                    summary.failed += 1
                    logger.warning("SQA %s failed: %s", row["id"], row["detail"])
                    continue
                field = {"ok": "kept", "none": "none", "malformed": "malformed"}[status]
                setattr(summary, field, getattr(summary, field) + 1)
                if status != "ok":
                    logger.info("SQA %s dropped (%s): %r", row["id"], status, row["detail"])
                result = {k: row[k] for k in ("id", "status", "question", "answer")}
                done[row["id"]] = result
                buffer.append(result)
                if len(buffer) >= flush_every:
                    flush()
        finally:
            flush()
    kept = {k: v for k, v in done.items() if v["status"] == "ok"}
    storage.put_bytes(json.dumps({**summary.as_dict(), "total_kept": len(kept)}).encode("utf-8"), "summary.json")
    logger.info("SQA: %s", summary.as_dict())
    return summary, kept


def sqa_conversation(audio, transcript: str, question: str, answer: str) -> Conversation:
    return Conversation([
        Turn("user", [AudioPart(audio, SAMPLING_RATE, transcript=transcript), TextPart(question)]),
        Turn.text("assistant", answer),
    ])


def english_asr_transcripts(rows: Iterable[dict]) -> Iterator[dict]:
    """`{id, transcript}` items from ASR cut dicts (see `iter_cut_dicts`) in English."""
    for cut in rows:
        custom = cut.get("custom") or {}
        if custom.get("task") == "asr" and custom.get("langs") == ["en"]:
            answer = [t for t in custom["conversation"]["turns"] if t["role"] == "assistant"]
            yield {"id": cut["id"], "transcript": " ".join(p.get("text", "") for p in answer[0]["parts"])}


def sqa_cuts(asr_conversations: Iterable[tuple[str, Conversation]], qa: dict[str, dict]) -> Iterator:
    """SQA cuts for the ASR conversations that got a kept QA pair; the speech is the ASR conversation's audio."""
    for cut_id, conv in asr_conversations:
        pair = qa.get(cut_id)
        if pair is None:
            continue
        (speech,) = conv.audio_parts
        transcript = conv.turns[-1].text_only
        yield conversation_to_cut(sqa_conversation(speech.audio, transcript, pair["question"], pair["answer"]),
                                  cut_id=f"{cut_id}-sqa", data_type="sqa", task="sqa", langs=["en"])
