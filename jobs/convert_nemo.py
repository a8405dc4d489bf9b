"""Convert the FastConformer encoder of a NeMo `.nemo` checkpoint (Canary, Parakeet, any FastConformer ASR model)
into a transformers `ParakeetEncoder` checkpoint folder that `encoder_pretrained` loads.

    python -m jobs.convert_nemo canary-1b.nemo --out /checkpoints/canary-1b-encoder

A `.nemo` file is a tar archive holding `model_config.yaml` (the model's config; its `encoder` and `preprocessor`
sections matter here) and `model_weights.ckpt` (a torch state dict, read with `weights_only=True`: tensors only,
nothing unpickled that could run code). Only the encoder's weights are kept (decoders, joint networks and the
featurizer's buffers are dropped); NeMo's module names are mapped to transformers' (the mapping transformers'
own NeMo-to-Parakeet converter uses); every weight must land (strict load). The folder gets the encoder's config
and weights and a `preprocessor_config.json` (sampling rate, mel bins, window) that the recipe check compares
against the SpeechLM config. Configs this encoder cannot represent (limited attention context, another
subsampling or attention kind) are refused by name rather than converted into something else.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tarfile
from pathlib import Path

import yaml


class NemoConversionError(ValueError):
    """The archive cannot be converted; the message says why."""


# NeMo module names -> transformers' ParakeetEncoder names (after dropping the leading "encoder.")
NAME_MAP = [
    (r"^pre_encode\.conv\.", "subsampling.layers."),
    (r"^pre_encode\.out\.", "subsampling.linear."),
    (r"^pos_enc\.", "encode_positions."),
    (r"\.conv\.batch_norm\.", ".conv.norm."),
    (r"\.self_attn\.linear_q\.", ".self_attn.q_proj."),
    (r"\.self_attn\.linear_k\.", ".self_attn.k_proj."),
    (r"\.self_attn\.linear_v\.", ".self_attn.v_proj."),
    (r"\.self_attn\.linear_out\.", ".self_attn.o_proj."),
    (r"\.self_attn\.linear_pos\.", ".self_attn.relative_k_proj."),
    (r"\.self_attn\.pos_bias_u$", ".self_attn.bias_u"),
    (r"\.self_attn\.pos_bias_v$", ".self_attn.bias_v"),
]
# buffers NeMo may save that the transformers encoder recomputes
DERIVED = [r"^pos_enc\.pe$"]

ENCODER_KEYS = {
    "d_model": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
    "feat_in": "num_mel_bins", "conv_kernel_size": "conv_kernel_size", "subsampling_factor": "subsampling_factor",
    "subsampling_conv_channels": "subsampling_conv_channels", "pos_emb_max_len": "max_position_embeddings",
    "dropout": "dropout", "dropout_emb": "dropout_positions", "dropout_att": "attention_dropout",
    "xscaling": "scale_input", "stochastic_depth_drop_prob": "layerdrop",
}
# keys that change nothing in an offline encoder (training-time or output-side settings)
ENCODER_IGNORED = {"_target_", "feat_out", "dropout_pre_encoder", "stochastic_depth_start_layer",
                   "stochastic_depth_mode", "untie_biases", "causal_downsampling", "conv_context_size",
                   "reduction", "reduction_factor", "reduction_position", "global_tokens", "global_tokens_spacing",
                   "global_attn_separate", "conv_dual_mode", "pos_emb_max_len_extend"}
# keys this encoder supports only at one value
ENCODER_FIXED = {"self_attention_model": ("rel_pos",), "subsampling": ("dw_striding",),
                 "conv_norm_type": ("batch_norm",), "att_context_style": ("regular",)}


def encoder_config(nemo: dict) -> dict:
    """ParakeetEncoderConfig arguments from the `encoder` section of a NeMo model config."""
    enc = nemo.get("encoder")
    if not isinstance(enc, dict):
        raise NemoConversionError("model_config.yaml has no `encoder` section")
    out: dict = {"layerdrop": 0.0}  # NeMo's default (no stochastic depth) differs from ParakeetEncoderConfig's
    unknown = []
    for key, value in enc.items():
        if key in ENCODER_KEYS:
            out[ENCODER_KEYS[key]] = value
        elif key == "use_bias":
            out["attention_bias"] = out["convolution_bias"] = bool(value)
        elif key == "ff_expansion_factor":
            out["intermediate_size"] = int(enc["d_model"] * value)
        elif key in ENCODER_FIXED:
            if value not in ENCODER_FIXED[key]:
                raise NemoConversionError(f"encoder.{key}={value!r} is not supported (only {ENCODER_FIXED[key]})")
        elif key == "att_context_size":
            if list(value) != [-1, -1]:
                raise NemoConversionError(f"encoder.att_context_size={list(value)}: limited-context (streaming) "
                                          "attention is not supported; only full context [-1, -1]")
        elif key not in ENCODER_IGNORED:
            unknown.append(key)
    if unknown:
        raise NemoConversionError(f"encoder keys this converter does not know: {sorted(unknown)}")
    if enc.get("_target_", "").split(".")[-1] not in ("ConformerEncoder", ""):
        raise NemoConversionError(f"encoder {enc['_target_']} is not a (Fast)Conformer encoder")
    return out


def feature_extractor_config(nemo: dict) -> dict:
    pre = nemo.get("preprocessor") or {}
    rate = int(pre.get("sample_rate", 16000))
    return {"sampling_rate": rate, "feature_size": int(pre.get("features", 80)),
            "hop_length": int(round(pre.get("window_stride", 0.01) * rate)),
            "win_length": int(round(pre.get("window_size", 0.025) * rate)), "n_fft": int(pre.get("n_fft", 512))}


def encoder_state_dict(state: dict) -> dict:
    """The encoder's tensors under transformers' names."""
    out = {}
    for key, value in state.items():
        if not key.startswith("encoder."):
            continue  # decoders, joint networks, the featurizer's filterbank and window
        name = key[len("encoder."):]
        if any(re.search(p, name) for p in DERIVED):
            continue
        for pattern, repl in NAME_MAP:
            name = re.sub(pattern, repl, name)
        out[name] = value
    if not out:
        raise NemoConversionError("model_weights.ckpt holds no encoder.* weights")
    return out


def read_nemo(path: Path) -> tuple[dict, dict]:
    """(config, state dict) of a .nemo archive; only its config and weights are read, nothing is extracted."""
    import torch

    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise NemoConversionError(f"{path} is not a .nemo archive (a tar file): {e}") from None
    with tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for needed in ("model_config.yaml", "model_weights.ckpt"):
            if needed not in members:
                raise NemoConversionError(f"{path} has no {needed} (it holds {sorted(members)})")
        config = yaml.safe_load(tar.extractfile(members["model_config.yaml"]).read())
        raw = tar.extractfile(members["model_weights.ckpt"]).read()
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError for anything but tensors and plain containers
        raise NemoConversionError(f"{path}: model_weights.ckpt is not a plain state dict of tensors ({e})") from None
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint inside
        state = state["state_dict"]
    return config, state


def convert(nemo_path: str | Path, out: str | Path) -> Path:
    """Convert and save; returns the output folder. Raises NemoConversionError naming what does not fit."""
    import torch
    from transformers import ParakeetEncoder, ParakeetEncoderConfig, ParakeetFeatureExtractor

    config, state = read_nemo(Path(nemo_path))
    enc_config = ParakeetEncoderConfig(**encoder_config(config))
    weights = encoder_state_dict(state)
    with torch.device("meta"):
        model = ParakeetEncoder(enc_config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise NemoConversionError(f"the encoder's weights do not match its config: missing {missing[:10]}, "
                                  f"unexpected {unexpected[:10]}")
    model.load_state_dict(weights, strict=True, assign=True)
    out = Path(out)
    model.save_pretrained(out)
    ParakeetFeatureExtractor(**feature_extractor_config(config)).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.convert_nemo", description=__doc__.split("\n\n")[0])
    ap.add_argument("nemo", help="the .nemo file")
    ap.add_argument("--out", required=True, help="output folder (a transformers checkpoint)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.nemo, args.out)
    except NemoConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[convert_nemo] encoder written to {out}; use it as encoder_pretrained: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
