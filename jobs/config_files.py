"""Typed YAML config files (recipes, evaluation suites, ablation configs): one loader, one error format.

A file that cannot be used raises `ConfigError` naming the file and every bad key at once: missing, not UTF-8,
not YAML, not a mapping, or keys the schema does not take (`models.config.StrictModel`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or object that cannot be used; the message names it and each problem."""


def format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the schema)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(obj: Any, schema: type[T], where: str, what: str, error: type[ConfigError] = ConfigError) -> T:
    """`obj` (from YAML) as `schema`, or `error` naming `where` (a file) and each bad key."""
    if not isinstance(obj, dict):
        raise error(f"{where}: {what} is a YAML mapping, got {type(obj).__name__}")
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        raise error(f"{where} is not a valid {what}:\n{format_errors(e)}") from None


def load_config(path: str | Path, schema: type[T], what: str, error: type[ConfigError] = ConfigError) -> T:
    """The YAML file at `path` as `schema`; `error` (a ConfigError) naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    return parse_config(obj, schema, str(path), what, error)
