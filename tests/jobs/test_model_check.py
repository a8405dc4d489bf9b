"""`jobs.train --check` of a model spec: the paper's pair (Gemma 2B + Canary-1B's FastConformer) and another
(Llama-3.2-1B + Whisper large-v3's encoder), each named by a checkpoint folder holding its published config and a
tokenizer (no weights), built on the meta device: parameter counts equal the published totals, LoRA found on
attention and MLP, and a mixed-modal conversation rendered by the LM's template with the audio positions marked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (AutoConfig, ParakeetEncoderConfig, ParakeetFeatureExtractor, WhisperConfig,
                          WhisperFeatureExtractor, WhisperModel)

from jobs.training.preflight import model_summary
from models.config import vtblender_3b
from tests.models.lm_families import FAMILIES, build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    tie_word_embeddings=True, rope_theta=500000.0)
WHISPER_LARGE_V3 = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=128,
                        vocab_size=51866, max_source_positions=1500, max_target_positions=448)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Config-only checkpoint folders: what `--check` reads (it never loads weights)."""
    root = tmp_path_factory.mktemp("configs")
    paper = vtblender_3b()
    lm = dict(paper.lm.config)
    AutoConfig.for_model(lm.pop("model_type"), **lm).save_pretrained(root / "gemma-2b")
    build_tokenizer(FAMILIES["gemma"]).save_pretrained(root / "gemma-2b")
    ParakeetEncoderConfig(**paper.encoder.config).save_pretrained(root / "canary-1b-encoder")
    ParakeetFeatureExtractor(feature_size=128).save_pretrained(root / "canary-1b-encoder")
    AutoConfig.for_model("llama", **LLAMA_3_2_1B).save_pretrained(root / "llama-3.2-1b")
    build_tokenizer(FAMILIES["llama"]).save_pretrained(root / "llama-3.2-1b")
    WhisperConfig(**WHISPER_LARGE_V3).save_pretrained(root / "whisper-large-v3")
    WhisperFeatureExtractor(feature_size=128).save_pretrained(root / "whisper-large-v3")
    return root


def test_the_papers_pair_counts_as_published(checkpoints):
    cfg = vtblender_3b(str(checkpoints / "canary-1b-encoder"), str(checkpoints / "gemma-2b"))
    s = model_summary(cfg)
    assert s["parameters"]["lm"] == pytest.approx(2_506_172_416, rel=0.01)  # Gemma 2B's published total
    assert s["parameters"]["encoder"] == pytest.approx(609e6, rel=0.01)  # the paper's Canary encoder
    assert set(s["lora_targets"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "<start_of_turn>user\nListen: <audio 2.0 s = 25 positions> What is said?<end_of_turn>" in s["rendered"]
    assert s["rendered"].endswith("<start_of_turn>user\n<audio 1.0 s = 13 positions><end_of_turn>\n<start_of_turn>model\n")


def test_llama_with_a_whisper_encoder_counts_as_published(checkpoints):
    cfg = vtblender_3b(str(checkpoints / "whisper-large-v3"), str(checkpoints / "llama-3.2-1b"))
    cfg.encoder.kind, cfg.adapter.stack_frames = "whisper", 4  # 20 ms Whisper frames stacked to 80 ms
    s = model_summary(cfg)
    assert s["parameters"]["lm"] == pytest.approx(1_235_814_400, rel=0.01)  # Llama-3.2-1B's published total
    with torch.device("meta"):
        whisper = WhisperModel(WhisperConfig(**WHISPER_LARGE_V3))
    assert sum(p.numel() for p in whisper.parameters()) == pytest.approx(1_543_490_560, rel=0.01)  # published
    assert s["parameters"]["encoder"] == sum(p.numel() for p in whisper.encoder.parameters())
    assert s["lora_layers"] == 16 * 7
    assert "<|start_header_id|>user<|end_header_id|>\n\nListen: <audio 2.0 s = 25 positions> What is said?" \
        in s["rendered"] and "<|eot_id|>" in s["stops"]


def test_the_check_command_prints_it_before_reading_any_weight(checkpoints, tmp_path):
    from data_ops.shards import ShardWriter
    from data_ops.schema import conversation_to_cut
    from models.conversation import Conversation, Turn

    conv = Conversation([Turn.text("user", "hi"), Turn.text("assistant", "hello")])
    with ShardWriter(str(tmp_path / "corpus"), progress=False) as w:
        w.write("text", [conversation_to_cut(conv, cut_id="t0", data_type="text", task="text", langs=["en"])])
    recipe = {"run": {"name": "paper", "experiment": "x", "storage_path": str(tmp_path / "runs")},
              "model": {"size": "vtblender_3b", "lm_pretrained": str(checkpoints / "gemma-2b"),
                        "encoder_pretrained": str(checkpoints / "canary-1b-encoder")},
              "data": {"sources": {"text": {"uris": [str(tmp_path / "corpus")], "ratio": 1.0, "batch_size": 1}}},
              "train": {"max_steps": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(tmp_path / "r.yaml"), "--check"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "encoder 609.3M" in out.stdout and "LM 2,506.2M" in out.stdout
    assert "LoRA r=32 on 126 linear layers" in out.stdout and "<audio 2.0 s = 25 positions>" in out.stdout
