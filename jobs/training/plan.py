"""The recipe resolved once, by the driver, into what every later step reads: a `RunPlan` of `StagePlan`s.

`jobs/recipe.py` is the schema (what a user may write, validated); this is what the run does with it, derived in
one place and sent to the workers as typed data: each stage's model config (the recipe's model with the stage's LM
mode), its data-type ratios and batch sizes, its learning rates per module, its step range and Ray Train run folder;
the run's fingerprint (what its checkpoints' weights depend on), the first stage that samples speech, whether the
promotion gate runs, the local paths every worker reads, and (after the data check, `jobs.training.preflight`) the
corpora's manifests. Nothing below the driver derives these again: the workers, the promotion gate's task and the
memory plan read them from here.

Paths are made absolute first (workers run in other working directories), and the fingerprint is taken of the
recipe with absolute paths, as a run's checkpoints have always been tagged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from data_ops.shards import CorpusManifest
from jobs.recipe import DataSection, PromoteSection, Recipe, RunSection, TrainSection
from models.config import SpeechLMConfig


@dataclass(frozen=True)
class StagePlan:
    """One stage as it trains: a `TorchTrainer` of `max_steps` steps whose workers read only this and the run's
    settings."""

    name: str
    max_steps: int
    step_offset: int
    """Steps of the stages before this one: every stage logs on one step axis."""
    final: bool
    """The last stage: it logs the trained model."""
    model: SpeechLMConfig
    ratios: dict[str, float]
    batch_sizes: dict[str, int]
    lr: float
    """The optimizer's default lr (the stage's, else `train.lr`)."""
    module_lrs: dict[str, float]
    """Peak lr per module (encoder, adapter, lm)."""
    run_folder: str
    """Ray Train's run folder under `run.storage_path`: the run name, plus the stage's in a staged recipe."""
    metric_prefix: str
    """Before every metric name: "" for a one-stage recipe, else "<stage>/"."""

    @property
    def sampled_types(self) -> list[str]:
        return [t for t, r in self.ratios.items() if r > 0]


@dataclass(frozen=True)
class RunPlan:
    recipe: Recipe
    """The recipe with absolute paths: what MLflow records (params, `recipe.yaml`) and where the settings below are
    read from."""
    fingerprint: str
    stages: tuple[StagePlan, ...]
    first_speech_stage: int | None
    gate: bool
    """Whether the promotion gate measures the model (`promote.enabled`, else: a stage samples speech)."""
    offline_tokenizer: bool
    """The LM names no tokenizer (a random-init LM): the driver builds one from the corpora's text."""
    local_paths: tuple[str, ...]
    """Local files and folders every worker reads (corpora, checkpoints named by a path)."""
    manifests: dict[str, CorpusManifest] = field(default_factory=dict)
    """Each corpus's manifest by URI, read once by the data check."""

    # the recipe's settings, as written (nothing to derive)
    @property
    def run(self) -> RunSection:
        return self.recipe.run

    @property
    def data(self) -> DataSection:
        return self.recipe.data

    @property
    def train(self) -> TrainSection:
        return self.recipe.train

    @property
    def promote(self) -> PromoteSection:
        return self.recipe.promote

    @property
    def model(self) -> SpeechLMConfig:
        """The first stage's model config: what every stage shares (checkpoints, tokenizer, architecture)."""
        return self.stages[0].model

    @property
    def corpus_uris(self) -> list[str]:
        return sorted({u for src in self.data.sources.values() for u in src.uris})

    def distinct_models(self) -> list[tuple[SpeechLMConfig, list[str]]]:
        """Each distinct model config the stages train, with the names of the stages that train it (a staged recipe
        changes the LM mode; stages that share a config share its checks and its memory plan)."""
        out: dict[str, tuple[SpeechLMConfig, list[str]]] = {}
        for stage in self.stages:
            out.setdefault(stage.model.model_dump_json(), (stage.model, []))[1].append(stage.name)
        return list(out.values())

    def with_manifests(self, manifests: dict[str, CorpusManifest]) -> "RunPlan":
        return dataclasses.replace(self, manifests=dict(manifests))


def absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def absolute_paths(recipe: Recipe) -> Recipe:
    """Local corpus, storage and checkpoint paths made absolute (workers run in other directories); hub ids and
    object storage URIs stay as they are."""
    model = recipe.model
    updates = {k: absolute(v) for k in ("lm_pretrained", "encoder_pretrained")
               if (v := getattr(model, k)) and Path(v).expanduser().exists()}
    sources = {t: src.model_copy(update={"uris": [absolute(u) for u in src.uris]})
               for t, src in recipe.data.sources.items()}
    promote = recipe.promote
    if promote.eval_uris:
        promote = promote.model_copy(update={"eval_uris": [absolute(u) for u in promote.eval_uris]})
    return recipe.model_copy(update={
        "run": recipe.run.model_copy(update={"storage_path": absolute(recipe.run.storage_path)}),
        "model": model.model_copy(update=updates),
        "data": recipe.data.model_copy(update={"sources": sources}),
        "promote": promote})


def resolve(recipe: Recipe) -> RunPlan:
    """The run's plan: the one place a recipe's model config, ratios, batch sizes, lrs and fingerprint are derived
    (each model config once per stage)."""
    recipe = absolute_paths(recipe)
    tr, stages, offset, out = recipe.train, recipe.stage_list(), 0, []
    for i, stage in enumerate(stages):
        out.append(StagePlan(
            name=stage.name, max_steps=stage.max_steps, step_offset=offset, final=i == len(stages) - 1,
            model=recipe.model.speechlm_config(stage.lm_mode),
            ratios=dict(stage.ratios or recipe.data.ratios),
            batch_sizes={t: (stage.batch_sizes or {}).get(t, src.batch_size) for t, src in recipe.data.sources.items()},
            lr=stage.lr or tr.lr, module_lrs=stage.module_lrs(tr),
            run_folder=recipe.run.name if len(stages) == 1 else f"{recipe.run.name}-{stage.name}",
            metric_prefix="" if len(stages) == 1 else f"{stage.name}/"))
        offset += stage.max_steps
    first_speech = next((i for i, s in enumerate(out) if any(r > 0 for t, r in s.ratios.items() if t != "text")),
                        None)
    cfg = out[0].model
    local = [u for src in recipe.data.sources.values() for u in src.uris if "://" not in u]
    local += [u for u in recipe.promote.eval_uris or [] if "://" not in u]
    local += [p for p in (cfg.lm.pretrained, cfg.lm.tokenizer, cfg.encoder.pretrained) if p and Path(p).exists()]
    return RunPlan(
        recipe=recipe, fingerprint=recipe.training_fingerprint(), stages=tuple(out), first_speech_stage=first_speech,
        gate=recipe.promote.enabled if recipe.promote.enabled is not None else first_speech is not None,
        offline_tokenizer=not (cfg.lm.tokenizer or cfg.lm.pretrained), local_paths=tuple(sorted(set(local))))
