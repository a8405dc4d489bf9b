"""The served model is the trained model: vLLM (`models.engine`) answers token for token as the SpeechLM's own
`generate` on the same saved folder, in fp32, for text, audio and mixed prompts, for a base model and LoRA
fine-tunes: with the LoRAs applied per request, two fine-tunes sharing one engine (their LoRAs and audio towers
picked per request, in one batch), and with each LoRA merged into its own engine's weights.

The models are random but far from degenerate (weights drawn wide): their greedy answers differ per prompt and
per audio, so a wrong audio position, tower or adapter changes the tokens.
"""

from __future__ import annotations

import asyncio
import zlib

import numpy as np
import pytest
import torch

from models.conversation import AudioPart, Conversation, TextPart, Turn

pytestmark = pytest.mark.integration
MAX_NEW = 16


def _save_varied(root, name: str, lm_mode: str, seed: int, base_seed: int = 0):
    """A tiny SpeechLM with wide random weights (base LM from `base_seed`: equal bases share an engine)."""
    from models.config import tiny
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer

    torch.manual_seed(base_seed)
    model = build_speechlm(tiny(lm_mode), tokenizer=build_tiny_tokenizer())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() < 2:
                continue
            if n.startswith("lm.") and "lora_" not in n:  # the base LM: drawn from base_seed
                gb = torch.Generator().manual_seed(base_seed * 7919 + zlib.crc32(n.encode()))
                p.copy_(0.3 * torch.randn(p.shape, generator=gb))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.save_pretrained(root / name)


def _audio(seconds: float, seed: int) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


CONVERSATIONS = {
    "text": Conversation([Turn.text("user", "hello there, how are you?")]),
    "audio": Conversation([Turn("user", [AudioPart(_audio(1.3, 1))])]),
    "mixed": Conversation([Turn("user", [TextPart("Listen:"), AudioPart(_audio(0.9, 2)), TextPart("and"),
                                         AudioPart(_audio(2.1, 3)), TextPart("what is it?")])]),
    "multi_turn": Conversation([Turn("user", [TextPart("hi"), AudioPart(_audio(0.6, 4))]),
                                Turn.text("assistant", "the answer is five"),
                                Turn("user", [AudioPart(_audio(1.1, 5)), TextPart("again?")])]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    return {"base": _save_varied(root, "base", "frozen", seed=1),
            "lora_a": _save_varied(root, "lora_a", "lora", seed=2),
            "lora_b": _save_varied(root, "lora_b", "lora", seed=3)}


# `merged` (the CPU default) runs in `make test-slow`; the suite serves it over HTTP (test_chat_api's bf16 app)
@pytest.fixture(scope="module", params=["shared", pytest.param("merged", marks=pytest.mark.slow)])
def served(saved, loop, request):
    """The three models on engines, their LoRAs applied per request (shared) or merged into the weights."""
    from models.engine import EngineSettings, EngineStore

    store = EngineStore(EngineSettings(kv_cache_gib=0.25, max_num_seqs=8, lora=request.param))
    models = {name: store.load(str(d)) for name, d in saved.items()}
    yield {"dirs": saved, "models": models, "store": store, "lora": request.param}
    store.shutdown()


def _reference(folder, dtype=torch.float32):
    from models.speechlm import SpeechLM

    model = SpeechLM.from_pretrained(folder, dtype=dtype)
    _, ids = model.generate(list(CONVERSATIONS.values()), max_new_tokens=MAX_NEW, return_ids=True)
    return dict(zip(CONVERSATIONS, ids))


def test_fine_tunes_of_one_base_share_an_engine_and_a_frozen_lm_has_its_own(served):
    stats = served["store"].stats()
    counts = (stats["loaded_models"], stats["shared_lm_bases"], stats["lora_adapters_on_shared_bases"])
    if served["lora"] == "shared":
        assert counts == (3, 2, 2)
        assert served["models"]["lora_a"].engine is served["models"]["lora_b"].engine
    else:  # merged: an engine per fine-tune
        assert counts == (3, 3, 0)
        assert served["models"]["lora_a"].engine is not served["models"]["lora_b"].engine
    assert served["models"]["base"].engine is not served["models"]["lora_a"].engine


@pytest.mark.parametrize("name", ["base", "lora_a", "lora_b"])
def test_greedy_answers_are_the_hf_models_token_for_token_in_fp32(served, loop, name):
    want = _reference(served["dirs"][name])
    model = served["models"][name]

    async def answers():  # all at once: one continuous batch
        return await asyncio.gather(*(model.answer(c, MAX_NEW) for c in CONVERSATIONS.values()))

    got = dict(zip(CONVERSATIONS, [ids for _, ids in loop(answers())]))
    assert got == want
    assert len({tuple(v) for v in want.values()}) == len(want)  # the prompts' answers differ: a real comparison


def test_two_fine_tunes_in_one_batch_each_hear_with_their_own_tower(served, loop):
    """The same audio prompts to both fine-tunes of one engine, interleaved in one batch: each answer is its own
    model's; the two models answer differently."""
    want = {name: _reference(served["dirs"][name]) for name in ("lora_a", "lora_b")}
    order = [(name, case) for case in ("audio", "mixed") for name in ("lora_a", "lora_b")]

    async def answers():
        return await asyncio.gather(*(served["models"][n].answer(CONVERSATIONS[c], MAX_NEW) for n, c in order))

    got = loop(answers())
    for (name, case), (_, ids) in zip(order, got):
        assert ids == want[name][case], (name, case)
    assert want["lora_a"]["audio"] != want["lora_b"]["audio"]


def test_answer_losses_are_the_trained_models_teacher_forced_losses(served, loop):
    """What evaluation scores (the reference answers' loss) comes from the engine too: its prompt log-probabilities
    over the training encoding equal the SpeechLM's own answer loss (fp32)."""
    from models.content_check import answer_token_losses
    from models.speechlm import SpeechLM

    convs = [Conversation(c.turns + [Turn.text("assistant", "the answer is five")]) for c in CONVERSATIONS.values()]
    want = answer_token_losses(SpeechLM.from_pretrained(served["dirs"]["lora_a"]), convs)
    got = loop(served["models"]["lora_a"].answer_losses(convs))
    assert [n for _, n in got] == [n for _, n in want] and all(n > 0 for _, n in want)
    for (g, _), (w, _) in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-3)


def test_staggered_mixed_traffic_to_a_lora_fine_tune_is_answered_throughout(served, loop):
    """Online traffic: requests arrive staggered (each engine step mixes prefills of new prompts, some with audio,
    and decodes of running ones), of different lengths, some read as streams and some left early; the LoRA
    fine-tune answers every one, and after it all a greedy answer is still exactly the trained model's."""
    model = served["models"]["lora_a"]
    convs = list(CONVERSATIONS.values())

    async def one(i: int):
        await asyncio.sleep(0.02 * i)
        prompt, _, _ = model.prompt(convs[i % len(convs)])
        sampling = model.sampling(4 + 7 * (i % 4), greedy=i % 3 == 0, temperature=0.8, seed=i)
        n = 0
        async for out in model.generate(prompt, sampling):
            n = len(out.outputs[0].token_ids)
            if i % 5 == 4 and n >= 2:  # a client that leaves mid-answer
                break
        return n

    async def traffic():
        return await asyncio.gather(*(one(i) for i in range(24)))

    lengths = loop(traffic())
    assert all(n >= 1 for n in lengths)
    _, ids = loop(model.answer(CONVERSATIONS["mixed"], MAX_NEW))
    assert ids == _reference(served["dirs"]["lora_a"])["mixed"]


def test_an_engine_no_model_uses_any_more_is_stopped(served):
    """Serve's multiplexing drops a fine-tune it evicts: when no served model uses its engine, the engine stops
    (its memory goes back); one another model still uses stays. Run last: it drops the fixture's models."""
    import gc

    store, models = served["store"], served["models"]
    before = store.stats()["shared_lm_bases"]
    del models["lora_b"]
    gc.collect()
    # shared: lora_a still uses the engine (only the LoRA goes); merged: lora_b's own engine stops
    assert store.stats()["shared_lm_bases"] == before - (served["lora"] == "merged")
    del models["base"]
    gc.collect()
    assert store.stats()["shared_lm_bases"] == before - 1 - (served["lora"] == "merged")
