"""Typed, frozen configuration parsed once: every problem is reported together, with its path."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from teemesh.errors import InputError

MAX_CONFIG_LEN = 4 * 1024 * 1024
M = TypeVar("M")


class ConfigError(InputError):
    """A configuration file or document with one or more problems, each ``path: message``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s):\n{listing}", field=source)


class Frozen(BaseModel):
    """Base for config models: immutable, and unknown keys are errors (typos do not pass)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def parse_model(model: type[M], data: Any, *, source: str) -> M:
    """``data`` as a ``model`` (a pydantic model or a frozen dataclass), or every problem."""
    try:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate(data)
        adapter: TypeAdapter[M] = _adapter(model)  # type: ignore[arg-type]
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(source, [describe_error(err) for err in exc.errors()]) from exc


@functools.cache
def _adapter(model: type) -> TypeAdapter[Any]:
    return TypeAdapter(model)


def describe_error(err: Any) -> str:
    path = ".".join(str(part) for part in err["loc"]) or "(top level)"
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "unexpected_keyword_argument":  # a dataclass's word for a model's
        message = "Extra inputs are not permitted"
    return f"{path}: {message}"


def read_yaml(path: Path) -> Any:
    """Read a YAML (or JSON) document, naming the file and line of a syntax error."""
    source = str(path)
    try:
        if path.stat().st_size > MAX_CONFIG_LEN:
            raise ConfigError(source, [f"file larger than {MAX_CONFIG_LEN} bytes"])
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(source, [exc.strerror or str(exc)]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, ["not UTF-8 text"]) from exc
    return parse_yaml(text, source)


def parse_yaml(text: str, source: str) -> Any:
    """A YAML (or JSON) document from text; ``source`` names it in the problem."""
    if len(text) > MAX_CONFIG_LEN:
        raise ConfigError(source, [f"larger than {MAX_CONFIG_LEN} characters"])
    try:
        return yaml.safe_load(text)
    except RecursionError as exc:
        raise ConfigError(source, ["document nested too deeply"]) from exc
    except ValueError as exc:  # a constructor's: 2001-13-01 is no date
        raise ConfigError(source, [f"invalid YAML value: {exc}"]) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}invalid YAML: {problem}"]) from exc
