"""Property-based fuzzing of the chat request parser and the prompt it builds, in-process: whatever JSON arrives,
`parse_chat_request` returns a request or raises a 4xx `APIError`, and a parsed request tokenizes for the model or
raises what the app answers with a 400 (`ConversationError`). Never anything else: anything else is a 500.

Bounded and seeded for the suite (`derandomize`); `VTB_FUZZ_EXAMPLES=N` runs N examples per property by hand.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.conversation import ConversationError
from services.chat_generation import prompt_tokens
from services.openai_protocol import AUDIO_FORMATS, APIError, ChatRequest, Limits, parse_chat_request

FUZZ = settings(max_examples=int(os.environ.get("VTB_FUZZ_EXAMPLES", 200)), derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = Limits(max_audio_seconds_per_part=2.0, max_audio_seconds_per_request=3.0, max_audio_parts=3, max_turns=6,
                max_new_tokens=64)

# every code point, with the rare troublemakers drawn often: lone surrogates, NUL, bidi overrides, BOM, the chat
# template's own markers
odd = st.characters(categories=["Cs"]) | st.sampled_from(["\x00", "\u202e", "\ufeff", "\U0010ffff", "<start_of_turn>",
                                                         "<audio>", "\r\n"])
any_text = st.lists(st.characters(exclude_categories=()) | odd, max_size=20).map("".join)
numbers = st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()
json_values = st.recursive(st.none() | numbers | any_text,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
                           max_leaves=12)


def _wav(seconds: float, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(max(0, int(seconds * rate)), dtype=np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


audio_bytes = (st.builds(_wav, st.floats(0, 4), st.sampled_from([8000, 16000, 44100]))  # valid, some too long
               | st.binary(max_size=64)  # not audio
               | st.builds(lambda b: b"RIFF" + b, st.binary(max_size=64)))  # looks like a WAV header, is not
b64_payload = st.builds(lambda b: base64.b64encode(b).decode(), audio_bytes) | any_text
audio_part = (
    st.fixed_dictionaries({"type": st.just("input_audio"),
                           "input_audio": st.fixed_dictionaries({"data": b64_payload},
                                                                optional={"format": st.sampled_from(sorted(AUDIO_FORMATS))
                                                                          | json_values})})
    | st.fixed_dictionaries({"type": st.just("audio_url"), "audio_url": st.fixed_dictionaries({"url": st.builds(
        lambda mime, b64, data: f"data:{mime}{b64},{data}", st.sampled_from(["audio/wav", "text/plain", ""]),
        st.sampled_from([";base64", ""]), b64_payload)})})
    | st.fixed_dictionaries({"audio_url": any_text | json_values}))
content_part = (st.fixed_dictionaries({"type": st.just("text"), "text": any_text | json_values})
                | audio_part | st.dictionaries(any_text, json_values, max_size=3) | json_values)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | json_values},
    optional={"content": any_text | st.lists(content_part, max_size=4) | json_values})
valid_wav = st.builds(lambda sec: base64.b64encode(_wav(sec, 16000)).decode(), st.floats(0.05, 1.0))
valid_content = any_text | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": any_text})
    | st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.fixed_dictionaries({"data": valid_wav})}),
    min_size=1, max_size=3)
# well-formed requests (they reach the tokenizer), with odd text and values at and past every bound
valid_request = st.fixed_dictionaries(
    {"messages": st.lists(st.tuples(any_text, valid_content), max_size=2).map(
        lambda pairs: [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
                       if isinstance(m["content"], str) or m["role"] == "user"]).flatmap(
        lambda history: valid_content.map(lambda last: [*history, {"role": "user", "content": last}]))},
    optional={"max_tokens": st.integers(-1, 70), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
              "stop": any_text | st.lists(any_text, max_size=4), "seed": st.integers(-(2**64), 2**65),
              "model": any_text, "stream": st.booleans()})
request = valid_request | st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=1, max_size=7) | json_values},
    optional={"model": any_text | json_values,
              "max_tokens": st.integers(-2, 70) | numbers, "max_completion_tokens": st.integers(-2, 70) | numbers,
              "temperature": st.floats(-0.5, 2.5) | numbers, "top_p": st.floats(-0.5, 1.5) | numbers,
              "stop": any_text | st.lists(any_text, max_size=6) | json_values,
              "seed": numbers, "n": numbers, "stream": json_values, "stream_options": json_values})


def _parse(body) -> ChatRequest | None:
    try:
        return parse_chat_request(body, LIMITS, 16000)
    except APIError as e:
        assert 400 <= e.status < 500, (e.status, e.message)
        assert e.message and e.body()["error"]["message"] == e.message
        return None


@FUZZ
@given(json_values)
def test_any_json_value_parses_or_gets_a_4xx(body):
    _parse(body)


@pytest.fixture(scope="module")
def model():
    from models.config import tiny
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer

    return build_speechlm(tiny(), tokenizer=build_tiny_tokenizer())


@FUZZ
@given(request)
def test_any_request_shaped_body_parses_and_tokenizes_or_gets_a_4xx(model, body):
    req = _parse(body)
    if req is None:
        return
    assert 1 <= req.params.max_new_tokens <= LIMITS.max_new_tokens and req.audio_seconds <= 3.0
    try:
        n_prompt, n_audio = prompt_tokens(model, req)
    except ConversationError:  # answered as 400 by the app
        return
    assert n_prompt >= n_audio >= 0


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfffb"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["\udc00"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": ["a"]}, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": {"a": 1}}, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": "yes"}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": [True]}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -(2**63) - 1}, "seed"),
])
def test_what_the_fuzzing_found_gets_a_400_naming_the_field(body, field):
    """Each of these reached a 500 before (a tokenizer or torch error, or a TypeError in the route)."""
    with pytest.raises(APIError) as e:
        parse_chat_request(body, LIMITS, 16000)
    assert e.value.status == 400 and e.value.param == field
