"""An evaluation suite: which shards, which rows, which metric per task, an optional LLM judge (YAML,
`jobs/suites/*.yaml`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from jobs.config_files import load_config
from models.config import StrictModel


class EvalTask(StrictModel):
    name: str
    kind: Literal["asr", "ast", "sqa", "spoken_instruction", "text"]
    data_type: Literal["text", "asr_ast", "sqa", "mixed_modal"]
    task: str | None = None
    """Keep rows whose cut task is this (e.g. asr, ast, spoken_instruction); None keeps all of the data type."""
    uris: list[str] | None = None
    """Corpora for this task; default: the suite's `uris`."""
    limit: int | None = Field(None, ge=1)
    prompt: Literal["as_given", "transcribe"] = "as_given"
    """`transcribe`: instead of the row's own request, ask for a transcript of the audio its last user turn holds
    (the training ASR instruction, in the row's first language) and score it against what the audio says (its
    transcript), as ASR. On spoken instructions this tells "did not hear it" from "heard it, did not do it"."""


class JudgeConfig(StrictModel):
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"


class Suite(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    uris: list[str] = Field(default_factory=list)
    tasks: list[EvalTask] = Field(min_length=1)
    judge: JudgeConfig | None = None
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(8, ge=1)
    endpoint_url: str | None = None
    content_check: int = Field(32, ge=0)
    """Measure whether the model's audio path carries content (`models.content_check`) on this many ASR/AST
    conversations of the suite's corpora: `eval/<suite>/speech/content_gap`. 0 skips it."""

    @field_validator("tasks")
    @classmethod
    def _names_unique(cls, tasks: list[EvalTask]) -> list[EvalTask]:
        names = [t.name for t in tasks]
        if len(set(names)) < len(names):  # metrics and samples are keyed by task name
            raise ValueError(f"task names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
        # checked here, not in a validator of EvalTask: Ray pickles the suite by value when jobs.evaluate runs as
        # __main__, and pydantic cannot rebuild a nested model's after-validator there
        for t in tasks:
            if t.prompt == "transcribe" and t.kind != "asr":
                raise ValueError(f"task {t.name!r}: prompt transcribe is scored as ASR; give it kind asr")
        return tasks


def load_suite(path: str | Path) -> Suite:
    """The suite at `path`; a `ConfigError` naming the file and each bad key otherwise."""
    return load_config(path, Suite, "evaluation suite")
