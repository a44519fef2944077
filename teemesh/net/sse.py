"""Server-sent events, the parser: bytes in, whole events out. Pure, so it is fuzzed directly.

Follows the WHATWG rules a catalog watch needs: ``field: value`` lines (one optional space after
the colon), comment lines starting with ``:``, multi-line ``data`` joined by newlines, an event
dispatched at a blank line, ``id`` remembered across events (what ``Last-Event-ID`` resends),
LF, CR or CRLF line ends. A line longer than ``max_line`` is an error, not unbounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from teemesh.errors import PeerError

MAX_LINE = 4 * 1024 * 1024
WATCH_KEEPALIVE = 15.0
"""Seconds between keepalive lines on an idle watch stream; clients give up after three."""


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str
    id: str | None


class SseParser:
    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.last_id: str | None = None
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if not chunk:
            return []  # an empty read: a CR before it may still be half of a CRLF
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._pending_cr = False
        self._buffer += chunk
        out: list[SseEvent] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                break
            end, width = cut
            if end > self.max_line:  # the same limit whether the line came whole or in pieces
                raise PeerError(f"server-sent event line over {self.max_line} bytes")
            line = self._buffer[:end]
            if self._buffer[end : end + 1] == b"\r" and end + 1 == len(self._buffer):
                self._pending_cr = True
            self._buffer = self._buffer[end + width :]
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                out.append(event)
        if len(self._buffer) > self.max_line:
            raise PeerError(f"server-sent event line over {self.max_line} bytes")
        return out

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None

    def _dispatch(self) -> SseEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        return SseEvent(event, "\n".join(data), self.last_id)


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the first line ends and how wide its terminator is (CRLF counts as one)."""
    cr, lf = buffer.find(b"\r"), buffer.find(b"\n")
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, 1
    return cr, 2 if buffer[cr + 1 : cr + 2] == b"\n" else 1
