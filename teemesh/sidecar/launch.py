"""What ``teemesh sidecar run`` hands the sidecar process it starts: the validated configuration
and the run options, as one JSON file in the state folder.

The CLI validates with pydantic, then replaces itself with ``python -m teemesh.sidecar``, which
reads this file into plain dataclasses: the long-running process never loads the CLI, pydantic
or the X.509 library. The admission helper reads the same file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teemesh.errors import InputError
from teemesh.fsutil import write_private
from teemesh.sidecar.config import SidecarConfig, config_from_json


@dataclass(frozen=True)
class Launch:
    config: SidecarConfig
    hosts_file: str
    agent: str | None = None
    """The guest agent's endpoint (None: dstack's default socket)."""
    collateral: str | None = None
    """Collateral for TDX quotes (a file or a folder), for checking coordinators offline."""
    log_level: int = logging.INFO

    def write(self, path: Path) -> None:
        write_private(path, json.dumps(dataclasses.asdict(self), indent=1).encode())

    @classmethod
    def read(cls, path: Path) -> Launch:
        try:
            doc: Any = json.loads(path.read_text())
            return cls(**{**doc, "config": config_from_json(doc["config"])})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise InputError(f"unreadable launch file: {exc}", field=str(path)) from exc
