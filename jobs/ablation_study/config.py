"""The ablation's config (`jobs/ablations/*.yaml` -> `AblationConfig`, every recipe it names checked when it
loads) and how a shipped recipe is adapted to one run of it (`adapt_recipe`: corpus, seed, steps, text LM and
encoder; nothing else). Not for running anything: the pipeline is `pipeline.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from jobs import config_files
from jobs.recipe import Recipe, RecipeError, load_recipe, parse_recipe
from models.config import StrictModel


REPO = Path(__file__).resolve().parents[2]


def in_repo(path: str | Path) -> Path:
    """A config's relative paths are relative to the repository (the job's working directory may be elsewhere)."""
    return REPO / path if not Path(path).is_absolute() else Path(path)


class AblationConfig(StrictModel):
    @model_validator(mode="after")
    def _roles_name_recipes(self) -> "AblationConfig":
        unknown = {role: label for role, label in self.roles.items() if label not in self.recipes}
        if unknown:  # a renamed recipe key must not turn its checks into "not measured" unnoticed
            raise ValueError(f"roles {unknown} name no recipe; the recipes are {list(self.recipes)}")
        if "text-lm" in self.recipes:  # its row, model and run name would be the text LM's: listed twice, replaced
            raise ValueError("recipe label 'text-lm' is the text LM's row (the `text_lm` recipe); rename the recipe")
        return self

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    experiment: str
    corpus_size: str = "ablation"
    eval_corpus_size: str = "ablation-eval"
    eval_corpus_seed: int = 1000
    """One evaluation corpus for every seed, so runs with different seeds are scored on the same samples."""
    text_lm: str
    """The text-only recipe (jobs/recipes/mini/text_lm.yaml)."""
    text_lm_steps: int | None = Field(None, ge=1)
    encoder_steps: int = Field(800, ge=1)
    """CTC pretraining steps of the encoder (batch 16)."""
    encoder_lr: float = Field(1e-3, gt=0)
    """Peak lr of the CTC pretraining (docs/ablation.md has how it and the seed decide when CTC leaves its
    plateau)."""
    speech_steps: int = Field(ge=1)
    """Steps of every speech recipe (a multi-stage recipe's stages are scaled to sum to this)."""
    recipes: dict[str, str] = Field(min_length=1)
    """Label -> recipe YAML; table rows in this order after the text LM."""
    roles: dict[Literal["joint", "speech_only", "frozen_lm"], str] = Field(default_factory=dict)
    """Which recipe label plays which part in the paper's checks (`check_claims`): joint SFT, speech-only SFT (B1),
    the frozen LM (B2). A check whose role is not given is reported as not run by this config."""
    suite: str
    metrics: list[str] = Field(min_length=1)
    """Table columns (metric names under eval/<suite>/)."""


def load_config(path: str | Path) -> AblationConfig:
    cfg = config_files.load_config(path, AblationConfig, "ablation config", RecipeError)
    for recipe in [cfg.text_lm, *cfg.recipes.values()]:
        load_recipe(in_repo(recipe))  # every recipe valid up front
    return cfg


def adapt_recipe(path: str, *, run_name: str, experiment: str, seed: int, corpus: str, runs_dir: str,
                 tracking_uri: str, steps: int | None, lm_pretrained: str | None = None,
                 encoder_pretrained: str | None = None) -> Recipe:
    """The recipe as the ablation runs it: its corpus, seed, step count, text LM and encoder; nothing else."""
    raw = load_recipe(in_repo(path)).model_dump(mode="json")
    raw["run"].update(name=run_name, experiment=experiment, seed=seed, storage_path=runs_dir,
                      tracking_uri=tracking_uri)
    for src in raw["data"]["sources"].values():
        src["uris"] = [corpus]
    if lm_pretrained:
        raw["model"]["lm_pretrained"] = lm_pretrained
    if encoder_pretrained:
        raw["model"]["encoder_pretrained"] = encoder_pretrained
    if steps:
        stages = raw.get("stages") or []
        total = sum(st["max_steps"] for st in stages) if stages else raw["train"]["max_steps"]
        raw["train"]["max_steps"] = steps
        done = 0
        for i, st in enumerate(stages):  # keep the stages' proportions (B3: 87% frozen LM, 13% LoRA)
            st["max_steps"] = steps - done if i == len(stages) - 1 else max(1, round(st["max_steps"] * steps / total))
            done += st["max_steps"]
        raw["train"]["checkpoint_every"] = min(raw["train"]["checkpoint_every"], steps)
    return parse_recipe(raw, path)
