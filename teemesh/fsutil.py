"""Files that hold secrets: owner-only from the first byte, replaced atomically."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` with mode 0600 via a temporary file and rename: a crash leaves old or new.

    The temporary file is new (O_EXCL, so never a stale one with a looser mode), and the folder
    is synced after the rename, so the new file survives a power loss once this returns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        _write_synced(tmp, os.O_EXCL, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def append_private(path: Path, line: bytes) -> None:
    """Append one line to an owner-only log, flushed to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_synced(path, os.O_APPEND, line)


def _write_synced(path: Path, mode: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o600)
    with os.fdopen(fd, "wb") as handle:  # a file object writes all of data, unlike os.write
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
