"""Shared fixtures: the tiny tokenizer and models, deterministic audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import tiny
from models.speechlm import build_speechlm
from models.tokenizer import build_tiny_tokenizer


def pytest_addoption(parser):
    parser.addoption("--content-seeds", default="0",
                     help="seeds of the content-learning test, comma-separated (the suite runs one; 0,1,2 were measured)")


def pytest_generate_tests(metafunc):
    if "content_seed" in metafunc.fixturenames:
        seeds = [int(s) for s in metafunc.config.getoption("--content-seeds").split(",")]
        metafunc.parametrize("content_seed", seeds)


# Fixtures that start or use the session's services: a test that asks for one is an integration test whether or not
# its module says so (`make test-fast`, `-m "not integration"`, must start nothing).
SERVICE_FIXTURES = {"stack", "ray_local", "s3_endpoint"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer(["hello world", "the answer is five", "Two plus three is five."])


@pytest.fixture
def make_model(tokenizer):
    """make_model(lm_mode="lora", encoder_kind="fastconformer", seed=0, **overrides) -> SpeechLM on CPU."""

    def _make(lm_mode="lora", encoder_kind="fastconformer", seed=0, encoder_train=True, adapter_train=True):
        torch.manual_seed(seed)
        cfg = tiny(lm_mode=lm_mode, encoder_kind=encoder_kind)
        cfg.encoder.train = encoder_train
        cfg.adapter.train = adapter_train
        return build_speechlm(cfg, tokenizer=tokenizer)

    return _make


@pytest.fixture
def audio():
    """audio(seconds, seed=0) -> 16 kHz float32 noise-like waveform with some structure."""

    def _audio(seconds: float, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        n = int(seconds * 16000)
        t = np.arange(n) / 16000
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)
        return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)

    return _audio


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The session's one local stack: a Ray head (6 logical CPUs, so a training job's 2 workers, its Ray Data read
    tasks and an evaluation fit on 2 cores), an MLflow server and a moto S3 endpoint, all on 127.0.0.1. Every
    integration test uses it (each with its own experiment names, run names and folders) rather than starting
    its own: a stack takes tens of seconds to start, and two Ray instances on one machine confuse each other."""
    from infra.stack import LocalStack

    s = LocalStack(tmp_path_factory.mktemp("stack"), services=("ray", "mlflow", "s3"), ray_num_cpus=6)
    s.start()
    try:
        yield s
    finally:
        s.stop(timeout=3)  # a test cluster: lingering workers after 3 s are killed, not waited for


@pytest.fixture(scope="session")
def ray_local(stack):
    """This test process as a Ray driver on the session's cluster, for the tests that run Ray Data in-process.
    Its workers get the S3 endpoint's test credentials (moto accepts any) through the job's runtime env."""
    import os

    import ray

    from infra.stack import S3_CREDENTIALS

    os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback-only test cluster; see infra/stack.py
    ray.init(address=stack.services["ray"].extra["gcs_address"], log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": dict(S3_CREDENTIALS)})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def s3_endpoint(stack):
    """The session's S3 endpoint (moto on 127.0.0.1); yields its URL with credentials set in the environment for
    the duration of the test."""
    import os

    from infra.stack import S3_CREDENTIALS

    saved = {k: os.environ.get(k) for k in [*S3_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update({**S3_CREDENTIALS, "AWS_ENDPOINT_URL": stack.urls["s3"]})
    try:
        yield stack.urls["s3"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def pcm_audio():
    """pcm_audio(seconds, seed) -> float32 audio on the 16-bit grid, so FLAC shards round-trip it bit-exactly."""

    def _pcm(seconds: float, seed: int = 0) -> np.ndarray:
        k = np.random.default_rng(seed).integers(-20000, 20000, size=int(seconds * 16000))
        return (k / 32768.0).astype(np.float32)

    return _pcm


@pytest.fixture
def corpus_conversations(pcm_audio):
    """cut id -> (data_type, conversation) for all four types; audio on the 16-bit grid, learnable targets."""
    from models.conversation import AudioPart, Conversation, TextPart, Turn

    out = {}
    for i in range(7):
        out[f"text-{i}"] = ("text", Conversation([Turn.text("user", f"q{i}"), Turn.text("assistant", f"a{i}")]))
    for i in range(9):
        a = pcm_audio(0.3 + 0.1 * i, seed=100 + i)
        out[f"asr-{i}"] = ("asr_ast", Conversation([Turn("user", [AudioPart(a), TextPart("Transcribe.")]),
                                                    Turn.text("assistant", f"words {i}")]))
    for i in range(5):
        a = pcm_audio(0.5, seed=200 + i)
        out[f"sqa-{i}"] = ("sqa", Conversation([Turn("user", [AudioPart(a), TextPart("Who?")]),
                                                Turn.text("assistant", "Anna")]))
    for i in range(6):  # two audio segments in one turn, text around them
        a, b = pcm_audio(0.2, seed=300 + i), pcm_audio(0.4, seed=400 + i)
        out[f"mixed-{i}"] = ("mixed_modal", Conversation([
            Turn("user", [TextPart("Hear"), AudioPart(a), TextPart("and"), AudioPart(b)]),
            Turn.text("assistant", "done")]))
    return out
