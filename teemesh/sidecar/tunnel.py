"""The tunnel's header, inside the mTLS session: ``CONNECT <backend>:<port>`` and its reply.

The egress sends the request and its client's first bytes at once, without waiting; the ingress
holds those bytes until it has authorized the caller and reached the backend, so a refused
caller never gets a byte to the backend. No cleartext field names the target, so the session
passes unchanged through a gateway in TLS passthrough. Pure: bytes in, values out.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from teemesh.encoding import DNS_LABEL
from teemesh.errors import InputError

MAX_HEAD = 8 * 1024
HEAD_END = b"\r\n\r\n"
_REQUEST_LINE = re.compile(rb"CONNECT ([a-z0-9-]{1,63}):([0-9]{1,5}) HTTP/1\.1")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3}) ([ -~]*)")
_REASON_HEADER = b"x-teemesh-refusal:"


class Refusal(enum.Enum):
    """Why an ingress refused a tunnel (the value is what the log and metrics say)."""

    BAD_REQUEST = "malformed tunnel request"
    NOT_A_PEER = "caller certificate names no peer of this cluster"
    REVOKED = "caller certificate revoked"
    CALLER_NOT_ALLOWED = "caller's group may not call this backend"
    UNKNOWN_BACKEND = "no such backend on this CVM"
    BACKEND_UNREACHABLE = "backend refused the connection"
    CONNECTION_LIMIT = "connection limit reached"
    DRAINING = "sidecar shutting down"

    @property
    def status(self) -> int:
        return _STATUS[self]

    @property
    def retryable(self) -> bool:
        """Nothing reached the backend, and another instance may do better."""
        return self in (Refusal.BACKEND_UNREACHABLE, Refusal.CONNECTION_LIMIT, Refusal.DRAINING)


_STATUS = {
    Refusal.BAD_REQUEST: 400,
    Refusal.NOT_A_PEER: 403,
    Refusal.REVOKED: 403,
    Refusal.CALLER_NOT_ALLOWED: 403,
    Refusal.UNKNOWN_BACKEND: 404,
    Refusal.BACKEND_UNREACHABLE: 502,
    Refusal.CONNECTION_LIMIT: 503,
    Refusal.DRAINING: 503,
}
_PHRASES = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 502: "Bad Gateway",
            503: "Service Unavailable"}  # fmt: skip


@dataclass(frozen=True)
class Target:
    backend: str
    port: int


def connect_request(target: Target) -> bytes:
    name = f"{target.backend}:{target.port}"
    return f"CONNECT {name} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode()


def split_head(buffer: bytes) -> tuple[bytes, bytes] | None:
    """(head, rest) once ``buffer`` holds a whole head; None while more is needed."""
    end = buffer.find(HEAD_END)
    if end < 0:
        # the last bytes may be the start of HEAD_END: the head proper is at least this long
        if len(buffer) - (len(HEAD_END) - 1) > MAX_HEAD:
            raise InputError(f"tunnel header longer than {MAX_HEAD} bytes", field="tunnel")
        return None
    if end > MAX_HEAD:
        raise InputError(f"tunnel header longer than {MAX_HEAD} bytes", field="tunnel")
    return buffer[:end], buffer[end + len(HEAD_END) :]


def parse_request(head: bytes) -> Target:
    """The target of a ``CONNECT`` head (without its blank line); InputError says what is wrong."""
    line = head.split(b"\r\n", 1)[0]
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise InputError(f"expected 'CONNECT <backend>:<port> HTTP/1.1', got {line[:80]!r}",
                         field="tunnel")  # fmt: skip
    backend, port = match.group(1).decode(), int(match.group(2))
    if not DNS_LABEL.fullmatch(backend) or not 1 <= port <= 65535:
        raise InputError(f"invalid tunnel target {backend}:{port}", field="tunnel")
    return Target(backend, port)


def accepted() -> bytes:
    return b"HTTP/1.1 200 Connection established\r\n\r\n"


def refused(reason: Refusal) -> bytes:
    status = reason.status
    return (
        f"HTTP/1.1 {status} {_PHRASES[status]}\r\n"
        f"x-teemesh-refusal: {reason.name}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def parse_reply(head: bytes) -> Refusal | None:
    """None for an accepted tunnel, else why it was refused (unknown reasons: BAD_REQUEST)."""
    lines = head.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise InputError(f"not a tunnel reply: {lines[0][:80]!r}", field="tunnel")
    if match.group(1) == b"200":
        return None
    for line in lines[1:]:
        if line.lower().startswith(_REASON_HEADER):
            name = line[len(_REASON_HEADER) :].strip().decode("ascii", "replace")
            if name in Refusal.__members__:
                return Refusal[name]
    return Refusal.BAD_REQUEST
