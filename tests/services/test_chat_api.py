"""The OpenAI-compatible chat endpoint on Ray Serve, deployed with `serve deploy` on the local stack, loaded from the
MLflow registry, exercised with the official `openai` client and raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from collections import Counter

import numpy as np
import pytest
import requests
import schemathesis
import schemathesis.specs.openapi.schemas  # noqa: F401  (see below)
import soundfile as sf
import yaml
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode

from models.conversation import AudioPart, Conversation, TextPart, Turn
from tests.services.serve_app import save_fine_tunes, wait_healthy

# schemathesis is a pytest plugin, so pytest rewrites its modules' asserts on import, with `ast.parse`. CPython 3.11
# keeps the AST builder's recursion counter per interpreter, not per thread: a parse while Ray's and Serve's client
# threads run can fail with "AST constructor recursion depth mismatch" (python/cpython#106905). Importing the lazily
# loaded OpenAPI modules here parses them at collection, before any test starts a thread.
pytestmark = pytest.mark.integration
KEY = "sk-serve-test"


def _wav_b64(audio: np.ndarray, fmt: str = "WAV", subtype: str = "PCM_16") -> str:
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format=fmt, subtype=subtype)
    return base64.b64encode(buf.getvalue()).decode()


def _pcm(seconds: float, seed: int) -> np.ndarray:
    k = np.random.default_rng(seed).integers(-20000, 20000, size=int(seconds * 16000))
    return (k / 32768.0).astype(np.float32)


@pytest.fixture(scope="module")
def server(stack, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    import torch

    from infra.stack import free_port
    from models.speechlm import SpeechLM
    from models.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("serve")
    tok = build_tiny_tokenizer(["hello world", "the answer is five", "Two plus three is five."])
    dirs = save_fine_tunes(root, ["a", "b"], tokenizer=tok)  # two fine-tunes of one base LM
    # and a SpeechLM on another family's LM (a tiny Llama 3 checkpoint: its tokenizer, template and end of turn)
    from models.config import tiny
    from models.speechlm import build_speechlm
    from tests.models.lm_families import save_family_checkpoint

    llama_cfg = tiny()
    llama_cfg.lm.pretrained = str(save_family_checkpoint("llama", root))
    dirs["llama"] = build_speechlm(llama_cfg).save_pretrained(root / "llama-speechlm")
    # served in bf16 too, as on a GPU: the FastConformer fine-tune and one with a Whisper encoder
    dirs["whisper"] = save_fine_tunes(root, ["whisper"], config=tiny(encoder_kind="whisper"), tokenizer=tok)["whisper"]
    env = stack.env()
    try:
        tracking = env["MLFLOW_TRACKING_URI"]
        client = MlflowClient(tracking, registry_uri=tracking)
        run = client.create_run(client.create_experiment("serve-test"))
        client.log_artifacts(run.info.run_id, str(dirs["a"]), "model")
        client.set_terminated(run.info.run_id)
        client.create_registered_model("tiny-serve")
        v = client.create_model_version("tiny-serve", f"{run.info.artifact_uri}/model", run.info.run_id)
        client.set_registered_model_alias("tiny-serve", "candidate", v.version)

        port = free_port()
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{
                "name": "vtb", "route_prefix": "/", "import_path": "services.chat_app:build_app",
                "runtime_env": {"env_vars": {"MLFLOW_TRACKING_URI": tracking, "VTB_TEST_KEY": KEY}},
                "args": {"model": "models:/tiny-serve@candidate", "served_model_name": "tiny",
                         "models": {"b": str(dirs["b"]), "llama": str(dirs["llama"])}, "api_key_env": "VTB_TEST_KEY",
                         "engine": {"kv_cache_gib": 0.25, "max_num_seqs": 8, "lora": "shared"},
                         "limits": {"max_audio_seconds_per_part": 5.0, "max_audio_seconds_per_request": 8.0,
                                    "max_audio_parts": 3, "max_turns": 8, "max_new_tokens": 64,
                                    "max_prompt_tokens": 1000, "max_body_bytes": 1_000_000}},
            }, {
                "name": "vtb-bf16", "route_prefix": "/bf16", "import_path": "services.chat_app:build_app",
                "args": {"model": str(dirs["a"]), "served_model_name": "tiny", "models": {"whisper": str(dirs["whisper"])},
                         "precision": "bf16", "engine": {"kv_cache_gib": 0.25}},
            }],
        }
        cfg_path = root / "serve.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        serve_bin = str(Path(sys.executable).with_name("serve"))
        clean_env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **env}
        proc = subprocess.run([serve_bin, "deploy", str(cfg_path), "-a", env["RAY_DASHBOARD_ADDRESS"]], capture_output=True,
                              text=True, timeout=120, env=clean_env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base)
            wait_healthy(f"{base}/bf16")
        except AssertionError:
            status = subprocess.run([serve_bin, "status", "-a", env["RAY_DASHBOARD_ADDRESS"]], capture_output=True, text=True,
                                    env=clean_env)
            raise AssertionError(f"Serve app did not come up:\n{status.stdout[-3000:]}") from None
        models = {"tiny": SpeechLM.from_pretrained(dirs["a"]), "b": SpeechLM.from_pretrained(dirs["b"]),
                  "llama": SpeechLM.from_pretrained(dirs["llama"]),
                  "bf16/tiny": SpeechLM.from_pretrained(dirs["a"], dtype=torch.bfloat16),
                  "bf16/whisper": SpeechLM.from_pretrained(dirs["whisper"], dtype=torch.bfloat16)}
        yield {"base": base, "models": models, "env": clean_env, "serve": serve_bin}
    finally:
        subprocess.run([serve_bin, "shutdown", "-y", "-a", env["RAY_DASHBOARD_ADDRESS"]], capture_output=True, timeout=120,
                       env=clean_env)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _audio_part(a):
    return {"type": "input_audio", "input_audio": {"data": _wav_b64(a), "format": "wav"}}


A1, A2 = _pcm(1.2, 1), _pcm(0.7, 2)
CASES = {
    "text_only": ([{"role": "user", "content": "hello world"}], Conversation([Turn.text("user", "hello world")])),
    "audio_only": ([{"role": "user", "content": [_audio_part(A1)]}], Conversation([Turn("user", [AudioPart(A1)])])),
    "text_audio_text": (
        [{"role": "user", "content": [{"type": "text", "text": "Listen:"}, _audio_part(A1),
                                      {"type": "text", "text": "what is it?"}]}],
        Conversation([Turn("user", [TextPart("Listen:"), AudioPart(A1), TextPart("what is it?")])])),
    "two_audio": (
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [_audio_part(A1), {"type": "text", "text": "and"},
                                      {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + _wav_b64(A2)}}]}],
        Conversation([Turn.text("system", "Be brief."),
                      Turn("user", [AudioPart(A1), TextPart("and"), AudioPart(A2)])])),
    "three_turns": (
        [{"role": "user", "content": [{"type": "text", "text": "hi"}, _audio_part(A2)]},
         {"role": "assistant", "content": "the answer is five"},
         {"role": "user", "content": "Two plus three?"}],
        Conversation([Turn("user", [TextPart("hi"), AudioPart(A2)]), Turn.text("assistant", "the answer is five"),
                      Turn.text("user", "Two plus three?")])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_answers_equal_the_models_own_generate(server, client, case):
    messages, conv = CASES[case]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    want = server["models"]["tiny"].generate([conv], max_new_tokens=12)[0]
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    audio_seconds = sum(p.duration for p in conv.audio_parts)
    assert r.usage.model_extra["audio_seconds"] == pytest.approx(audio_seconds, abs=1e-3)


@pytest.mark.parametrize("model", ["tiny", "whisper"])
@pytest.mark.parametrize("case", ["text_audio_text", "two_audio"])
def test_bf16_weights_answer_mixed_modal_turns_as_the_local_bf16_model(server, model, case):
    """The app with `precision: bf16` (the GPU default) on CPU: both encoder kinds hear the audio of a mixed-modal
    turn; the answer is the bf16 model's own greedy answer."""
    from openai import OpenAI

    messages, conv = CASES[case]
    bf16 = OpenAI(base_url=server["base"] + "/bf16/v1", api_key="unused", max_retries=0, timeout=120)
    r = bf16.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == server["models"][f"bf16/{model}"].generate([conv], max_new_tokens=12)[0]
    assert r.usage.model_extra["audio_seconds"] == pytest.approx(sum(p.duration for p in conv.audio_parts), abs=1e-3)


FUZZ_EXAMPLES = int(os.environ.get("VTB_FUZZ_EXAMPLES", 150))  # per generation mode and round
# by hand: VTB_FUZZ_EXAMPLES=2500 VTB_FUZZ_ROUNDS=4 (20,000 requests); each round a fresh hypothesis run from its own
# seed (one run of 10,000 examples per mode tripped an internal assertion of hypothesis's mutator)
FUZZ_ROUNDS = int(os.environ.get("VTB_FUZZ_ROUNDS", 1))


def test_requests_fuzzed_from_the_openapi_schema_never_get_a_5xx(server, client):
    """schemathesis reads the app's OpenAPI document (the request body's JSON Schema) and generates bodies that fit
    it and bodies that break it, with arbitrary strings, numbers and base64. Every answer is a 2xx, or a 4xx with
    OpenAI's error body; never a 5xx, never a hang; the replica answers a normal request afterwards."""
    schema = schemathesis.openapi.from_url(server["base"] + "/openapi.json")
    operation = schema["/v1/chat/completions"]["POST"]
    statuses: Counter = Counter()
    for run in range(FUZZ_ROUNDS):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @seed(run)
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def fuzz(case):
                r = case.call(base_url=server["base"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                statuses[r.status_code] += 1
                assert r.status_code < 500, (r.status_code, r.text[:300], repr(case.body)[:500])
                if r.status_code >= 400:
                    assert r.json()["error"]["message"], r.text[:300]

            fuzz()
        print(f"round {run}: fuzzed requests by status so far: {dict(sorted(statuses.items()))}", flush=True)
    assert sum(statuses.values()) >= FUZZ_EXAMPLES and statuses[200] > 0, statuses  # some were answered
    messages, conv = CASES["text_audio_text"]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == server["models"]["tiny"].generate([conv], max_new_tokens=12)[0]


@pytest.mark.parametrize("temperature", [5e-324, 1e-6])
def test_a_vanishing_temperature_answers_greedily(server, client, temperature):
    """Found by the API fuzzing: temperature 5e-324 overflowed the logits to inf and the request got a 500."""
    messages, conv = CASES["text_audio_text"]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=temperature)
    assert r.choices[0].message.content == server["models"]["tiny"].generate([conv], max_new_tokens=8)[0]


def test_streaming_matches_and_ends_with_usage_and_done(server, client):
    messages, conv = CASES["text_audio_text"]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == server["models"]["tiny"].generate([conv], max_new_tokens=12)[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    raw = requests.post(server["base"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": "tiny", "messages": messages, "max_tokens": 4, "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_model_field_selects_another_fine_tune_and_models_route(server, client):
    messages, conv = CASES["text_audio_text"]
    r = client.chat.completions.create(model="b", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == server["models"]["b"].generate([conv], max_new_tokens=12)[0]
    assert sorted(m.id for m in client.models.list().data) == ["b", "llama", "tiny"]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == server["models"]["tiny"].generate([conv], max_new_tokens=12)[0]
    stats = requests.get(server["base"] + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    # the two fine-tunes hold one base LM with two LoRA adapters on it
    assert (stats["loaded_models"], stats["shared_lm_bases"], stats["lora_adapters_on_shared_bases"]) == (2, 1, 2)


def test_a_llama_based_model_answers_through_its_own_template(server, client):
    messages, conv = CASES["text_audio_text"]
    r = client.chat.completions.create(model="llama", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == server["models"]["llama"].generate([conv], max_new_tokens=12)[0]
    assert r.usage.prompt_tokens == len(server["models"]["llama"].processor.encode(conv, for_generation=True).input_ids)


def test_concurrent_streaming_and_plain_requests_share_batches(server, client):
    from concurrent.futures import ThreadPoolExecutor

    messages, conv = CASES["text_audio_text"]
    want = server["models"]["tiny"].generate([conv], max_new_tokens=8)[0]
    h = {"Authorization": f"Bearer {KEY}"}
    before = requests.get(server["base"] + "/v1/stats", headers=h, timeout=10).json()

    def one(i):
        kw = dict(model="tiny", messages=messages, max_tokens=8, temperature=0)
        if i % 2:  # every other request streams
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        return client.chat.completions.create(**kw).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    after = requests.get(server["base"] + "/v1/stats", headers=h, timeout=10).json()
    assert answers == [want] * 8
    delta = {k: after[k] - before[k] for k in ("batched_requests", "streamed_requests", "generate_calls",
                                               "streamed_in_shared_calls")}
    assert delta["batched_requests"] == 8 and delta["streamed_requests"] == 4
    assert delta["generate_calls"] < 8 and delta["streamed_in_shared_calls"] >= 1  # streams shared generate() calls
    assert after["prefill_s"] > before["prefill_s"] and after["decode_ms_per_step"] > 0


def _post(server, body, key=KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return requests.post(server["base"] + "/v1/chat/completions", data=raw, headers=headers, timeout=60)
    return requests.post(server["base"] + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def _user(*parts):
    return {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": list(parts)}]}


EMPTY_WAV = _wav_b64(np.zeros(0, np.float32))
BAD = {
    "invalid_base64": (_user({"type": "input_audio", "input_audio": {"data": "%%%not base64", "format": "wav"}}),
                       400, "not valid base64"),
    "undecodable": (_user({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF....junk" * 50).decode(),
                                                                 "format": "wav"}}), 400, "could not be decoded"),
    "unsupported_format": (_user({"type": "input_audio", "input_audio": {"data": _wav_b64(A1), "format": "aac"}}),
                           400, "unsupported audio format 'aac'"),
    "zero_length": (_user({"type": "input_audio", "input_audio": {"data": EMPTY_WAV, "format": "wav"}}), 400, "no samples"),
    "over_limit": (_user(_audio_part(_pcm(6.0, 3))), 413, "over the limit of 5 s per audio part"),
    "wrong_part_type": (_user({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}), 400,
                        "content part type 'image_url' is not supported"),
    "empty_messages": ({"model": "tiny", "messages": []}, 400, "'messages' must be a non-empty list"),
    "last_is_assistant": ({"model": "tiny", "messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "yo"}]}, 400,
                          "last message must be from the user"),
    "loopback_url": (_user({"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:9/a.wav"}}), 400,
                     "fetching audio from URLs is disabled"),
    "private_url": (_user({"type": "audio_url", "audio_url": {"url": "http://10.0.0.5/a.wav"}}), 400,
                    "fetching audio from URLs is disabled"),
    "unknown_model": ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served here"),
    "max_tokens_over": ({"model": "tiny", "max_tokens": 10000, "messages": [{"role": "user", "content": "hi"}]}, 400,
                        "over this server's limit of 64"),
    # the tokenizer's padding token marks audio in the engine's prompt: typed beside audio, it is named, not a 500
    "audio_marker_in_text": (_user({"type": "text", "text": "<pad> listen"}, _audio_part(A2)), 400,
                             "the one the engine marks audio with"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_clear_4xx_and_the_server_goes_on(server, case):
    body, status, message = BAD[case]
    r = _post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"]
    ok = _post(server, {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200


def _chunked(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i:i + size]


OVER_LIMIT = {  # every limit of the app, each over by a little: (request sender, the error's message)
    "body_declared": (lambda s: _post(s, None, raw=b" " * 1_000_001), "(1000001 bytes) is over the limit of 1000000"),
    "body_chunked": (lambda s: requests.post(s["base"] + "/v1/chat/completions", data=_chunked(b" " * 1_100_000),
                                             headers={"Authorization": f"Bearer {KEY}"}, timeout=60),
                     "(more than 1000000 bytes) is over the limit of 1000000"),
    "audio_per_part": (lambda s: _post(s, _user(_audio_part(_pcm(5.5, 3)))), "over the limit of 5 s per audio part"),
    "audio_per_request": (lambda s: _post(s, _user(_audio_part(_pcm(4.5, 4)), _audio_part(_pcm(4.5, 5)))),
                          "of audio in this request is over the limit of 8"),
    "audio_parts": (lambda s: _post(s, _user(*[_audio_part(_pcm(0.3, i)) for i in range(4)])),
                    "more than 3 audio parts"),
    "turns": (lambda s: _post(s, {"model": "tiny", "messages": [{"role": ("user", "assistant")[i % 2], "content": "hi"}
                                                                 for i in range(9)]}), "over the limit of 8"),
    "prompt_tokens": (lambda s: _post(s, {"model": "tiny", "messages": [{"role": "user", "content": "zqx " * 400}]}),
                      "over the limit of 1000"),
}


@pytest.mark.parametrize("case", list(OVER_LIMIT))
def test_every_limit_answers_413_naming_it(server, case):
    send, message = OVER_LIMIT[case]
    r = send(server)
    assert r.status_code == 413, r.text
    assert message in r.json()["error"]["message"]


def test_a_body_far_over_the_limit_gets_its_413_to_curl_requests_and_the_openai_client(server, client, tmp_path):
    """5x the 1 MB limit: the server reads and drops the rest of the body before answering, so every client reads
    the 413 and its message (answering mid-upload reset the connection under them)."""
    import openai

    huge = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5_000_000}]}
    r = _post(server, huge)
    assert r.status_code == 413 and "is over the limit of 1000000 bytes" in r.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**huge)
    assert e.value.status_code == 413 and "over the limit" in str(e.value)
    body = tmp_path / "huge.json"
    body.write_text(json.dumps(huge))
    curl = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\\n%{http_code}", "-H", f"Authorization: Bearer {KEY}",
                           "-H", "Content-Type: application/json", "--data-binary", f"@{body}",
                           server["base"] + "/v1/chat/completions"], capture_output=True, text=True, timeout=60)
    out, _, status = curl.stdout.rpartition("\n")
    assert curl.returncode == 0 and status == "413", curl.stderr
    assert "over the limit" in json.loads(out)["error"]["message"]


def test_api_key_is_checked_on_every_route_but_health(server):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for key in (None, "sk-wrong"):
        r = _post(server, body, key=key)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        h = {"Authorization": f"Bearer {key}"} if key else {}
        assert requests.get(server["base"] + "/v1/models", headers=h, timeout=10).status_code == 401
    assert requests.get(server["base"] + "/health", timeout=10).status_code == 200
    r = _post(server, None, raw=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_chat_page_in_headless_chromium_records_sends_and_streams_two_turns(server, tmp_path):
    """GET / in Debian's chromium (infra/install.sh), driven by playwright: the microphone is a fake capture
    device playing a WAV file; record, type around it, send, see the answer stream in; a second turn keeps the
    first one's audio in the conversation."""
    import shutil

    from PIL import Image
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: infra/install.sh installs Debian's package (as root)"
    capture = tmp_path / "mic.wav"
    sf.write(capture, (0.3 * np.sin(np.arange(3 * 16000) / 9)).astype(np.float32), 16000, subtype="PCM_16")
    h = {"Authorization": f"Bearer {KEY}"}
    before = requests.get(server["base"] + "/v1/stats", headers=h, timeout=10).json()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={capture}"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(server["base"] + "/")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")  # the model list needs the key
            page.wait_for_function("document.querySelectorAll('#model option').length === 3")
            page.fill("#text", "Listen:")
            page.click("#record")
            page.wait_for_timeout(1500)
            page.click("#record")
            page.wait_for_selector("#pending .part.audio")
            page.fill("#text", "Answer briefly.")
            page.click("#send")
            page.wait_for_selector(".msg.assistant.done", timeout=120_000)
            page.fill("#text", "And again?")
            page.keyboard.press("Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant.done').length === 2", timeout=120_000)
            answers = page.locator(".msg.assistant").all_inner_texts()
            users = page.locator(".msg.user").all_inner_texts()
            page.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            browser.close()
    assert users[0].startswith("Listen:") and "recording" in users[0] and users[0].endswith("Answer briefly.")
    for answer in answers:  # the usage line under each answer: audio tokens in both prompts (turn 1's audio kept)
        found = re.search(r"\((\d+) audio\)", answer)
        assert found, answers
        audio_tokens = int(found.group(1))
        assert audio_tokens >= 15, answer  # ~1.5 s at 80 ms per audio position
    after = requests.get(server["base"] + "/v1/stats", headers=h, timeout=10).json()
    assert after["streamed_requests"] - before["streamed_requests"] == 2
    shot = np.asarray(Image.open(tmp_path / "chat.png").convert("L"), dtype=np.float32)
    assert shot.shape == (700, 900) and shot.std() > 20  # a rendered page, not a blank one
