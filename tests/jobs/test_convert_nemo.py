"""`.nemo` FastConformer encoders in: a tiny archive laid out as NeMo writes one (model_config.yaml with NeMo's
encoder and preprocessor sections, model_weights.ckpt with NeMo's module names, decoder and featurizer weights
beside the encoder's) converts into a transformers checkpoint whose encoder computes exactly what the original
weights compute, loads as `encoder_pretrained` and runs; what cannot be converted is refused by name."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest
import torch
import yaml
from transformers import ParakeetEncoder, ParakeetEncoderConfig

from jobs.convert_nemo import main as convert_main
from models.config import tiny
from models.conversation import AudioPart, Conversation, TextPart, Turn
from models.checkpoint_check import checkpoint_problems
from models.speechlm import build_speechlm
from models.tokenizer import build_tiny_tokenizer

# transformers' names -> NeMo's (ConformerLayer, ConvSubsampling and RelPositionMultiHeadAttention attributes)
TO_NEMO = [(r"^subsampling\.layers\.", "pre_encode.conv."), (r"^subsampling\.linear\.", "pre_encode.out."),
           (r"\.conv\.norm\.", ".conv.batch_norm."), (r"\.q_proj\.", ".linear_q."), (r"\.k_proj\.", ".linear_k."),
           (r"\.v_proj\.", ".linear_v."), (r"\.o_proj\.", ".linear_out."), (r"\.relative_k_proj\.", ".linear_pos."),
           (r"\.bias_u$", ".pos_bias_u"), (r"\.bias_v$", ".pos_bias_v")]

NEMO_ENCODER = {
    "_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 80, "feat_out": -1, "n_layers": 2,
    "d_model": 64, "subsampling": "dw_striding", "subsampling_factor": 8, "subsampling_conv_channels": 32,
    "causal_downsampling": False, "ff_expansion_factor": 2, "self_attention_model": "rel_pos", "n_heads": 4,
    "att_context_size": [-1, -1], "att_context_style": "regular", "xscaling": True, "untie_biases": True,
    "pos_emb_max_len": 5000, "conv_kernel_size": 9, "conv_norm_type": "batch_norm", "conv_context_size": None,
    "dropout": 0.1, "dropout_pre_encoder": 0.1, "dropout_emb": 0.0, "dropout_att": 0.1,
    "stochastic_depth_drop_prob": 0.0, "stochastic_depth_mode": "linear", "stochastic_depth_start_layer": 1,
}
NEMO_PREPROCESSOR = {
    "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor", "sample_rate": 16000,
    "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01, "window": "hann", "features": 80,
    "n_fft": 512, "log": True, "frame_splicing": 1, "dither": 1e-05, "pad_to": 0, "pad_value": 0.0,
}


def _source_encoder() -> ParakeetEncoder:
    torch.manual_seed(0)
    cfg = ParakeetEncoderConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                conv_kernel_size=9, subsampling_factor=8, subsampling_conv_channels=32,
                                num_mel_bins=80, layerdrop=0.0)
    model = ParakeetEncoder(cfg).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, as a trained model has
        for n, b in model.named_buffers():
            if "running_mean" in n:
                b.normal_(0, 0.1)
            elif "running_var" in n:
                b.uniform_(0.5, 1.5)
    return model


def _nemo_archive(path, encoder: ParakeetEncoder, config_overrides=None, weights: bytes | None = None):
    state = {}
    for name, value in encoder.state_dict().items():
        for pattern, repl in TO_NEMO:
            name = re.sub(pattern, repl, name)
        state[f"encoder.{name}"] = value
    state["encoder.pos_enc.pe"] = torch.zeros(1, 9999, 64)  # NeMo saves its positional table; it is recomputed
    state["preprocessor.featurizer.fb"] = torch.zeros(1, 80, 257)
    state["decoder.decoder_layers.0.weight"] = torch.zeros(129, 64, 1)  # a CTC head: dropped
    config = {"sample_rate": 16000, "preprocessor": NEMO_PREPROCESSOR, "encoder": dict(NEMO_ENCODER),
              "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": 64}}
    config["encoder"].update(config_overrides or {})
    buf = io.BytesIO()
    torch.save(state, buf)
    files = {"./model_config.yaml": yaml.safe_dump(config).encode(), "./model_weights.ckpt": weights or buf.getvalue(),
             "./tokenizer.model": b"\x00"}
    with tarfile.open(path, "w:") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_nemo_encoder_converts_to_the_same_function_and_runs_in_a_speechlm(tmp_path, capsys):
    source = _source_encoder()
    archive = _nemo_archive(tmp_path / "tiny.nemo", source)
    assert convert_main([str(archive), "--out", str(tmp_path / "enc")]) == 0
    converted = ParakeetEncoder.from_pretrained(tmp_path / "enc").eval()
    feats = torch.randn(2, 160, 80)
    mask = torch.ones(2, 160, dtype=torch.long)
    mask[1, 100:] = 0
    with torch.no_grad():
        torch.testing.assert_close(converted(input_features=feats, attention_mask=mask).last_hidden_state,
                                   source(input_features=feats, attention_mask=mask).last_hidden_state)
    cfg = tiny()
    cfg.encoder.pretrained = str(tmp_path / "enc")
    assert checkpoint_problems(cfg) == []  # mel bins and sampling rate came along (preprocessor_config.json)
    model = build_speechlm(cfg, tokenizer=build_tiny_tokenizer())
    audio = np.random.default_rng(0).uniform(-0.3, 0.3, 16000).astype(np.float32)
    assert isinstance(model.generate([Conversation([Turn("user", [TextPart("Hi"), AudioPart(audio)])])],
                                     max_new_tokens=2)[0], str)


@pytest.mark.parametrize("overrides, message", [
    ({"att_context_size": [70, 13]}, "limited-context"),
    ({"self_attention_model": "rel_pos_local_attn"}, "self_attention_model='rel_pos_local_attn' is not supported"),
    ({"new_knob": 3}, "does not know: ['new_knob']"),
])
def test_what_cannot_be_converted_is_refused_by_name(tmp_path, capsys, overrides, message):
    archive = _nemo_archive(tmp_path / "x.nemo", _source_encoder(), overrides)
    assert convert_main([str(archive), "--out", str(tmp_path / "enc")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "enc").exists()


def test_weights_are_never_unpickled_beyond_tensors(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    buf = io.BytesIO()
    torch.save({"encoder.x": Payload()}, buf)
    archive = _nemo_archive(tmp_path / "evil.nemo", _source_encoder(), weights=buf.getvalue())
    assert convert_main([str(archive), "--out", str(tmp_path / "enc")]) == 2
    out = capsys.readouterr()
    assert "not a plain state dict of tensors" in out.err and "this ran" not in out.out
    (tmp_path / "notatar.nemo").write_bytes(b"plain bytes")
    assert convert_main([str(tmp_path / "notatar.nemo"), "--out", str(tmp_path / "enc")]) == 2
    assert "not a .nemo archive" in capsys.readouterr().err
