"""Route names in a hosts file: one marked block of ``<vip> <route>`` lines, the rest kept.

The sidecar writes the block; ``teemesh sidecar exec`` reads it back to give a command the same
names. Light on purpose: ``exec`` imports this and nothing of the running sidecar.
"""

from __future__ import annotations

from pathlib import Path

BEGIN, END = "# teemesh routes: begin\n", "# teemesh routes: end\n"


def route_block(text: str) -> str:
    """The route lines of a hosts file's block (the whole text if it has no block)."""
    if BEGIN not in text:
        return text
    return text.partition(BEGIN)[2].partition(END)[0]


def write_hosts(path: Path, lines: str) -> None:
    """Put ``lines`` in ``path``'s block, replacing our previous block and keeping the rest."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    if BEGIN in text and END in text:
        head, _, tail = text.partition(BEGIN)
        text = head + tail.partition(END)[2]
    if text and not text.endswith("\n"):
        text += "\n"
    content = f"{text}{BEGIN}{lines}{END}"
    tmp = path.with_name(f".{path.name}.teemesh")
    try:
        tmp.write_text(content)
        tmp.chmod(0o644)
        tmp.replace(path)
    except OSError:  # a bind-mounted file cannot be renamed over: rewrite it in place
        tmp.unlink(missing_ok=True)
        path.write_text(content)
