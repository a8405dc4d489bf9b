"""Speech-QA generation against a real HTTP server on loopback that speaks the OpenAI chat protocol."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_ops.llm_client import ChatEndpoint
from data_ops.sqa import SQA_PROMPT, generate_sqa, load_results, parse_qa

# transcript -> what the fake LLM answers; "flaky" fails twice with 503 first, "down" always fails
REPLIES = {
    "The meeting starts at nine.": '{"question": "When does the meeting start?", "answer": "At nine."}',
    "Revenue grew by ten percent.": 'Sure! ```json\n{"question": "How much did revenue grow?", "answer": "Ten percent."}\n```',
    "Asdf qwer zxcv.": '{"question": "none", "answer": "none"}',
    "Blah blah.": "none",
    "The cat sat on the mat.": '{"question": "Where did the cat sit?", "answer": ',  # cut off
    "It rained all day.": "I cannot produce JSON today.",
    "The flaky endpoint line.": '{"question": "Which line?", "answer": "The flaky one."}',
    "The endpoint is down.": None,
}


class FakeLLM(BaseHTTPRequestHandler):
    calls: Counter = Counter()
    lock = threading.Lock()
    down = True

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        transcript = body["messages"][0]["content"].rsplit("\n\n", 1)[-1]
        with self.lock:
            self.calls[transcript] += 1
            n = self.calls[transcript]
        assert self.headers.get("Authorization") == "Bearer sk-test"
        if transcript == "The flaky endpoint line." and n <= 2 or transcript == "The endpoint is down." and self.down:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        content = REPLIES[transcript]
        if transcript == "The endpoint is down.":
            content = '{"question": "Is it up?", "answer": "Yes."}'
        reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def llm_server(monkeypatch):
    FakeLLM.calls = Counter()
    FakeLLM.down = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("VTB_TEST_LLM_KEY", "sk-test")
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("text,status", [
    ('{"question": "Q?", "answer": "A."}', "ok"),
    ('```json\n{"question": "Q?", "answer": "A."}\n```', "ok"),
    ('{"question": "Say \\"hi\\"?", "answer": "hi"}', "ok"),
    ('{"question": "Q?", "answer": 42}', "ok"),
    ('{"question": "none", "answer": "none"}', "none"),
    ('{"question": "None", "answer": "None"}', "none"),
    ("none", "none"),
    ('{"question": "Q?"', "malformed"),
    ('{"q": "Q?", "a": "A"}', "malformed"),
    ('{"question": ["Q"], "answer": "A"}', "malformed"),
    ("", "malformed"),
    ("no json here", "malformed"),
])
def test_parse_qa(text, status):
    assert parse_qa(text)[0] == status


def test_sqa_generation_keeps_valid_counts_dropped_and_resumes(llm_server, ray_local, tmp_path):
    endpoint = ChatEndpoint(base_url=llm_server, model="fake-gemma", api_key_env="VTB_TEST_LLM_KEY",
                            max_retries=2, timeout_s=10)
    items = [{"id": f"utt-{i}", "transcript": t} for i, t in enumerate(REPLIES)]
    work = str(tmp_path / "work")
    summary, kept = generate_sqa(items, endpoint, work, concurrency=2, flush_every=3, progress=False)
    assert summary.as_dict() == {"kept": 3, "none": 2, "malformed": 2, "failed": 1, "resumed": 0}
    assert kept["utt-0"]["question"] == "When does the meeting start?" and kept["utt-0"]["answer"] == "At nine."
    assert kept["utt-1"]["answer"] == "Ten percent."
    assert kept["utt-6"]["answer"] == "The flaky one."  # two 503s, then retried to success
    assert set(kept) == {"utt-0", "utt-1", "utt-6"}
    assert FakeLLM.calls["The endpoint is down."] == 3  # 1 try + 2 retries, then counted as failed
    assert "PROVIDE THE TRANSCRIPT HERE" not in SQA_PROMPT and "{transcript}" in SQA_PROMPT

    # a rerun asks only for what is not finished (the failed item), and now the endpoint is up
    FakeLLM.down = False
    before = sum(FakeLLM.calls.values())
    summary2, kept2 = generate_sqa(items, endpoint, work, concurrency=2, progress=False)
    assert sum(FakeLLM.calls.values()) - before == 1
    assert summary2.resumed == 7 and summary2.kept == 1 and summary2.failed == 0
    assert set(kept2) == {"utt-0", "utt-1", "utt-6", "utt-7"}
    assert len(load_results(work)) == 8
    summary_file = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert summary_file["total_kept"] == 4


def test_sqa_job_writes_sqa_shards_from_asr_shards(llm_server, ray_local, tmp_path, pcm_audio):
    """`python -m jobs.data sqa`: English ASR shards -> LLM -> SQA shards whose audio is the ASR audio."""
    from data_ops.importers import speech_cuts
    from data_ops.shar_datasource import iter_corpus_rows, row_to_conversation
    from data_ops.shards import ShardWriter, read_manifest
    from jobs.data import main

    texts = ["The meeting starts at nine.", "Asdf qwer zxcv.", "Revenue grew by ten percent."]
    audios = [pcm_audio(0.4, i) for i in range(3)]
    with ShardWriter(str(tmp_path / "asr"), progress=False) as w:
        cuts = [c for i, t in enumerate(texts) for c in speech_cuts(f"u{i}", audios[i], t, "en", "Übersetzung", "de")]
        cuts += speech_cuts("g0", pcm_audio(0.3, 9), "The cat sat on the mat.", "de")  # German: not asked
        w.write("asr_ast", cuts)
    rc = main(["sqa", "--out", str(tmp_path / "sqa"), "--asr-corpus", str(tmp_path / "asr"), "--work",
               str(tmp_path / "work"), "--base-url", llm_server, "--model", "fake", "--api-key-env",
               "VTB_TEST_LLM_KEY", "--concurrency", "1"])
    assert rc == 0
    assert sum(FakeLLM.calls.values()) == 3
    assert read_manifest(str(tmp_path / "sqa")).types["sqa"].num_cuts == 2
    convs = {r["id"]: row_to_conversation(r) for r in iter_corpus_rows(str(tmp_path / "sqa"), "sqa")}
    conv = convs["u0-asr-en-sqa"]
    assert [type(p).__name__ for p in conv.turns[0].parts] == ["AudioPart", "TextPart"]
    assert conv.turns[0].parts[1].text == "When does the meeting start?" and conv.turns[1].text_only == "At nine."
    assert conv.audio_parts[0].audio.tolist() == audios[0].tolist()
