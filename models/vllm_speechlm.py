"""The SpeechLM as a vLLM model: the serving engine's view of a directory written by `SpeechLM.save_pretrained`.

vLLM serves it the way it serves Ultravox: an out-of-tree multimodal model registered through vLLM's plugin entry
point (`vllm.general_plugins` in pyproject.toml -> `models.vllm_plugin.register`). The parts:

- weights: the saved directory itself is the vLLM model folder. `config.json` (written beside the SpeechLM's own
  files by `models.engine_config.write_engine_config`) is the LM's config with `architectures` naming this class;
  `encoder.safetensors` is read as the primary weights, `adapter.safetensors` and the LM (`lm/` or the pretrained
  checkpoint the config names) as secondary sources, so nothing is converted or copied.
- the audio tower is the project's own code (`models.speechlm.SpeechEncoder` with its log-mel frontend, and
  `ModalityAdapter`): the same modules the model trained with, so the served audio embeddings are the trained ones.
- the LM is whatever vLLM builds for its architecture (`init_vllm_registered_model`: Gemma, Llama, Qwen, Mistral,
  Phi-3, ...); its LoRA fine-tune (`lm_adapter/`, PEFT format) is a vLLM `LoRARequest`.
- prompts: the caller tokenizes with the model's own `ConversationProcessor` (exactly the training prompt) and
  hands vLLM the token ids with one marker token per audio part (`engine_prompt`); vLLM's processor replaces each
  marker by as many positions as the audio gives (`PromptReplacement`), and `embed_multimodal` fills them.

Legend: N audio parts, S samples, T' adapter frames, D LM width.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.model_loader import DefaultModelLoader
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsMultiModal
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataParser
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement)

from models.conversation import ConversationError
from models.speechlm import ADAPTER_FILE, ENCODER_FILE, LM_DIR

LM_PREFIX = "language_model."
TOWER_KWARG = "speechlm"
ADAPTER_PREFIX = "audio_adapter."


def _speech_config(model_dir: str):
    """The saved SpeechLM's config with its encoder's stored config inline (as `SpeechLM.from_pretrained` reads
    it), so the tower is built from the directory alone."""
    from models.config import SpeechLMConfig
    from models.speechlm import CONFIG_FILE, ENCODER_CONFIG_FILE, strip_hf_config

    src = Path(model_dir)
    cfg = SpeechLMConfig.model_validate_json((src / CONFIG_FILE).read_text())
    cfg.encoder.pretrained = None
    cfg.encoder.config = strip_hf_config(json.loads((src / ENCODER_CONFIG_FILE).read_text()))
    return cfg


def _load_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Every weight of `module` from `state` (strict), in the dtype the module holds it in."""
    own = module.state_dict()
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=True)


def _build_tower(cfg, lm_hidden: int) -> tuple[nn.Module, nn.Module]:
    """The encoder (with its frontend) and the modality adapter, uninitialised: their weights are loaded."""
    from models.speechlm import build_adapter, build_speech_encoder

    # vLLM builds the model under the serving dtype as torch's default: the frontend's computed buffers (window,
    # mel filterbank) must be made in fp32, as in training, and stay so through the dtype move below.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        encoder = build_speech_encoder(cfg, init_weights=False)
        adapter = build_adapter(cfg, encoder.hidden_size, lm_hidden)
    finally:
        torch.set_default_dtype(default)
    return encoder.to(dtype=default).eval(), adapter.to(dtype=default).eval()


class AudioGeometry:
    """How many LM positions an audio of S samples takes: the model's own arithmetic on a weightless tower."""

    def __init__(self, model_dir: str):
        cfg = _speech_config(model_dir)
        with torch.device("meta"):
            self._encoder, self._adapter = _build_tower(cfg, lm_hidden=8)
        self.sampling_rate = cfg.sampling_rate

    def count(self, num_samples: int) -> int:
        return self._adapter.output_length(self._encoder.output_length(num_samples))


def engine_prompt(encoded, audio_token_count, marker_id: int) -> dict[str, Any]:
    """A `ConversationProcessor.encode(..., for_generation=True)` result -> vLLM's prompt: the token ids with each
    audio part's reserved positions (`audio_token_count(samples)` of them) collapsed to one `marker_id` (vLLM's
    processor expands it again to the same count), and the audio in order. A text token equal to the marker would
    be taken for audio where there is audio: refused, naming it."""
    ids: list[int] = []
    i, audio_i = 0, 0
    while i < len(encoded.input_ids):
        if encoded.audio_mask[i]:
            ids.append(marker_id)
            i += audio_token_count(len(encoded.audios[audio_i]))
            audio_i += 1
        else:
            if encoded.input_ids[i] == marker_id and encoded.audios:
                raise ConversationError(f"the text holds token {marker_id}, the one the engine marks audio with "
                                        "(the tokenizer's padding token): remove it")
            ids.append(encoded.input_ids[i])
            i += 1
    prompt: dict[str, Any] = {"prompt_token_ids": ids}
    if encoded.audios:
        prompt["multi_modal_data"] = {"audio": [np.asarray(a, dtype=np.float32) for a in encoded.audios]}
    return prompt


# ----------------------------------------------------------------------------------------------------------------
# vLLM's multimodal processing: raw audio in, one marker expanded to the audio's positions
# ----------------------------------------------------------------------------------------------------------------


class SpeechProcessingInfo(BaseProcessingInfo):
    @cached_property
    def geometry(self) -> AudioGeometry:
        return AudioGeometry(self.ctx.model_config.model)

    @property
    def marker_id(self) -> int:
        return int(self.get_hf_config().vtblender["audio_marker_id"])

    def get_data_parser(self) -> MultiModalDataParser:
        # audio arrives at the model's rate (the service decodes it so); a (array, rate) pair is resampled
        return MultiModalDataParser(target_sr=self.geometry.sampling_rate,
                                    expected_hidden_size=self._get_expected_hidden_size(),
                                    allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # no Hugging Face processor: `speechlm` (below) stays a flat keyword


class SpeechDummyInputs(BaseDummyInputsBuilder[SpeechProcessingInfo]):
    """What vLLM profiles memory with: `PROFILE_AUDIO_S` seconds of silence per audio."""

    PROFILE_AUDIO_S = 30.0

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        marker = self.info.get_tokenizer().convert_ids_to_tokens(self.info.marker_id)
        return marker * mm_counts.get("audio", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options) -> dict:
        length = int(self.PROFILE_AUDIO_S * self.info.geometry.sampling_rate)
        return {"audio": self._get_dummy_audios(length=length, num_audios=mm_counts.get("audio", 0),
                                                overrides=(mm_options or {}).get("audio"))}


class SpeechMultiModalProcessor(BaseMultiModalProcessor[SpeechProcessingInfo]):
    """No Hugging Face processor: the waveform itself is the model input (the log-mel frontend runs in the model,
    on the engine's device, as in training)."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Each audio with the folder of the fine-tune whose audio tower hears it (`mm_processor_kwargs`
        `{"speechlm": folder}`; none: the engine's own), as bytes: a field must be a tensor."""
        audio = hf_data.get("audio", [])
        tower = torch.tensor(list(str(hf_kwargs.get(TOWER_KWARG) or "").encode()), dtype=torch.uint8)
        return BatchFeature({"audio": [torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in audio],
                             TOWER_KWARG: [tower.clone() for _ in audio]})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return {"audio": MultiModalFieldConfig.batched("audio"),
                TOWER_KWARG: MultiModalFieldConfig.batched("audio", keep_on_cpu=True)}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:
        marker, geometry = self.info.marker_id, self.info.geometry
        # from the processed items, not `mm_items`: an item found in vLLM's processor cache comes without its data
        audio = out_mm_kwargs.get_data().get("audio", [])

        def positions(item_idx: int) -> list[int]:
            return [marker] * geometry.count(int(audio[item_idx].shape[-1]))

        return [PromptReplacement(modality="audio", target=[marker], replacement=positions)]


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(SpeechMultiModalProcessor, info=SpeechProcessingInfo,
                                        dummy_inputs=SpeechDummyInputs)
class VTBlenderSpeechLM(nn.Module, SupportsMultiModal, SupportsLoRA):
    """audio (N, S) -> SpeechEncoder -> ModalityAdapter -> embeddings at the marker positions -> vLLM's LM."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    # PEFT saved the LoRA on the bare LM (`model.layers...`); here the LM sits under `language_model.`
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"model.": LM_PREFIX + "model.",
                                                          "lm_head.": LM_PREFIX + "lm_head."})

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return None  # prompts come as token ids with the marker already placed (`engine_prompt`)
        raise ValueError("only audio is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        model_dir = vllm_config.model_config.model
        meta = config.vtblender
        self.config = config
        self.configure_mm_token_handling(config.get_text_config().vocab_size, [int(meta["audio_marker_id"])])
        with self._mark_tower_model(vllm_config, "audio"):
            self.audio_encoder, self.audio_adapter = _build_tower(
                _speech_config(model_dir), config.get_text_config().hidden_size)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config, architectures=list(meta["lm_architectures"]),
                prefix=maybe_prefix(prefix, "language_model"))
        # encoder.safetensors is the folder's primary weights; the adapter and the LM are read from where they are
        self.allow_patterns_overrides = [ENCODER_FILE]
        self.secondary_weights = [
            DefaultModelLoader.Source(model_dir, None, prefix=ADAPTER_PREFIX, allow_patterns_overrides=[ADAPTER_FILE]),
            DefaultModelLoader.Source(str(Path(model_dir) / LM_DIR) if meta["lm_source"] == LM_DIR
                                      else meta["lm_source"], None, prefix=LM_PREFIX),
        ]
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        self._own_folder = model_dir
        self._towers: dict[str, tuple[nn.Module, nn.Module]] = {}

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(language_model=LM_PREFIX, connector=ADAPTER_PREFIX,
                                                tower_model="audio_encoder.")

    def embed_multimodal(self, **kwargs: object):
        """audio: N waveforms (a list, or a (N, S) tensor of equal lengths), each heard by the audio tower of the
        fine-tune it was sent to (`speechlm`: its folder as bytes; empty: this engine's own) -> N tensors (T'_i, D)."""
        audio = kwargs.get("audio")
        if audio is None:
            return []
        waves = list(audio) if isinstance(audio, (list, tuple)) else list(audio.unbind(0))
        folders = kwargs.get(TOWER_KWARG)
        folders = [bytes(f.tolist()).decode() for f in folders] if folders is not None else [""] * len(waves)
        out: list[torch.Tensor | None] = [None] * len(waves)
        for folder in dict.fromkeys(folders):
            idx = [i for i, f in enumerate(folders) if f == folder]
            for i, e in zip(idx, self._hear(self._tower(folder), [waves[i] for i in idx])):
                out[i] = e
        return tuple(out)

    def _hear(self, tower: tuple[nn.Module, nn.Module], waves: list[torch.Tensor]) -> list[torch.Tensor]:
        encoder, adapter = tower
        lens = torch.tensor([w.shape[-1] for w in waves], dtype=torch.long)
        batch = nn.utils.rnn.pad_sequence([w.reshape(-1).float() for w in waves], batch_first=True)
        hidden, frames = encoder(batch.to(next(adapter.parameters()).device), lens)
        embeds, counts = adapter(hidden, frames)
        return [embeds[i, : int(n)] for i, n in enumerate(counts.tolist())]

    def _tower(self, folder: str) -> tuple[nn.Module, nn.Module]:
        """The encoder and adapter of the fine-tune saved in `folder`, read from its files the first time one of
        its audios comes (fine-tunes of one base LM share this engine; each brings its own tower, as the method
        fine-tunes encoder and adapter)."""
        if not folder or Path(folder).resolve() == Path(self._own_folder).resolve():
            return self.audio_encoder, self.audio_adapter
        if folder not in self._towers:
            from safetensors.torch import load_file

            param = next(self.audio_adapter.parameters())
            with torch.device(param.device):
                encoder, adapter = _build_tower(_speech_config(folder), self.config.get_text_config().hidden_size)
            for module, name in ((encoder, ENCODER_FILE), (adapter, ADAPTER_FILE)):
                _load_state(module, load_file(str(Path(folder) / name)))
            self._towers[folder] = (encoder.to(param.device), adapter.to(param.device))
        return self._towers[folder]

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """One stream: the encoder's file (no prefix), the adapter's (`audio_adapter.`), then the LM's
        (`language_model.`, through vLLM's own loader for its architecture)."""
        encoder, adapter = {}, {}

        def lm_weights():
            for name, tensor in weights:
                if name.startswith(LM_PREFIX):
                    yield name[len(LM_PREFIX):], tensor
                elif name.startswith(ADAPTER_PREFIX):
                    adapter[name[len(ADAPTER_PREFIX):]] = tensor
                else:
                    encoder[name] = tensor

        loaded = {LM_PREFIX + n for n in self.language_model.load_weights(lm_weights())}
        for module, state, at in ((self.audio_encoder, encoder, "audio_encoder."),
                                  (self.audio_adapter, adapter, ADAPTER_PREFIX)):
            _load_state(module, state)
            loaded |= {at + k for k in state}
        return loaded
