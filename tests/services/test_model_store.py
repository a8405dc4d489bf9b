"""ModelStore: LoRA fine-tunes of one base LM share one copy of it, answer exactly as when loaded whole, and give
their adapter back when no longer used."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from models.config import tiny
from models.conversation import AudioPart, Conversation, TextPart, Turn
from models.precision import computed_buffers
from models.speechlm import SpeechLM
from services.model_store import ModelStore, base_lm_key
from tests.services.serve_app import save_fine_tunes


def _bigger_lm():
    # an LM that outweighs what a fine-tune trains, as real ones do (Gemma-2B vs a 0.1B encoder), so sharing shows
    cfg = tiny()
    cfg.lm.config.update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    return cfg


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    return save_fine_tunes(tmp_path_factory.mktemp("ft"), ["a", "b", "c"], config=_bigger_lm())


def _conversations():
    audio = np.random.default_rng(3).uniform(-0.3, 0.3, 16000).astype(np.float32)
    return [Conversation([Turn("user", [TextPart("Listen:"), AudioPart(audio), TextPart("What is it?")])]),
            Conversation([Turn.text("user", "hello world")])]


def _logits(model, convs):
    batch = model.processor(convs, for_generation=True)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits


def _served_logits(served, convs):
    with served.active() as model:
        return _logits(model, convs)


def _stored_bytes(models) -> int:
    """Bytes of the distinct tensors the models hold (a tensor two models share counts once)."""
    seen = {}
    for m in models:
        for t in [*m.model.parameters(), *m.model.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def _own_bytes(model: SpeechLM) -> int:
    """What one fine-tune trained: encoder, modality adapter, LoRA."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n.startswith(("encoder.", "adapter.")) or "lora_" in n) + \
        sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.startswith(("encoder.", "adapter.")))


def test_a_shared_base_keeps_every_fine_tunes_computed_buffers_fp32(fine_tunes):
    # the second fine-tune's encoder and adapter are moved to bf16 on their own, beside the shared LM
    store = ModelStore(dtype=torch.bfloat16)
    served = [store.load(str(fine_tunes[name])) for name in ("a", "b")]
    assert served[0].model.lm is served[1].model.lm
    for s in served:
        kept = [(name, b.dtype) for _, name, b in computed_buffers(s.model)]
        assert {"inv_freq", "mel_fb"} <= {n for n, _ in kept} and all(d == torch.float32 for _, d in kept), kept
        assert s.model.adapter.proj_in.weight.dtype == torch.bfloat16


def test_fine_tunes_of_one_base_share_it_and_answer_as_loaded_whole(fine_tunes):
    store = ModelStore()
    served = {name: store.load(str(d)) for name, d in fine_tunes.items()}
    assert len({id(m.model.lm) for m in served.values()}) == 1  # one base LM under all three
    assert store.stats() == {"loaded_models": 3, "shared_lm_bases": 1, "lora_adapters_on_shared_bases": 3}
    convs = _conversations()
    whole = {name: _logits(SpeechLM.from_pretrained(d), convs) for name, d in fine_tunes.items()}
    assert (whole["a"] - whole["b"]).abs().max() > 0.1  # the fine-tunes differ: switching matters
    for name in ["a", "b", "c", "a", "c", "b"]:  # interleaved: each use activates its own adapter
        torch.testing.assert_close(_served_logits(served[name], convs), whole[name], rtol=1e-4, atol=1e-5)
    want = SpeechLM.from_pretrained(fine_tunes["c"]).generate(convs, max_new_tokens=6, return_ids=True)
    assert served["c"].generate(convs, max_new_tokens=6, return_ids=True) == want


def test_fine_tunes_used_at_once_from_threads_each_get_their_own_lora(fine_tunes):
    """Two fine-tunes of one base, used concurrently through every public path of `ServedModel` (generate, and
    the LM inside `active()`), each answer with their own LoRA: a path that ran the shared LM without taking the
    base and activating its adapter would mix them up."""
    from concurrent.futures import ThreadPoolExecutor

    store = ModelStore()
    served = {name: store.load(str(fine_tunes[name])) for name in ("a", "b")}
    convs = _conversations()
    whole = {name: SpeechLM.from_pretrained(fine_tunes[name]) for name in served}
    want_logits = {name: _logits(m, convs) for name, m in whole.items()}
    want_ids = {name: m.generate(convs, max_new_tokens=4, return_ids=True) for name, m in whole.items()}

    def use(i: int):
        name = "ab"[i % 2]
        if i % 4 < 2:
            return name, "logits", _served_logits(served[name], convs)
        return name, "ids", served[name].generate(convs, max_new_tokens=4, return_ids=True)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(use, range(24)))
    for name, kind, got in results:
        if kind == "logits":
            torch.testing.assert_close(got, want_logits[name], rtol=1e-4, atol=1e-5)
        else:
            assert got == want_ids[name], name
    assert served["a"].stop_token_ids() == whole["a"].stop_token_ids()
    for unlocked in ("lm", "forward", "encode_audio", "embed_inputs"):  # the shared LM only through active()
        assert not hasattr(served["a"], unlocked), unlocked


def test_memory_grows_by_the_fine_tune_not_the_base(fine_tunes):
    one = ModelStore()
    first = one.load(str(fine_tunes["a"]))
    bytes_one, own = _stored_bytes([first]), _own_bytes(first.model)
    assert own < bytes_one / 3  # the base is most of a model
    more = [one.load(str(fine_tunes[n])) for n in ("b", "c")]
    grown = _stored_bytes([first, *more]) - bytes_one
    # 3 fine-tunes vs 1: two more fine-tunes' own weights (the issue allows 3 and 10%)
    assert grown <= 2 * own * 1.1, (grown, own)
    whole = ModelStore(share_bases=False)
    copies = [whole.load(str(fine_tunes[n])) for n in ("a", "b", "c")]
    assert _stored_bytes(copies) - _stored_bytes(copies[:1]) > 3 * own * 1.1  # whole copies would not hold


def test_a_fine_tune_no_longer_used_gives_its_adapter_back(fine_tunes):
    store = ModelStore()
    a = store.load(str(fine_tunes["a"]))
    b = store.load(str(fine_tunes["b"]))
    b_name = b.lora_name
    assert b_name in a.model.lm.peft_config
    del b
    gc.collect()
    c = store.load(str(fine_tunes["c"]))  # the next use of the base deletes what was released
    assert b_name not in a.model.lm.peft_config and c.lora_name in a.model.lm.peft_config
    assert store.stats()["loaded_models"] == 2
    want = _logits(SpeechLM.from_pretrained(fine_tunes["a"]), _conversations())
    torch.testing.assert_close(_served_logits(a, _conversations()), want, rtol=1e-4, atol=1e-5)


def test_only_equal_bases_are_shared(tmp_path, fine_tunes):
    torch.manual_seed(5)
    other = save_fine_tunes(tmp_path, ["x"], config=_bigger_lm(), seed=5)["x"]  # another random base
    assert base_lm_key(other) != base_lm_key(fine_tunes["a"])
    assert base_lm_key(fine_tunes["b"]) == base_lm_key(fine_tunes["a"])
    store = ModelStore()
    a, x = store.load(str(fine_tunes["a"])), store.load(str(other))
    assert a.model.lm is not x.model.lm and store.stats()["shared_lm_bases"] == 2
    frozen = tiny(lm_mode="frozen")
    f = save_fine_tunes(tmp_path, ["f"], config=frozen)["f"]
    assert base_lm_key(f) is None  # no LoRA: nothing to put on a shared base, loaded whole
    assert store.load(str(f)).base is None
