"""The SpeechLM: which parts train, save/load, sizes, bad input, long audio, learning and generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, ParakeetFeatureExtractor, WhisperFeatureExtractor

from models.config import vtblender_3b
from models.conversation import AudioPart, Conversation, ConversationError, TextPart, Turn
from models.features import FastConformerFeatures, WhisperFeatures
from models.speechlm import AudioPlaceholderMismatch, SpeechLM, build_speechlm


def _example(audio, answer="the answer is five"):
    return Conversation([
        Turn("user", [TextPart("Listen:"), AudioPart(audio(1.2, 4)), TextPart("What is it?")]),
        Turn.text("assistant", answer),
    ])


def _grads_after_backward(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("lm_mode,encoder_train", [("lora", True), ("frozen", True), ("full", True), ("lora", False)])
def test_backward_reaches_exactly_the_trained_parts(make_model, audio, lm_mode, encoder_train):
    model = make_model(lm_mode=lm_mode, encoder_train=encoder_train)
    grads = _grads_after_backward(model, model.processor([_example(audio)]))
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        is_lora = "lora_" in name
        should_train = {
            "encoder": encoder_train,
            "adapter": True,
            "lm": (lm_mode == "lora" and is_lora) or lm_mode == "full",
        }[part]
        assert p.requires_grad == should_train, name
        if not should_train:
            assert grads[name] is None, f"frozen {name} got a gradient"
    trained = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    # Every trained part really gets signal (not just requires_grad): some weight of each moves.
    assert any(n.startswith("adapter.") for n in trained)
    assert any(n.startswith("encoder.") for n in trained) == encoder_train
    assert any(n.startswith("lm.") for n in trained) == (lm_mode != "frozen")
    if lm_mode == "lora":
        assert all("lora_" in n for n in trained if n.startswith("lm."))


@pytest.mark.parametrize("lm_mode,encoder_kind", [("lora", "fastconformer"), ("full", "fastconformer"), ("lora", "whisper")])
def test_save_load_round_trip_gives_identical_logits(make_model, audio, tmp_path, lm_mode, encoder_kind):
    model = make_model(lm_mode=lm_mode, encoder_kind=encoder_kind)
    # Train a few steps so every part differs from its init (LoRA B starts at zero).
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = model.processor([_example(audio)])
    for _ in range(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    batch.pop("labels")  # the logits, not the loss
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "m")
    assert not list((tmp_path / "m").rglob("*.bin")) and not list((tmp_path / "m").rglob("*.pt"))
    loaded = SpeechLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        after = loaded(**loaded.processor([_example(audio)]) | {"labels": None}).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_lora_adapter_loads_with_peft(make_model, audio, tmp_path):
    model = make_model(lm_mode="lora")
    with torch.no_grad():
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "lm")
    peft_lm = PeftModel.from_pretrained(base, tmp_path / "m" / "lm_adapter").eval()
    ids = torch.tensor([[2, 10, 20, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(peft_lm(input_ids=ids).logits, model.lm(input_ids=ids).logits, rtol=0, atol=0)
        # and the adapter matters: without it the logits differ
        with peft_lm.disable_adapter():
            assert not torch.allclose(peft_lm(input_ids=ids).logits, model.lm(input_ids=ids).logits)


def test_paper_size_parameter_counts_on_meta_device():
    with torch.device("meta"):
        model = build_speechlm(vtblender_3b(), device="meta")
    counts = model.parameter_counts()
    # Paper / VTB release: Canary encoder 609M, 2-layer Conformer adapter 52M, LoRA r=32 36M; Gemma 2B ~2.5B.
    assert counts["encoder"] == pytest.approx(609e6, rel=0.10)
    assert counts["adapter"] == pytest.approx(52e6, rel=0.10)
    assert counts["lora"] == pytest.approx(36e6, rel=0.10)
    assert counts["lm"] == pytest.approx(2.5e9, rel=0.10)
    assert next(model.parameters()).device.type == "meta"


# -- bad input ---------------------------------------------------------------------------------------------------


def _gen_conv(part):
    return Conversation([Turn("user", [TextPart("hi"), part])])


@pytest.mark.parametrize(
    "conv_factory,message",
    [
        (lambda a: _gen_conv(AudioPart(a(1.0), sampling_rate=8000)), "8000 Hz, the model needs 16000 Hz"),
        (lambda a: _gen_conv(AudioPart(np.stack([a(1.0), a(1.0)]))), "mono 1-D waveform of shape (samples,), got shape (2, 16000)"),
        (lambda a: _gen_conv(AudioPart(np.zeros(0, np.float32))), "audio has zero samples"),
        (lambda a: _gen_conv(AudioPart(np.full(100, np.nan, np.float32))), "NaN"),
        (lambda a: _gen_conv(AudioPart((a(1.0) * 1000).astype(np.int16))), "floating point"),
        (lambda a: Conversation([]), "the conversation is empty"),
        (lambda a: Conversation([Turn.text("user", "q"), Turn.text("assistant", "a")]), "last turn must be a user turn"),
        (lambda a: _gen_conv(TextPart("look: <|audio|>")), "reserved audio placeholder"),
        (lambda a: Conversation([Turn.text("assistant", "hi"), Turn.text("user", "q")]), "first turn after the system prompt must be a user turn"),
        (lambda a: Conversation([Turn("user", [AudioPart(None, source="rec1")])]), "audio samples are missing"),
    ],
)
def test_bad_input_raises_one_clear_error(make_model, audio, conv_factory, message):
    model = make_model()
    with pytest.raises(ConversationError) as err:
        model.generate([conv_factory(audio)], max_new_tokens=2)
    assert message in str(err.value)


def test_placeholder_count_mismatch_is_named(make_model, audio):
    model = make_model()
    batch = model.processor([_example(audio)])
    batch["audio_mask"][0, batch["attention_mask"][0].sum() - 1] = True  # one reserved position too many
    with pytest.raises(AudioPlaceholderMismatch, match="reserved for audio but the 1 audio segment"):
        model(**batch)
    batch = model.processor([_example(audio)])
    with pytest.raises(AudioPlaceholderMismatch, match="no audio was given"):
        model(**{**batch, "audio": batch["audio"][:0], "audio_lens": batch["audio_lens"][:0]})


def test_training_conversation_without_answer_is_rejected(make_model):
    model = make_model()
    with pytest.raises(ConversationError, match="at least one assistant turn"):
        model.processor([Conversation([Turn.text("user", "q")])])


# -- long audio ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder_kind,seconds", [("fastconformer", 45.0), ("whisper", 65.0)])
def test_long_audio_is_encoded_whole_not_truncated(make_model, audio, encoder_kind, seconds):
    model = make_model(encoder_kind=encoder_kind).eval()
    long = audio(seconds, 7)
    n_tokens = model.audio_token_count(len(long))
    # 80 ms adapter frames either way: every second of audio is represented, including past 30 s.
    assert n_tokens == pytest.approx(seconds / 0.08, abs=3)
    with torch.no_grad():
        emb, lens = model.encode_audio(torch.from_numpy(long)[None], torch.tensor([len(long)]))
    assert int(lens[0]) == n_tokens and emb.shape[1] == n_tokens
    # The tail of the audio influences the last frames: change only the last 2 s, and only late frames move.
    changed = long.copy()
    changed[-32000:] = audio(2.0, 99)
    with torch.no_grad():
        emb2, _ = model.encode_audio(torch.from_numpy(changed)[None], torch.tensor([len(changed)]))
    moved = (emb2[0] - emb[0]).abs().amax(-1) > 1e-5
    assert moved[-10:].any()
    if encoder_kind == "whisper":
        # Windows are encoded independently: the encoder frames of the first 30 s window (20 ms each) are
        # untouched. (The adapter's self-attention then mixes all frames, as it should.)
        with torch.no_grad():
            h1, _ = model.encoder(torch.from_numpy(long)[None], torch.tensor([len(long)]))
            h2, _ = model.encoder(torch.from_numpy(changed)[None], torch.tensor([len(changed)]))
        enc_moved = (h2[0] - h1[0]).abs().amax(-1) > 1e-5
        assert not enc_moved[:1500].any() and enc_moved[-10:].any()


# -- features ------------------------------------------------------------------------------------------------------


def test_fastconformer_features_match_transformers_extractor(audio):
    waves = [audio(1.0, 1), audio(1.7, 2)]
    ref = ParakeetFeatureExtractor(feature_size=80)(waves, sampling_rate=16000, return_tensors="pt")
    padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True)
    feats, lens = FastConformerFeatures(80)(padded, torch.tensor([len(w) for w in waves]))
    assert lens.tolist() == ref["attention_mask"].sum(-1).tolist()
    t = ref["input_features"].shape[1]
    torch.testing.assert_close(feats[:, :t], ref["input_features"], rtol=1e-4, atol=1e-4)


def test_whisper_features_match_transformers_extractor(audio):
    wave = audio(3.0, 5)
    ref = WhisperFeatureExtractor(feature_size=80)([wave], sampling_rate=16000, return_tensors="pt")["input_features"]
    window = torch.zeros(1, 480000)
    window[0, : len(wave)] = torch.from_numpy(wave)
    torch.testing.assert_close(WhisperFeatures(80)(window), ref, rtol=1e-4, atol=1e-4)


# -- learning and generation ---------------------------------------------------------------------------------------


def _fit(model, convs, steps, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = model.processor(convs)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_model_learns_audio_dependent_answers_and_batched_generation_matches_single(make_model, audio):
    """Two conversations with the same text and different audio need different answers: only the audio tells
    them apart, so fitting them proves the audio path carries information into the LM."""
    torch.manual_seed(0)
    model = make_model(lm_mode="full")
    a, b = audio(1.0, 11), audio(1.4, 12)
    convs = [
        Conversation([Turn("user", [TextPart("which?"), AudioPart(a)]), Turn.text("assistant", "hello world")]),
        Conversation([Turn("user", [TextPart("which?"), AudioPart(b)]), Turn.text("assistant", "the answer is five")]),
    ]
    losses = _fit(model, convs, steps=80)
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    prompts = [Conversation(c.turns[:1]) for c in convs]
    batched = model.generate(prompts, max_new_tokens=12)
    assert batched == ["hello world", "the answer is five"]
    singles = [model.generate([p], max_new_tokens=12)[0] for p in prompts]
    assert singles == batched


@pytest.mark.gpu
def test_bf16_on_cuda_matches_fp32_and_trains(make_model, audio, tmp_path):
    model = make_model().eval()
    batch = model.processor([_example(audio)])
    with torch.no_grad():
        ref = model(**batch | {"labels": None}).logits
    model.save_pretrained(tmp_path / "m")
    gpu = SpeechLM.from_pretrained(tmp_path / "m", device="cuda", dtype=torch.bfloat16)
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    with torch.no_grad():
        out = gpu(**cuda_batch | {"labels": None}).logits.float().cpu()
    assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 2e-2
    # fp32 weights + bf16 autocast: the training path
    train_model = make_model().to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = train_model(**cuda_batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in train_model.parameters() if p.requires_grad)
    assert isinstance(gpu.generate([Conversation(_example(audio).turns[:1])], max_new_tokens=4)[0], str)
