"""Reading a cluster spec: YAML in, a checked ``ClusterSpec`` out, or every problem at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teemesh.config import MAX_CONFIG_LEN, ConfigError, parse_model, read_yaml
from teemesh.spec.checks import spec_problems
from teemesh.spec.model import ClusterSpec


def load_spec(path: Path) -> ClusterSpec:
    """Read, shape-check and plan-check the spec at ``path``; compose files are read from
    beside it. Errors name the file and each problem's path."""
    return parse_spec(read_yaml(path), source=str(path), base_dir=path.parent)


def parse_spec(doc: Any, *, source: str = "spec", base_dir: Path | None = None) -> ClusterSpec:
    """``doc`` (a parsed YAML document) as a checked spec.

    ``base_dir`` is where ``compose`` paths are relative to; without it no compose file is
    read and a group naming one is refused (a pure parse, for tests and fuzzing)."""
    if not isinstance(doc, dict):
        got = "an empty document" if doc is None else type(doc).__name__
        raise ConfigError(source, [f"(top level): expected a mapping, got {got}"])
    spec = parse_model(ClusterSpec, doc, source=source)
    problems = spec_problems(spec)
    texts: dict[str, str] = {}
    for name, group in spec.workload_groups.items():
        if group.compose is None:
            continue
        where = f"workload_groups.{name}.compose"
        if base_dir is None:
            problems.append(f"{where}: compose files are read only from a spec file")
            continue
        try:
            texts[name] = _read_compose(base_dir / group.compose)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if problems:
        raise ConfigError(source, problems)
    return spec.with_compose_texts(texts)


def _read_compose(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_CONFIG_LEN:
            raise ValueError(f"{path} is larger than {MAX_CONFIG_LEN} bytes")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text") from exc
