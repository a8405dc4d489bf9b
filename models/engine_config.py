"""The serving engine's view of a saved SpeechLM: the `config.json` that makes its directory a vLLM model folder.

`SpeechLM.save_pretrained` writes it beside the SpeechLM's own files, so every saved model (a training job's
output, an MLflow model version) is servable by vLLM as it is: no export step, nothing converted or copied. The
file is the LM's own config (vLLM sizes its KV cache and builds its LM from it) with `architectures` naming the
SpeechLM's vLLM class (`models.vllm_speechlm`) and a `vtblender` section saying where the LM's weights are and
which token marks an audio part in an engine prompt; the tokenizer's files sit beside it, where vLLM looks.
"""

from __future__ import annotations

import json
from pathlib import Path

ENGINE_CONFIG_FILE = "config.json"
ARCHITECTURE = "VTBlenderSpeechLM"


def audio_marker_id(tokenizer) -> int:
    """The token an engine prompt holds where an audio part goes: the id training reserves audio positions with
    (`ConversationProcessor.pad_id`), so the prompt around the audio is the training prompt token for token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def write_engine_config(model_dir: str | Path, lm, tokenizer, lm_source: str) -> Path:
    """Write `config.json` into a saved SpeechLM's directory.

    lm: the transformers causal LM (not PEFT-wrapped); lm_source: "lm" when the LM's weights were saved in the
    folder, else the pretrained checkpoint (HF id or path) they load from."""
    d = lm.config.to_dict()
    d["vtblender"] = {
        "lm_architectures": [type(lm).__name__],
        "lm_source": lm_source,
        "audio_marker_id": audio_marker_id(tokenizer),
    }
    d["architectures"] = [ARCHITECTURE]
    # vLLM reads the tokenizer from the model folder itself (the SpeechLM's own copy is in tokenizer/)
    tokenizer.save_pretrained(model_dir)
    path = Path(model_dir) / ENGINE_CONFIG_FILE
    path.write_text(json.dumps(d, indent=2, default=str))
    return path
