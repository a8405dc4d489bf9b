"""The SpeechLM of VoiceTextBlender, in one file: speech encoder -> modality adapter -> text LLM with LoRA.

    waveforms (16 kHz) --log-mel (on device)--> encoder (FastConformer | Whisper) --> ModalityAdapter
        (frame stacking, 2 Conformer layers, projection to the LM width) --> audio embeddings, written into the
        chat-templated token embeddings at the positions the processor reserved --> causal LM (PEFT LoRA)

Which parts train is config: encoder (full fine-tune or frozen), adapter, LM (LoRA, frozen, or full).

This module knows nothing of Ray, MLflow or storage: it takes tensors and conversations and returns tensors and
text. Save/load use PEFT's adapter format and safetensors; nothing is unpickled.

Legend: B conversations, L tokens, N audio segments, S samples, T encoder frames, T' adapter frames,
D_enc encoder width, H adapter width, D LM width.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_outputs import CausalLMOutputWithPast

from models.config import SpeechLMConfig, checkpoint_source
from models.conversation import Conversation, ConversationError
from models.features import FastConformerFeatures, WhisperFeatures
from models.loss import answer_loss, answer_nll_per_row, logit_softcap
from models.precision import KeepComputedBuffers
from models.processor import ConversationProcessor, move_batch
from models.skeleton import allocate_unwritten, unread_lm
from models.engine_config import write_engine_config

CONFIG_FILE = "speechlm_config.json"
ENCODER_FILE = "encoder.safetensors"
ENCODER_CONFIG_FILE = "encoder_config.json"
ADAPTER_FILE = "adapter.safetensors"
LORA_DIR = "lm_adapter"
LM_DIR = "lm"
TOKENIZER_DIR = "tokenizer"


class AudioPlaceholderMismatch(ConversationError):
    """The number of reserved audio positions differs from the number of audio frames produced."""


# ----------------------------------------------------------------------------------------------------------------
# Speech encoder: a transformers encoder plus its on-device frontend
# ----------------------------------------------------------------------------------------------------------------


class SpeechEncoder(KeepComputedBuffers):
    """Wraps transformers' `ParakeetEncoder` (FastConformer) or Whisper's encoder with its feature frontend.

    Whisper needs exactly 30 s windows: long audio is cut into windows, each encoded, and the valid frames of all
    windows concatenated, so nothing is truncated. FastConformer takes any length in one pass.
    """

    def __init__(self, kind: str, encoder: nn.Module, n_mels: int, sampling_rate: int, whisper_window_s: float):
        super().__init__()
        self.kind = kind
        self.encoder = encoder
        self.sampling_rate = sampling_rate
        if kind == "fastconformer":
            self.features = FastConformerFeatures(n_mels=n_mels, sampling_rate=sampling_rate)
            c = encoder.config
            self._sub_layers = int(math.log2(c.subsampling_factor))
            self._sub_kernel, self._sub_stride = c.subsampling_conv_kernel_size, c.subsampling_conv_stride
            self.hidden_size = c.hidden_size
        else:
            self.features = WhisperFeatures(n_mels=n_mels, sampling_rate=sampling_rate)
            self.window_samples = int(whisper_window_s * sampling_rate)
            expected = encoder.config.max_source_positions * 2 * self.features.hop_length
            if self.window_samples != expected:
                raise ValueError(
                    f"whisper_window_s={whisper_window_s} does not match the encoder's input of "
                    f"{expected / sampling_rate:.1f} s (max_source_positions={encoder.config.max_source_positions})"
                )
            self.hidden_size = encoder.config.d_model

    def output_length(self, num_samples: int) -> int:
        """Encoder frames for `num_samples` samples (pure arithmetic; the processor relies on it matching)."""
        if self.kind == "fastconformer":
            n = self.features.num_frames(num_samples)
            all_pad = (self._sub_kernel - 1) // 2 * 2
            for _ in range(self._sub_layers):  # ParakeetEncoder._get_subsampling_output_length, in ints
                n = math.floor((n + all_pad - self._sub_kernel) / self._sub_stride + 1.0)
            return n
        total, w = 0, self.window_samples
        for start in range(0, num_samples, w):
            n = min(w, num_samples - start)
            total += math.ceil(self.features.num_frames(n) / 2)  # conv2 has stride 2
        return total

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (N, S), audio_lens (N,) -> hidden (N, T, D_enc), lens (N,) on the host.

        Frame counts are host arithmetic on the lengths (kept on the host by `move_batch`: no device sync); the
        features enter the encoder in its weights' dtype (fp32 features into bf16 weights fail outside autocast).
        """
        host_lens = audio_lens.cpu().tolist()
        lens = torch.tensor([self.output_length(n) for n in host_lens], dtype=torch.long)
        dtype = next(self.encoder.parameters()).dtype
        if self.kind == "whisper":
            return self._whisper_forward(audio, host_lens, dtype), lens
        # Features in fp32 even under bf16 autocast: STFT and log are precision-sensitive.
        with torch.autocast(device_type=audio.device.type, enabled=False):
            feats, feat_lens = self.features(audio, audio_lens.to(audio.device))
        mask = torch.arange(feats.shape[1], device=audio.device)[None, :] < feat_lens[:, None]
        hidden = self.encoder(input_features=feats.to(dtype), attention_mask=mask.long()).last_hidden_state
        # frames past the longest clip's are padding: the padded length's count is known without reading lens
        return hidden[:, : self.output_length(audio.shape[1])], lens

    def _whisper_forward(self, audio: torch.Tensor, host_lens: list[int], dtype: torch.dtype) -> torch.Tensor:
        w = self.window_samples
        windows, owner, valid = [], [], []
        for i, n in enumerate(host_lens):
            for start in range(0, n, w):
                chunk = audio[i, start : min(start + w, n)]
                windows.append(F.pad(chunk, (0, w - chunk.shape[0])))
                owner.append(i)
                valid.append(math.ceil(self.features.num_frames(chunk.shape[0]) / 2))
        with torch.autocast(device_type=audio.device.type, enabled=False):
            feats = self.features(torch.stack(windows))
        hidden = self.encoder(input_features=feats.to(dtype)).last_hidden_state  # (W, 1500, D)
        per_audio: list[list[torch.Tensor]] = [[] for _ in range(audio.shape[0])]
        for h, i, v in zip(hidden, owner, valid):
            per_audio[i].append(h[:v])
        seqs = [torch.cat(chunks) for chunks in per_audio]
        return nn.utils.rnn.pad_sequence(seqs, batch_first=True)


# ----------------------------------------------------------------------------------------------------------------
# Modality adapter: Conformer layers
# ----------------------------------------------------------------------------------------------------------------


class ConformerLayer(nn.Module):
    """One Conformer block (Gulati et al., 2020): half-step FFN, self-attention, convolution, half-step FFN, LN.

    Written here because transformers has no standalone public Conformer layer (ParakeetEncoderBlock needs the
    encoder's relative position module) and torchaudio's has no CPU wheel on our target machines. Changes from
    the paper's block: LayerNorm instead of BatchNorm in the convolution module (batch statistics would mix in
    padding), and no relative positional encoding (the encoder's output already carries position).
    """

    def __init__(self, hidden: int, heads: int, ff_mult: int, kernel: int, dropout: float):
        super().__init__()
        self.ff1 = self._ff(hidden, ff_mult, dropout)
        self.ff2 = self._ff(hidden, ff_mult, dropout)
        self.attn_norm = nn.LayerNorm(hidden)
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.conv_norm = nn.LayerNorm(hidden)
        self.pointwise_in = nn.Linear(hidden, 2 * hidden)
        self.depthwise = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)
        self.depthwise_norm = nn.LayerNorm(hidden)
        self.pointwise_out = nn.Linear(hidden, hidden)
        self.final_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout
        self.checkpointing = False  # recompute in the backward instead of keeping activations (train-time memory)

    @staticmethod
    def _ff(hidden: int, mult: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, mult * hidden), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(mult * hidden, hidden), nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (N, T', H), mask (N, T') True on valid frames -> (N, T', H)."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            # within forward, not around the call: module hooks (FSDP's gathers) stay out of the recompute
            return checkpoint(self._block, x, mask, use_reentrant=False)
        return self._block(x, mask)

    def _block(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        n, t, h = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(n, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.dropout(self.attn_out(a.transpose(1, 2).reshape(n, t, h)))
        c = F.glu(self.pointwise_in(self.conv_norm(x)), dim=-1)
        c = c.masked_fill(~mask[..., None], 0.0)  # padding must not leak into valid frames through the conv
        c = self.depthwise(c.transpose(1, 2)).transpose(1, 2)
        c = self.pointwise_out(F.silu(self.depthwise_norm(c)))
        x = x + self.dropout(c)
        x = x + 0.5 * self.ff2(x)
        return self.final_norm(x)


class ModalityAdapter(KeepComputedBuffers):
    """Maps encoder frames into the LM's embedding space: stack `k` frames, project to H, Conformer layers,
    project to D."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, num_layers: int, heads: int, ff_mult: int,
                 kernel: int, dropout: float, stack_frames: int):
        super().__init__()
        self.stack = stack_frames
        self.proj_in = nn.Linear(in_dim * stack_frames, hidden)
        self.layers = nn.ModuleList(ConformerLayer(hidden, heads, ff_mult, kernel, dropout) for _ in range(num_layers))
        self.proj_out = nn.Linear(hidden, out_dim)

    def output_length(self, encoder_frames: int) -> int:
        return math.ceil(encoder_frames / self.stack)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, T, D_enc), lens (N,) -> (N, T', D), lens' (N,) on the device `lens` came on."""
        n, t, d = x.shape
        if self.stack > 1:
            pad = (-t) % self.stack
            x = F.pad(x, (0, 0, 0, pad)).reshape(n, (t + pad) // self.stack, d * self.stack)
            lens = torch.div(lens + self.stack - 1, self.stack, rounding_mode="floor")
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lens.to(x.device)[:, None]
        x = self.proj_in(x.to(self.proj_in.weight.dtype))  # the encoder's output dtype may differ from the adapter's
        for layer in self.layers:
            x = layer(x, mask)
        return self.proj_out(x), lens


# ----------------------------------------------------------------------------------------------------------------
# The SpeechLM
# ----------------------------------------------------------------------------------------------------------------


class SpeechLM(KeepComputedBuffers):
    """Encoder + adapter + causal LM. Build with `build_speechlm` or `SpeechLM.from_pretrained`. `.to(dtype)` moves
    the weights; computed buffers (rotary frequencies, filterbank) stay fp32, as training keeps them."""

    def __init__(self, config: SpeechLMConfig, encoder: SpeechEncoder, adapter: ModalityAdapter, lm: nn.Module,
                 tokenizer=None):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.adapter = adapter
        self.lm = lm
        self.tokenizer = tokenizer
        self.processor = (
            ConversationProcessor(tokenizer, self.audio_token_count, config.audio_placeholder, config.sampling_rate)
            if tokenizer is not None else None
        )

    # -- geometry -----------------------------------------------------------------------------------------------
    def audio_token_count(self, num_samples: int) -> int:
        """LM positions one audio of `num_samples` samples occupies."""
        return self.adapter.output_length(self.encoder.output_length(num_samples))

    @property
    def device(self) -> torch.device:
        return next(self.adapter.parameters()).device

    # -- forward ------------------------------------------------------------------------------------------------
    def encode_audio(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (N, S), audio_lens (N,) -> embeddings (N, T', D), lens (N,)."""
        hidden, lens = self.encoder(audio, audio_lens)
        return self.adapter(hidden, lens)

    def embed_inputs(self, input_ids: torch.Tensor, audio_mask: torch.Tensor, audio: torch.Tensor | None,
                     audio_lens: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with audio embeddings written at `audio_mask` positions, audio i at its i-th run.

        input_ids, audio_mask (B, L); audio (N, S); audio_lens (N,) -> (B, L, D).
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        n_reserved = int(audio_mask.sum())
        if audio is None or audio.shape[0] == 0:
            if n_reserved:
                raise AudioPlaceholderMismatch(
                    f"{n_reserved} positions are reserved for audio but no audio was given"
                )
            return embeds
        audio_embeds, lens = self.encode_audio(audio, audio_lens)
        flat = torch.cat([audio_embeds[i, : int(n)] for i, n in enumerate(lens)])
        if flat.shape[0] != n_reserved:
            raise AudioPlaceholderMismatch(
                f"{n_reserved} positions are reserved for audio but the {audio.shape[0]} audio segment(s) give "
                f"{flat.shape[0]} frames; build inputs with this model's processor so the counts agree"
            )
        return embeds.masked_scatter(audio_mask.unsqueeze(-1), flat.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, audio_mask: torch.Tensor,
                audio: torch.Tensor | None = None, audio_lens: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        """Batch from `ConversationProcessor.collate` -> with `labels`: `.loss`, the mean cross-entropy over label
        (assistant) tokens, logits computed there only (`models.loss`); without: the LM's `.logits` (B, L, V)."""
        embeds = self.embed_inputs(input_ids, audio_mask, audio, audio_lens)
        if labels is None:
            return self.lm(inputs_embeds=embeds, attention_mask=attention_mask)
        return CausalLMOutputWithPast(loss=answer_loss(self._hidden(embeds, attention_mask), labels, *self._head()))

    def answer_nll(self, input_ids, attention_mask, audio_mask, audio=None, audio_lens=None, labels=None):
        """The same batch -> per conversation: summed cross-entropy over its label tokens (B,), their number (B,)."""
        hidden = self._hidden(self.embed_inputs(input_ids, audio_mask, audio, audio_lens), attention_mask)
        return answer_nll_per_row(hidden, labels, *self._head())

    def _hidden(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) embeddings -> the LM's final hidden states (B, L, D), before the output projection. Through
        PEFT too: its wrapper hands these calls to the transformers model, whose layers carry the LoRA weights."""
        decoder = self.lm.get_decoder()
        return decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def _head(self) -> tuple[nn.Module, float | None]:
        return self.lm.get_output_embeddings(), logit_softcap(self.lm.config)

    # -- generation ---------------------------------------------------------------------------------------------
    def stop_token_ids(self) -> list[int]:
        """EOS, the chat template's end-of-turn token (`processor.end_of_turn_ids`), and `config.lm.end_of_turn`
        when a config names one explicitly."""
        return self.processor.stop_token_ids(self.config.lm.end_of_turn)

    @torch.no_grad()
    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, return_ids: bool = False, **generate_kwargs):
        """Answer each conversation (its last turn must be a user turn). Greedy by default; batched with left
        padding. Returns the answer strings (and the generated token ids when `return_ids`)."""
        if self.processor is None:
            raise RuntimeError("this SpeechLM has no tokenizer; build it with one to generate")
        if isinstance(conversations, Conversation):
            raise ConversationError("generate() takes a list of conversations; wrap a single one in a list")
        if not conversations:
            raise ConversationError("generate() got no conversations")
        batch = move_batch(self.processor(conversations, for_generation=True), self.device)
        embeds = self.embed_inputs(batch["input_ids"], batch["audio_mask"], batch["audio"], batch["audio_lens"])
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        out = self.lm.generate(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_token_ids(), pad_token_id=self.processor.pad_id, **sampling, **generate_kwargs,
        )
        stops = set(self.stop_token_ids())
        ids = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            ids.append(row[:cut])
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
        return (texts, ids) if return_ids else texts

    # -- parameters ---------------------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: encoder, adapter, lora (LoRA A/B matrices), lm (LM weights without LoRA)."""
        lora = sum(p.numel() for n, p in self.lm.named_parameters() if "lora_" in n)
        return {
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "adapter": sum(p.numel() for p in self.adapter.parameters()),
            "lora": lora,
            "lm": sum(p.numel() for p in self.lm.parameters()) - lora,
        }

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the weights that train (what a checkpoint must keep)."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in keep}

    # -- save / load --------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a self-contained directory:

        speechlm_config.json, encoder.safetensors + encoder_config.json, adapter.safetensors, tokenizer/,
        lm_adapter/ (PEFT LoRA; loads with `PeftModel.from_pretrained`) when the LM trains with LoRA, and lm/
        (safetensors) when the LM's weights are not a loadable checkpoint (random init) or were fully trained.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config.model_copy(deep=True)
        (out / ENCODER_CONFIG_FILE).write_text(self.encoder.encoder.config.to_json_string())
        save_file(_contiguous(self.encoder.state_dict()), str(out / ENCODER_FILE))
        save_file(_contiguous(self.adapter.state_dict()), str(out / ADAPTER_FILE))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out / TOKENIZER_DIR)
        lora = cfg.lm.mode == "lora"
        if lora:
            self.lm.save_pretrained(out / LORA_DIR)
        if cfg.lm.pretrained is None or cfg.lm.mode == "full":
            base = self.lm.get_base_model() if lora else self.lm
            sd = base.state_dict()
            # PEFT wraps each target linear: keep the frozen base weights under their original names.
            sd = {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}
            base.save_pretrained(out / LM_DIR, state_dict=sd)
            cfg.lm.pretrained = None
        (out / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        if self.tokenizer is not None:  # the folder is also a vLLM model folder (`models.engine_config`)
            write_engine_config(out, self.lm.get_base_model() if lora else self.lm, self.tokenizer,
                                LM_DIR if cfg.lm.pretrained is None else cfg.lm.pretrained)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, trainable: bool = False) -> "SpeechLM":
        """Load a directory written by `save_pretrained`. Only JSON and safetensors are read (no unpickling).
        `trainable=False` (inference) also puts the model in eval mode."""
        src = Path(path)
        if not (src / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{src} is not a saved SpeechLM: {CONFIG_FILE} is missing")
        cfg = SpeechLMConfig.model_validate_json((src / CONFIG_FILE).read_text())
        enc_cfg = json.loads((src / ENCODER_CONFIG_FILE).read_text())
        cfg.encoder.pretrained, cfg.encoder.config = None, strip_hf_config(enc_cfg)
        lm_source = str(src / LM_DIR) if (src / LM_DIR).is_dir() else cfg.lm.pretrained
        tok_dir = src / TOKENIZER_DIR
        tokenizer = AutoTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir() else None
        model = build_speechlm(cfg, device=device, dtype=dtype, tokenizer=tokenizer, lm_source=lm_source,
                               lora_dir=str(src / LORA_DIR) if (src / LORA_DIR).is_dir() else None,
                               lora_trainable=trainable)
        model.encoder.load_state_dict(_to(load_file(str(src / ENCODER_FILE)), device, dtype))
        model.adapter.load_state_dict(_to(load_file(str(src / ADAPTER_FILE)), device, dtype))
        if not trainable:
            model.eval()
        return model


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _to(sd: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in sd.items()}


def strip_hf_config(d: dict) -> dict:
    # Keys transformers writes but does not take back as constructor arguments.
    for k in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "model_type"):
        d.pop(k, None)
    return d


# ----------------------------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------------------------


def _build_encoder(cfg: SpeechLMConfig) -> nn.Module:
    e = cfg.encoder
    source = checkpoint_source(e.pretrained, "encoder.pretrained") if e.pretrained else None
    if e.kind == "fastconformer":
        from transformers import ParakeetEncoder, ParakeetEncoderConfig

        if source:
            return ParakeetEncoder.from_pretrained(source, use_safetensors=True)
        return ParakeetEncoder(ParakeetEncoderConfig(**e.config))
    from transformers import WhisperConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if source:
        return WhisperModel.from_pretrained(source, use_safetensors=True).get_encoder()
    return WhisperEncoder(WhisperConfig(**e.config))


def init_config_built_encoder(encoder: SpeechEncoder) -> None:
    """PyTorch's default init for every linear and convolution of an encoder built from a config (not loaded).

    Why: transformers initialises them with normal(0, initializer_range=0.02) whatever their fan-in, which is
    meant for checkpoints that overwrite it. In FastConformer's subsampling (3x3 convolutions, fan-in 9) that
    shrinks the signal ~50x per layer: the features reach the first Conformer block at std ~1e-6, below its
    biases, and the gradient at init sits almost wholly in those biases. Trained from there, the audio path
    carries length but not content, and CTC pretraining sits on its plateau for a seed-dependent time.
    PyTorch's fan-in-scaled init keeps the subsampled features at std ~5e-2 and distinct per utterance.
    Embeddings (Whisper's sinusoidal positions) and norms keep transformers' init.
    """
    for module in encoder.encoder.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            module.reset_parameters()


def build_speech_encoder(cfg: SpeechLMConfig, init_weights: bool = True) -> SpeechEncoder:
    """The config's encoder (pretrained, or built from its config with `init_config_built_encoder`) with its
    feature frontend. `init_weights=False` leaves a config-built encoder's init to the caller."""
    encoder = SpeechEncoder(cfg.encoder.kind, _build_encoder(cfg), cfg.n_mels, cfg.sampling_rate,
                            cfg.encoder.whisper_window_s)
    if init_weights and not cfg.encoder.pretrained:
        init_config_built_encoder(encoder)
    return encoder


def check_lora_targets(lm: nn.Module, targets: list[str] | str) -> None:
    """Every named LoRA target must name linear layers of `lm` (PEFT only fails when none does)."""
    if isinstance(targets, str):
        return
    names = sorted({name.rsplit(".", 1)[-1] for name, module in lm.named_modules() if isinstance(module, nn.Linear)})
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"lm.lora.target_modules {missing} match no linear layer of this {lm.config.model_type} LM, whose "
            f"linear layers are {names}; \"all-linear\" wraps attention and MLP whatever their names"
        )


def _build_lm(cfg: SpeechLMConfig, source: str | None, tokenizer, read_weights: bool = True) -> nn.Module:
    if source and not read_weights:
        return unread_lm(checkpoint_source(source, "lm.pretrained"))
    if source:
        return AutoModelForCausalLM.from_pretrained(checkpoint_source(source, "lm.pretrained"), use_safetensors=True)
    kw = dict(cfg.lm.config)
    model_type = kw.pop("model_type")
    if tokenizer is not None:
        kw.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            kw.setdefault(name, getattr(tokenizer, name))
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))


def build_adapter(cfg: SpeechLMConfig, encoder_hidden: int, lm_hidden: int) -> ModalityAdapter:
    """The config's modality adapter between an encoder and an LM of these widths (weights uninitialised)."""
    a = cfg.adapter
    return ModalityAdapter(encoder_hidden, lm_hidden, a.hidden_size, a.num_layers, a.num_heads, a.ff_mult,
                           a.conv_kernel_size, a.dropout, a.stack_frames)


def lm_tokenizer(cfg: SpeechLMConfig):
    """The tokenizer `cfg.lm.tokenizer` or `cfg.lm.pretrained` names; None when neither does."""
    source = cfg.lm.tokenizer or cfg.lm.pretrained
    if not source:
        return None
    what = "lm.tokenizer" if cfg.lm.tokenizer else "lm.pretrained"
    return AutoTokenizer.from_pretrained(checkpoint_source(source, what))


def build_speechlm(
    cfg: SpeechLMConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
    lm_source: str | None = None,
    lora_dir: str | None = None,
    lora_trainable: bool = True,
    read_lm_weights: bool = True,
) -> SpeechLM:
    """Build a SpeechLM from its config and set which parameters train.

    `tokenizer`: defaults to `cfg.lm.tokenizer`/`cfg.lm.pretrained`; with neither, pass one (e.g.
    `models.tokenizer.build_tiny_tokenizer()`), or none at all for a model that only computes (parameter counts on
    the meta device). `lm_source` overrides where LM weights load from; `lora_dir` loads a saved LoRA adapter with
    `PeftModel.from_pretrained` instead of creating a fresh one. `read_lm_weights=False`: a pretrained LM's weights
    are allocated but not read (`models.skeleton`), for a caller that loads them itself; the rest is built as
    usual.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    tokenizer = tokenizer if tokenizer is not None else lm_tokenizer(cfg)
    encoder = build_speech_encoder(cfg, init_weights=False)
    lm = _build_lm(cfg, lm_source if lm_source is not None else cfg.lm.pretrained, tokenizer, read_lm_weights)
    if tokenizer is not None and lm.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the LM embeds only "
            f"{lm.get_input_embeddings().num_embeddings}; they do not belong together"
        )
    adapter = build_adapter(cfg, encoder.hidden_size, lm.config.get_text_config().hidden_size)

    if cfg.lm.mode == "lora":
        if lora_dir:
            lm = PeftModel.from_pretrained(lm, lora_dir, is_trainable=lora_trainable)
        else:
            lcfg = cfg.lm.lora
            check_lora_targets(lm, lcfg.target_modules)
            lm = get_peft_model(lm, LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                               target_modules=lcfg.target_modules, task_type="CAUSAL_LM"))
    else:
        lm.requires_grad_(cfg.lm.mode == "full")
    if not cfg.encoder.pretrained:
        # drawn after the LM and adapter, so their init does not depend on the encoder's init scheme
        init_config_built_encoder(encoder)
    encoder.requires_grad_(cfg.encoder.train)
    adapter.requires_grad_(cfg.adapter.train)
    if not read_lm_weights and (lm_source or cfg.lm.pretrained):
        allocate_unwritten(lm, dtype)
    model = SpeechLM(cfg, encoder, adapter, lm, tokenizer)
    # on the meta device only the dtype: a config may carry the checkpoint's (bf16), the model is built in `dtype`
    return model.to(dtype=dtype) if torch.device(device).type == "meta" else model.to(device=device, dtype=dtype)
