"""Files that hold secrets: owner-only from the first byte, replaced atomically."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` with mode 0600 via a temporary file and rename: a crash leaves old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _write_synced(tmp, os.O_TRUNC, data)
    os.replace(tmp, path)


def append_private(path: Path, line: bytes) -> None:
    """Append one line to an owner-only log, flushed to disk before returning."""
    _write_synced(path, os.O_APPEND, line)


def _write_synced(path: Path, mode: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o600)
    with os.fdopen(fd, "wb") as handle:  # a file object writes all of data, unlike os.write
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
