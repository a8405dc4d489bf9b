"""CTC pretraining of the speech encoder: the head learns, greedy decoding merges repeats and drops blanks, and
the saved encoder is what a SpeechLM with `encoder.pretrained` loads."""

from __future__ import annotations

import numpy as np
import torch

from data_ops.schema import conversation_to_cut
from data_ops.shards import ShardWriter
from models.config import tiny
from models.conversation import AudioPart, Conversation, TextPart, Turn
from models.encoder_ctc import EncoderCTC, ctc_collapse
from models.speechlm import build_speech_encoder, build_speechlm


def _tone(freq: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_collapse_merges_repeats_and_drops_blanks():
    assert ctc_collapse([5, 0, 0, 5, 0, 2, 2, 5], blank=5) == [0, 0, 2]  # the blank separates the repeated 0s
    assert ctc_collapse([1, 1, 1], blank=5) == [1] and ctc_collapse([5, 5], blank=5) == []


def test_ctc_loss_falls_when_training_encoder_and_head():
    torch.manual_seed(0)
    model = EncoderCTC(build_speech_encoder(tiny()), vocab_size=3)
    low, high = _tone(300, 0.5), _tone(1500, 0.5)
    audio = torch.stack([torch.from_numpy(np.concatenate([low, high])), torch.from_numpy(np.concatenate([high, low]))])
    lens = torch.tensor([16000, 16000])
    targets = [[0, 1], [1, 0]]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(audio, lens, targets)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(np.isfinite(losses)) and losses[-1] < 0.3 * losses[0], losses[::10]


def test_pretrained_encoder_is_what_the_speechlm_loads(tmp_path, tokenizer):
    from jobs.training.encoder_pretraining import pretrain_encoder

    texts = ["the number is seven", "today is monday", "my name is anna"]
    with ShardWriter(str(tmp_path / "corpus"), shard_size=4, progress=False) as w:
        w.write("asr_ast", [conversation_to_cut(
            Conversation([Turn("user", [AudioPart(_tone(200 + 150 * i, 1.2)), TextPart("Transcribe.")]),
                          Turn.text("assistant", texts[i % 3])]), cut_id=f"u{i}", data_type="asr_ast", task="asr",
            langs=["en"]) for i in range(6)])
    out = tmp_path / "encoder"
    res = pretrain_encoder(str(tmp_path / "corpus"), tiny(), tokenizer, out, steps=4, batch_size=2,
                           eval_corpus=str(tmp_path / "corpus"), eval_batches=1, log_every=2)
    assert np.isfinite(res["loss"]) and res["wer"] is not None
    assert (out / "config.json").is_file() and not out.with_name("encoder.partial").exists()
    cfg = tiny()
    cfg.encoder.pretrained = str(out)
    model = build_speechlm(cfg, tokenizer=tokenizer)
    fresh = build_speechlm(tiny(), tokenizer=tokenizer)
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    loaded = model.encoder.encoder.state_dict()
    assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert any(not torch.equal(fresh.encoder.encoder.state_dict()[k], v) for k, v in saved.items()
               if v.is_floating_point())
