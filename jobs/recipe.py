"""The training recipe: one YAML file, validated in full before any worker starts.

    run:   name, experiment, storage_path, tracking_uri, registered_model, alias, seed
    model: size (tiny | mini | vtblender_3b) + lm_mode / encoder_train / adapter_train / lora / pretrained paths,
           or `config:` a whole SpeechLMConfig
    data:  per data type: uris (corpora written by jobs.data), ratio, batch_size, and optional budgets
           max_batch_audio_s / max_batch_tokens (batches filled up to a padded budget, batch_size their most rows);
           bucket_batches; endpoint_url; max_sample_audio_s, max_sample_tokens (samples over a cap are skipped and
           counted)
    train: max_steps, grad_accum, optimizer (Adam, lr and per-module encoder_lr / adapter_lr / lm_lr,
           weight_decay, betas), warmup_steps, schedule, clipping (global or per module), precision,
           activation_checkpointing,
           strategy (ddp | fsdp), fsdp_shard_size, num_workers, use_gpu, checkpoint_every, final_checkpoint,
           max_failures, log_every, content_check_every
    stages: optional list of stages run one after another (two-stage training, ablation B3): each names its
           steps and what it changes (lm_mode, ratios); a stage starts from the previous stage's weights
    promote: the promotion gate after the last step (content gap, text retention against the starting LM):
           the registry alias is set only when every gate passes

`load_recipe(path)` returns a `Recipe` or raises `RecipeError` with one message listing every problem. This file is
the schema only: what a run derives from a recipe (each stage's model config, ratios, lrs, the fingerprint) is
resolved once by `jobs.training.plan`, and the checks that read checkpoints or storage are in
`jobs.training.preflight`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data_ops.schema import DATA_TYPES
from jobs.config_files import ConfigError, load_config, parse_config
from models.config import NAMED_SIZES, LoraSettings, SpeechLMConfig, StrictModel


class RecipeError(ConfigError):
    pass


class RunSection(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name: the Ray Train run (checkpoints under storage_path/name) and the MLflow run; resubmitting a
    job with the same name resumes it."""
    experiment: str = "vtblender"
    storage_path: str = "~/vtb_runs"
    """Local folder or s3://bucket/prefix for checkpoints (multi-node clusters need shared or object storage)."""
    tracking_uri: str | None = None
    """MLflow server URL; default: $MLFLOW_TRACKING_URI. Must be absolute (workers change their cwd)."""
    registered_model: str | None = None
    """Register the final model under this name (with `alias`); None: log artifacts only."""
    alias: str = "candidate"
    seed: int = 0


class ModelSection(StrictModel):
    size: Literal["tiny", "mini", "vtblender_3b"] | None = "tiny"
    config: dict[str, Any] | None = None
    """A whole SpeechLMConfig instead of a named size."""
    lm_mode: Literal["lora", "frozen", "full"] | None = None
    encoder_train: bool | None = None
    adapter_train: bool | None = None
    lora: LoraSettings | None = None
    encoder_pretrained: str | None = None
    lm_pretrained: str | None = None
    tokenizer_vocab_size: int = Field(512, ge=300)
    """Vocabulary of the offline byte-level BPE built from the corpora when the LM names no tokenizer (random-init
    LMs: tiny, mini); ignored when the LM has its own."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        if (self.size is None) == (self.config is None):
            raise ValueError("model: give exactly one of `size` (tiny, mini, vtblender_3b) or `config`")
        return self

    def speechlm_config(self, lm_mode: str | None = None) -> SpeechLMConfig:
        if self.config is not None:
            cfg = SpeechLMConfig.model_validate(self.config)
        elif self.size == "vtblender_3b":
            cfg = NAMED_SIZES["vtblender_3b"](self.encoder_pretrained, self.lm_pretrained)
        else:
            cfg = NAMED_SIZES[self.size]()
        # checkpoints replace the size's random init (the ablation's speech recipes start from its text LM)
        if self.lm_pretrained:
            cfg.lm.pretrained = self.lm_pretrained
        if self.encoder_pretrained:
            cfg.encoder.pretrained = self.encoder_pretrained
        mode = lm_mode or self.lm_mode
        if mode:
            cfg.lm.mode = mode
        if self.encoder_train is not None:
            cfg.encoder.train = self.encoder_train
        if self.adapter_train is not None:
            cfg.adapter.train = self.adapter_train
        if self.lora is not None:
            cfg.lm.lora = self.lora
        return cfg


class TypeSource(StrictModel):
    uris: list[str] = Field(min_length=1)
    """Corpora (folders or s3:// prefixes written by jobs.data) holding this type's shards."""
    ratio: float = Field(ge=0.0, le=1.0)
    batch_size: int = Field(ge=1)
    """Rows per batch; with a budget below, the most rows a batch may have."""
    max_batch_audio_s: float | None = Field(None, gt=0)
    """Budget batches: fill each batch up to this many seconds of *padded* audio (rows x the batch's longest clip),
    from buckets of alike duration and text length (`data_ops.mix_sampler`), so short clips travel in larger batches
    and no batch holds more audio than this. A sample longer than the budget on its own is skipped and counted
    (`data/skipped/<type>/max_batch_audio_s`). None: batches of `batch_size` rows, grouped by duration."""
    max_batch_tokens: int | None = Field(None, ge=1)
    """Budget batches in LM positions: rows x the batch's longest sample (chat-templated text tokens + audio
    positions, counted with the model's processor) at most this; otherwise as `max_batch_audio_s`. None: no token
    budget."""


class DataSection(StrictModel):
    sources: dict[str, TypeSource]
    bucket_batches: int = Field(8, ge=1)
    """Duration grouping: rows of this many batches are sorted by duration and cut into batches."""
    endpoint_url: str | None = None
    """S3 endpoint for the corpora; default $AWS_ENDPOINT_URL."""
    max_sample_audio_s: float | None = Field(None, gt=0)
    """Skip samples with more audio than this (seconds, all of a sample's audio); None: no cap. Skipped as the
    streams read them, before batching, and counted per type in the log and as `data/skipped/...` metrics."""
    max_sample_tokens: int | None = Field(None, ge=1)
    """Skip samples longer than this many LM positions (chat-templated text tokens + audio positions, counted with
    the model's processor); None: no cap."""

    @model_validator(mode="after")
    def _types_and_ratios(self) -> "DataSection":
        unknown = set(self.sources) - set(DATA_TYPES)
        if unknown:
            raise ValueError(f"data.sources: unknown data type(s) {sorted(unknown)}; use {list(DATA_TYPES)}")
        if self.sources.get("text") and self.sources["text"].max_batch_audio_s is not None:
            raise ValueError("data.sources.text: max_batch_audio_s is a budget of audio seconds and text has none; "
                             "use max_batch_tokens")
        total = sum(s.ratio for s in self.sources.values())
        if abs(total - 1.0) > 1e-6:
            ratios = {k: s.ratio for k, s in self.sources.items()}
            raise ValueError(f"data.sources: ratios must sum to 1, they sum to {total:.6f} ({ratios})")
        return self

    @property
    def ratios(self) -> dict[str, float]:
        return {k: s.ratio for k, s in self.sources.items()}


class TrainSection(StrictModel):
    max_steps: int = Field(ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(2500, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = 1.0
    encoder_lr: float | None = Field(None, gt=0)
    """Peak lr of the speech encoder; None: `lr` (the paper trains every module at one lr)."""
    adapter_lr: float | None = Field(None, gt=0)
    """Peak lr of the modality adapter; None: `lr`."""
    lm_lr: float | None = Field(None, gt=0)
    """Peak lr of the LM's trainable weights (LoRA, or all in `full` mode); None: `lr`."""
    clip: Literal["global", "per_module"] = "global"
    """global: one gradient norm over every trainable weight, clipped to `max_grad_norm` (the paper, as NeMo's
    gradient_clip_val). per_module: the encoder's, the adapter's and the LM's gradients each clipped to
    `max_grad_norm` on their own, so a burst in one module does not shrink the other modules' steps."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16: bf16 autocast over fp32 weights (refused on a GPU without native bf16, e.g. V100, T4, naming it);
    auto: bf16 on GPUs that compute it natively, fp32 elsewhere (CPU, V100, T4); fp32: no autocast."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    fsdp_shard_size: int | None = Field(None, ge=1)
    """FSDP only: shard over groups of this many consecutive ranks and replicate across the groups (hybrid
    sharding, HSDP); None: shard over every rank. Ray Train numbers a node's workers consecutively, so the number
    of GPUs per node keeps the all-gathers of every layer inside a node and sends only gradient all-reduces across
    nodes."""
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each worker needs besides CPU/GPU (e.g. {"a100": 1} to pick a node type, or one slot
    per node to spread workers over nodes)."""
    peak_tflops: float | None = Field(None, gt=0)
    """Peak dense bf16 TFLOPS of one device, for `perf/mfu`; None: looked up from the GPU's name
    (`jobs.training.flops.PEAK_BF16_TFLOPS`), none on CPU."""
    checkpoint_every: int = Field(1000, ge=1)
    final_checkpoint: bool = True
    """Also checkpoint at the last step (what a resubmission resumes from, and a next stage starts from). False for
    a run whose end state nobody resumes, a speed check (`bench.gpu_check`): the paper's model writes ~8 GB there
    (weights and Adam state) to `run.storage_path`. The trained model is logged to MLflow either way."""
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=0)
    log_every: int = Field(10, ge=1)
    activation_checkpointing: bool = False
    """Recompute each layer (LM, encoder, adapter) in the backward instead of keeping its activations: much less
    memory for about one more forward of compute (`models.activation_checkpointing`). Loss and gradients are
    unchanged, so a run may resume with it switched on or off."""
    content_check_every: int | None = Field(None, ge=1)
    """Every this many steps, measure whether the audio path carries content (`models.content_check`: loss on
    the right audio vs. on another utterance of the same length, and time-reversed) and log `speech/content_gap`;
    None: at every checkpoint. Needs asr_ast data; skipped otherwise."""

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        clash = sorted(set(v) & {"CPU", "GPU", "memory", "object_store_memory"})
        if clash:
            raise ValueError(f"{clash} are set by cpus_per_worker / use_gpu, not resources_per_worker")
        if any(x <= 0 for x in v.values()):
            raise ValueError("every amount in resources_per_worker must be > 0")
        return v

    @model_validator(mode="after")
    def _shard_groups(self) -> "TrainSection":
        n = self.fsdp_shard_size
        if n is not None and self.strategy != "fsdp":
            raise ValueError(f"fsdp_shard_size={n} needs strategy: fsdp (it is {self.strategy})")
        if n is not None and self.num_workers % n:
            raise ValueError(f"fsdp_shard_size={n} must divide num_workers={self.num_workers} into whole groups")
        return self

    def module_lrs(self) -> dict[str, float]:
        """Peak lr per module (encoder, adapter, lm)."""
        return {"encoder": self.encoder_lr or self.lr, "adapter": self.adapter_lr or self.lr,
                "lm": self.lm_lr or self.lr}


class PromoteSection(StrictModel):
    """The promotion gate (`jobs/training/promotion.py`): after the last step the registered version gets
    `run.alias` only when the audio path carries content and the LM kept its text skills; otherwise it is
    registered without the alias and tagged with the failed gate. Off by default for text-only recipes, where
    neither measure means anything."""

    enabled: bool | None = None
    """None: on when a stage samples a speech type."""
    eval_uris: list[str] | None = None
    """Corpora (written by jobs.data) to measure on: their first asr_ast cuts (content gap) and text cuts
    (retention). Use held-out data, e.g. a `jobs.data demo --split eval` corpus; None: the recipe's own corpora
    (samples the run trained on; the tags say so)."""
    min_content_gap: float = 0.3
    """Nats per answer token the right audio must save over another utterance of the same length
    (`models.content_check`): a model that reads its audio is well above 0.3, one that ignores it within 0.1 of
    zero."""
    max_text_loss_increase: float = Field(0.15, ge=0)
    """How much the answer loss on text-only conversations may rise against the LM the run started from, as a
    fraction (0.15: at most 15% above it). Skipped when that LM is a random init (nothing to retain)."""
    speech_samples: int = Field(32, ge=2)
    text_samples: int = Field(64, ge=1)


class StageSection(StrictModel):
    name: str
    max_steps: int = Field(ge=1)
    lm_mode: Literal["lora", "frozen", "full"] | None = None
    ratios: dict[str, float] | None = None
    lr: float | None = Field(None, gt=0)
    """Peak lr of every module in this stage (instead of train.lr and the per-module lrs): a text-only stage that
    trains a whole LM wants another lr than LoRA and a fresh adapter do."""
    batch_sizes: dict[str, int] | None = None
    """Per-type batch sizes of this stage (instead of data.sources.<type>.batch_size)."""

    def module_lrs(self, train: "TrainSection") -> dict[str, float]:
        return {k: self.lr for k in train.module_lrs()} if self.lr else train.module_lrs()


class Recipe(StrictModel):
    run: RunSection
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    train: TrainSection
    stages: list[StageSection] | None = None
    promote: PromoteSection = Field(default_factory=PromoteSection)

    @model_validator(mode="after")
    def _gate_needs_speech(self) -> "Recipe":
        if self.promote.enabled and self.first_speech_stage() is None:
            raise ValueError("promote.enabled: true, but no stage samples a speech type: the gate measures the audio "
                             "path and the text kept since the first speech stage; leave it unset (off) for text-only "
                             "recipes")
        return self

    @model_validator(mode="after")
    def _final_checkpoint(self) -> "Recipe":
        if not self.train.final_checkpoint and len(self.stage_list()) > 1:
            raise ValueError("train.final_checkpoint: false, but the recipe has stages: each stage starts from the "
                             "previous stage's last checkpoint; leave it true")
        return self

    @model_validator(mode="after")
    def _stages(self) -> "Recipe":
        for st in self.stages or []:
            if st.ratios is not None:
                unknown = set(st.ratios) - set(self.data.sources)
                if unknown:
                    raise ValueError(f"stage {st.name}: ratios for types without sources {sorted(unknown)}")
                if abs(sum(st.ratios.values()) - 1.0) > 1e-6:
                    total = sum(st.ratios.values())
                    raise ValueError(f"stage {st.name}: ratios must sum to 1, they sum to {total:.6f}")
            unknown = set(st.batch_sizes or {}) - set(self.data.sources)
            if unknown or any(b < 1 for b in (st.batch_sizes or {}).values()):
                raise ValueError(f"stage {st.name}: batch_sizes must be >= 1 and name types with sources "
                                 f"{sorted(self.data.sources)}, got {st.batch_sizes}")
        return self

    def stage_list(self) -> list[StageSection]:
        """The stages to run; a recipe without `stages` is one stage of `train.max_steps`."""
        return self.stages or [StageSection(name="main", max_steps=self.train.max_steps)]

    def first_speech_stage(self) -> int | None:
        """Index of the first stage that samples a speech type (None: a text-only recipe)."""
        for i, stage in enumerate(self.stage_list()):
            if any(r > 0 for t, r in (stage.ratios or self.data.ratios).items() if t != "text"):
                return i
        return None

    def training_fingerprint(self) -> str:
        """What the weights of a checkpoint depend on: model, data, train, stages and seed. Not where the run is
        stored or tracked, nor the storage endpoint: a resubmission elsewhere continues the same training; nor
        the promotion gate, which reads the weights and makes none; nor activation checkpointing, which changes
        memory, not weights (a run out of memory resumes with it on); nor whether the last step checkpoints."""
        raw = self.model_dump(mode="json", exclude={"run": True, "promote": True, "data": {"endpoint_url"},
                                                    "train": {"activation_checkpointing", "final_checkpoint"}})
        # settings added since runs were first fingerprinted count only when set: a run checkpointed before they
        # existed resumes under the new code
        for section, keys in ((raw["data"], ("max_sample_audio_s", "max_sample_tokens")),
                              (raw["train"], ("fsdp_shard_size",)),
                              *((src, ("max_batch_audio_s", "max_batch_tokens"))
                                for src in raw["data"]["sources"].values()),
                              *((st, ("lr", "batch_sizes")) for st in raw.get("stages") or [])):
            for key in keys:
                if section.get(key) is None:
                    section.pop(key, None)
        raw["seed"] = self.run.seed
        return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def parse_recipe(obj: Any, where: str = "recipe") -> Recipe:
    return parse_config(obj, Recipe, where, "recipe", RecipeError)


def load_recipe(path: str | Path) -> Recipe:
    return load_config(path, Recipe, "recipe", RecipeError)
