"""Typed configuration of a SpeechLM, and its named sizes.

`SpeechLMConfig` says which encoder, adapter and LM to build, where their weights come from (a Hugging Face id or
local path, or random init from the inline `config`), and which parts train. Unknown keys are rejected. YAML
recipes (jobs/) embed this as their `model:` section.

Named sizes (`tiny()`, `vtblender_3b()`) spell out every number, as torchtune's `llama3_2_3b()` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """The base of every typed config here: an unknown key is an error (a typo never passes as a default)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class EncoderConfig(StrictModel):
    kind: Literal["fastconformer", "whisper"] = "fastconformer"
    """FastConformer (transformers' ParakeetEncoder, the Canary family, 80 ms frames) or Whisper's encoder."""
    pretrained: str | None = None
    """HF id or local path of a checkpoint holding the encoder; None builds it from `config` with random init."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of ParakeetEncoderConfig / WhisperConfig, used when `pretrained` is None."""
    train: bool = True
    """Fully fine-tune the encoder (the paper does)."""
    whisper_window_s: float = 30.0
    """Whisper only: long audio is encoded in windows of this many seconds, then concatenated (never truncated)."""


class AdapterConfig(StrictModel):
    num_layers: int = Field(2, ge=0)
    hidden_size: int = Field(1024, ge=8)
    num_heads: int = Field(8, ge=1)
    ff_mult: int = Field(4, ge=1)
    conv_kernel_size: int = Field(9, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    stack_frames: int = Field(1, ge=1)
    """Concatenate this many encoder frames before the adapter (e.g. 4 turns Whisper's 20 ms frames into 80 ms)."""
    train: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> "AdapterConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"adapter hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.conv_kernel_size % 2 == 0:
            raise ValueError(f"adapter conv_kernel_size must be odd, got {self.conv_kernel_size}")
        return self


class LoraSettings(StrictModel):
    r: int = Field(32, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """The LM linears LoRA wraps. "all-linear" (PEFT's): every linear layer of the decoder but the output layer,
    i.e. attention and MLP as the paper's rank-32 adapter, whatever the architecture calls them (Gemma, Llama,
    Qwen, Mistral: q/k/v/o_proj + gate/up/down_proj; Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj). Or the
    linears' names; one that matches no linear layer of the LM is an error, not a silently smaller adapter."""


class LMConfig(StrictModel):
    pretrained: str | None = None
    """HF id or local path for AutoModelForCausalLM (and its tokenizer); None builds from `config` (random init)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """`model_type` plus keyword arguments for AutoConfig.for_model, used when `pretrained` is None."""
    tokenizer: str | None = None
    """Tokenizer path or id; defaults to `pretrained`. With neither, the project's offline tiny tokenizer is built."""
    mode: Literal["lora", "frozen", "full"] = "lora"
    """How the LM trains: LoRA adapters only (paper), frozen (ablation B2), or every weight."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    end_of_turn: str | None = None
    """An extra token generation stops on, besides EOS and the end-of-turn token read from the chat template
    (`ConversationProcessor.end_of_turn_ids`); None: those two only."""


class SpeechLMConfig(StrictModel):
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    lm: LMConfig = Field(default_factory=LMConfig)
    sampling_rate: int = 16000
    n_mels: int = Field(80, ge=8)
    audio_placeholder: str = "<|audio|>"
    """Marker written into the rendered chat text where an audio part sits. Never tokenized: the processor
    splits the text on it and reserves one position per audio frame."""

    @model_validator(mode="after")
    def _consistent(self) -> "SpeechLMConfig":
        if self.encoder.pretrained is None and "num_mel_bins" in self.encoder.config:
            if self.encoder.config["num_mel_bins"] != self.n_mels:
                raise ValueError(
                    f"encoder.config.num_mel_bins={self.encoder.config['num_mel_bins']} but n_mels={self.n_mels}"
                )
        if self.lm.pretrained is None and "model_type" not in self.lm.config:
            raise ValueError("lm.config needs a 'model_type' (e.g. 'gemma') when lm.pretrained is not set")
        return self


# ----------------------------------------------------------------------------------------------------------------
# Named sizes
# ----------------------------------------------------------------------------------------------------------------


def tiny(lm_mode: Literal["lora", "frozen", "full"] = "lora", encoder_kind: str = "fastconformer") -> SpeechLMConfig:
    """A CPU-sized SpeechLM with random init: tests and the demo. ~1M parameters in all.

    Encoder: FastConformer, 2 layers, hidden 64, 4 heads, ff 128, 8x subsampling (80 ms frames), 80 mels.
    Adapter: 2 Conformer layers, hidden 64, 4 heads. LM: Gemma-style, 2 layers, hidden 64, 2 heads (1 KV head,
    head dim 32: the smallest vLLM's CPU attention takes), MLP 128; LoRA r=8 on q/k/v/o/gate/up/down. Vocabulary:
    the project's offline tokenizer.
    """
    if encoder_kind == "whisper":
        encoder = EncoderConfig(
            kind="whisper",
            config=dict(
                d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                num_mel_bins=80, max_source_positions=1500,
                # the decoder is never built; these only keep WhisperConfig self-consistent
                decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=64,
                pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
            ),
        )
        stack = 4  # 20 ms Whisper frames -> 80 ms
    else:
        encoder = EncoderConfig(
            kind="fastconformer",
            config=dict(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                conv_kernel_size=9, subsampling_factor=8, subsampling_conv_channels=32, num_mel_bins=80,
                dropout=0.0, dropout_positions=0.0, layerdrop=0.0, activation_dropout=0.0, attention_dropout=0.0,
            ),
        )
        stack = 1
    return SpeechLMConfig(
        encoder=encoder,
        adapter=AdapterConfig(
            num_layers=2, hidden_size=64, num_heads=4, ff_mult=2, conv_kernel_size=9, dropout=0.0, stack_frames=stack
        ),
        lm=LMConfig(
            config=dict(
                model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
                hidden_activation="gelu_pytorch_tanh",
            ),
            mode=lm_mode,
            lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        ),
        n_mels=80,
    )


def mini(lm_mode: Literal["lora", "frozen", "full"] = "lora") -> SpeechLMConfig:
    """The ablation miniature's size (docs/ablation.md): small enough to train on 2 CPU cores in minutes, large
    enough for its LM to learn the demo's text tasks. ~2.5M parameters.

    Encoder: FastConformer, 4 layers, hidden 96, 4 heads, ff 256, 8x subsampling. Adapter: 2 Conformer layers,
    hidden 128. LM: Gemma-style, 4 layers, hidden 128, 4 heads (1 KV head, head dim 32), MLP 512; LoRA r=32 (alpha
    32) on q/k/v/o/gate/up/down as in the paper.
    """
    cfg = tiny(lm_mode)
    cfg.encoder.config.update(hidden_size=96, num_hidden_layers=4, intermediate_size=256, subsampling_conv_channels=64)
    cfg.adapter = AdapterConfig(num_layers=2, hidden_size=128, num_heads=4, ff_mult=2, conv_kernel_size=9,
                                dropout=0.0, stack_frames=1)
    cfg.lm.config.update(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=32)
    cfg.lm.lora = LoraSettings(r=32, alpha=32, dropout=0.0)
    return cfg


def vtblender_3b(
    encoder_pretrained: str | None = None, lm_pretrained: str | None = None
) -> SpeechLMConfig:
    """The paper's model (VoiceTextBlender 3B, section 4.1).

    Encoder: Canary-1B FastConformer: 24 layers, hidden 1024, 8 heads, ff 4096, conv kernel 9, 8x subsampling
    with 256 conv channels, 128 mels (~609M parameters), fully fine-tuned.
    Adapter: 2 Conformer layers, hidden 1024, 8 heads, ff 4096, conv kernel 9, dropout 0.1 (~52M), fully trained.
    LM: first-generation Gemma 2B (after text SFT): 18 layers, hidden 2048, 8 heads, 1 KV head, head dim 256,
    MLP 16384, vocab 256000; LoRA r=32 (alpha 32) on q/k/v/o/gate/up/down (~36M, paper; ~39M by this count).

    Pass `encoder_pretrained` / `lm_pretrained` (HF ids or local paths) to load real weights; left as None the
    config builds the same shapes with random init (or on the meta device, for parameter counts).
    """
    return SpeechLMConfig(
        encoder=EncoderConfig(
            kind="fastconformer",
            pretrained=encoder_pretrained,
            config={} if encoder_pretrained else dict(
                hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, intermediate_size=4096,
                conv_kernel_size=9, subsampling_factor=8, subsampling_conv_channels=256, num_mel_bins=128,
            ),
        ),
        adapter=AdapterConfig(
            num_layers=2, hidden_size=1024, num_heads=8, ff_mult=4, conv_kernel_size=9, dropout=0.1, stack_frames=1
        ),
        lm=LMConfig(
            pretrained=lm_pretrained,
            config={} if lm_pretrained else dict(
                model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh",
            ),
            mode="lora",
            lora=LoraSettings(r=32, alpha=32, dropout=0.0),
        ),
        n_mels=128,
    )


NAMED_SIZES = {"tiny": tiny, "mini": mini, "vtblender_3b": vtblender_3b}


def checkpoint_source(source: str, what: str) -> str:
    """`source` if it is a local folder or could be a Hugging Face id; else a FileNotFoundError naming `what`.

    Why: transformers tries anything that is not a local folder as a hub id, so a mistyped or unmounted local
    path fails with "Repo id must be in the form 'repo_name' or 'namespace/repo_name'", which does not say that
    the folder is missing."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise FileNotFoundError(f"{what} {source!r}: no such local folder (and not a Hugging Face model id)") from None
    return source
