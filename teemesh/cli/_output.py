"""Shared CLI output: rich tables for people, ``--json`` for scripts, errors on stderr.

rich is imported on first use, not when the CLI starts: ``teemesh sidecar run`` is a long-lived
process that never prints a table, and should not carry rich (and what it imports) in memory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import click

from teemesh.errors import InputError, MeshError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


class _LazyConsole:
    """A ``rich.console.Console`` made (and rich imported) when first used."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console  # noqa: PLC0415

            self._console = Console(**self._options)
        return getattr(self._console, name)


stdout = cast("Console", _LazyConsole(highlight=False, soft_wrap=True))
stderr = cast("Console", _LazyConsole(stderr=True, highlight=False))

EXIT_BAD_INPUT = 2


def print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))


def table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    out = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    out.add_column(style="bold cyan", no_wrap=True)
    out.add_column(overflow="fold")
    for key, value in rows:
        cell = value if isinstance(value, Text) else Text("-" if value is None else str(value))
        out.add_row(Text(key), cell)
    return out


def grid(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    """A table with a header row, one line per item."""
    from rich.table import Table  # noqa: PLC0415

    out = Table(title=title, title_justify="left")
    for column in columns:
        out.add_column(column, overflow="fold")
    for row in rows:
        out.add_row(*("-" if cell is None else str(cell) for cell in row))
    return out


def fail(error: MeshError | str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    from rich.text import Text  # noqa: PLC0415

    stderr.print(Text("error: ", style="bold red") + Text(str(error)))
    sys.exit(code)


def read_input(path: str, *, limit: int) -> bytes:
    """Read a file (or ``-`` for stdin), refusing more than ``limit`` bytes without reading all."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with Path(path).open("rb") as handle:
                data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(exc.strerror or str(exc), field=path) from exc
    if len(data) > limit:
        raise InputError(f"input larger than {limit} bytes", field=path)
    return data
