"""The SNI and ALPN of a TLS ClientHello, read from the first bytes of a connection.

The gateway routes on these before it decides to terminate TLS or pass the bytes through, so it
buffers the ClientHello: call ``parse_client_hello`` on everything received so far until it
returns a value. The message may span several TLS records and arrive in any split. Only the
structure around the two extensions is checked: the TLS stack that terminates (or the app, in
passthrough) validates the rest. Pure: bytes in, values out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from teemesh.errors import InputError
from teemesh.gateway.sni import host_name

MAX_CLIENT_HELLO = 16 * 1024
"""Bytes of records buffered before giving up. dstack reads 4 KiB, but post-quantum key shares
already make ClientHellos of 1.8 KiB and more."""

RECORD_HEADER = 5
MAX_RECORD = 2**14  # plaintext fragment limit (RFC 8446 5.1)
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_ALPN = 16
_HOST_NAME = 0
_FIELD = "client_hello"
_HTTP = re.compile(rb"[A-Z]{1,7}( |$)")  # a request line's method: GET, POST, PRI (h2c), ...


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None  # canonical: lower-case, no trailing dot
    alpn: tuple[str, ...]  # one character per byte (latin-1), so GREASE values survive
    record_bytes: int  # how much of the buffer the records carrying the ClientHello took


def _error(message: str) -> InputError:
    return InputError(message, field=_FIELD)


def parse_client_hello(buffer: bytes) -> ClientHello | None:
    """The ClientHello at the start of ``buffer``; None while more bytes are needed.

    InputError for anything else, as soon as the bytes present show it, so a prefix of a
    ClientHello never raises. Only record headers are walked until the message is complete,
    so calling this on every packet stays cheap.
    """
    fragments: list[tuple[int, int]] = []  # (start, end) of each complete record's payload
    head = b""  # the first 4 handshake bytes (type, length), checked as soon as they arrive
    received = 0  # handshake bytes in complete records
    offset = 0
    while True:
        header = buffer[offset : offset + RECORD_HEADER]
        _check_record_header(header, first=offset == 0, preview=buffer[:16])
        if len(header) < RECORD_HEADER:
            _check_size(buffer)
            return None
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > MAX_RECORD:
            raise _error(f"handshake record of {length} bytes (1 to {MAX_RECORD} allowed)")
        start = offset + RECORD_HEADER
        if start + length > MAX_CLIENT_HELLO:
            raise _error(f"no complete ClientHello in {MAX_CLIENT_HELLO} bytes")
        available = min(len(buffer) - start, length)
        if len(head) < 4:
            head = (head + buffer[start : start + min(available, 4)])[:4]
            _check_handshake_header(head)
        if available < length:
            _check_size(buffer)
            return None
        fragments.append((start, start + length))
        received += length
        offset = start + length
        if received >= 4:
            total = 4 + int.from_bytes(head[1:4], "big")
            if received > total:
                raise _error(f"{received - total} handshake bytes after the ClientHello")
            if received == total:
                message = b"".join(buffer[s:e] for s, e in fragments)
                return _parse_body(message[4:], record_bytes=offset)


def _check_size(incomplete: bytes) -> None:
    if len(incomplete) > MAX_CLIENT_HELLO:
        raise _error(f"no complete ClientHello in {MAX_CLIENT_HELLO} bytes")


def _check_record_header(header: bytes, *, first: bool, preview: bytes) -> None:
    if not header:
        return
    if header[0] != _HANDSHAKE:
        if not first:
            raise _error(f"record of content type {header[0]} inside the ClientHello")
        if _HTTP.match(preview):
            raise _error(f"not TLS: looks like plain HTTP ({preview!r})")
        raise _error(f"not TLS: expected a handshake record (0x16), got {preview!r}")
    if len(header) >= 2 and header[1] != 3:
        raise _error(f"not TLS: record version {header[1:3].hex()}, expected 03xx")


def _check_handshake_header(head: bytes) -> None:
    if head and head[0] != _CLIENT_HELLO:
        raise _error(f"handshake message of type {head[0]}, expected a ClientHello (1)")
    if len(head) == 4:
        length = int.from_bytes(head[1:4], "big")
        # even framed in a single record it would not fit
        if RECORD_HEADER + 4 + length > MAX_CLIENT_HELLO:
            raise _error(f"a ClientHello of {length} bytes is over {MAX_CLIENT_HELLO}")


class _Reader:
    """Bounds-checked reads from one length-delimited piece of the message."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.what, self.pos = data, what, 0

    def take(self, size: int, what: str) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise _error(f"{what} runs past the end of {self.what}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> _Reader:
        return _Reader(self.take(self.uint(length_size, f"length of {what}"), what), what)

    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def finish(self) -> None:
        if not self.at_end():
            raise _error(f"{len(self.data) - self.pos} stray bytes after {self.what}")


def _parse_body(body: bytes, *, record_bytes: int) -> ClientHello:
    hello = _Reader(body, "the ClientHello")
    version = hello.take(2, "legacy_version")
    if version[0] != 3:
        raise _error(f"ClientHello version {version.hex()}, expected 03xx")
    hello.take(32, "random")
    if len(hello.vector(1, "legacy_session_id").data) > 32:
        raise _error("legacy_session_id longer than 32 bytes")
    suites = hello.vector(2, "cipher_suites").data
    if not suites or len(suites) % 2:
        raise _error(f"cipher_suites of {len(suites)} bytes (a non-empty list of 2-byte ids)")
    if not hello.vector(1, "legacy_compression_methods").data:
        raise _error("empty legacy_compression_methods")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if not hello.at_end():  # a ClientHello without extensions is valid (TLS 1.2 and older)
        extensions = hello.vector(2, "extensions")
        hello.finish()
        seen: set[int] = set()
        while not extensions.at_end():
            kind = extensions.uint(2, "extension type")
            data = extensions.vector(2, f"extension {kind}")
            if kind in seen:
                raise _error(f"extension {kind} appears twice")
            seen.add(kind)
            if kind == _SERVER_NAME:
                server_name = _server_name(data)
            elif kind == _ALPN:
                alpn = _alpn(data)
    return ClientHello(server_name, alpn, record_bytes)


def _server_name(ext: _Reader) -> str:
    names = ext.vector(2, "server_name_list")
    ext.finish()
    if names.at_end():
        raise _error("empty server_name list")
    found: str | None = None
    while not names.at_end():
        name_type = names.uint(1, "server name type")
        if name_type != _HOST_NAME:  # the only type there is; others have no known framing
            raise _error(f"server name of type {name_type}, only host_name (0) exists")
        name = names.vector(2, "host_name").data
        if found is not None:
            raise _error("more than one host_name in server_name")
        try:
            found = host_name(name.decode("ascii"), field=_FIELD)
        except UnicodeDecodeError:
            raise _error(f"server name {name[:80]!r} is not ASCII") from None
    assert found is not None
    return found


def _alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.vector(2, "protocol_name_list")
    ext.finish()
    if protocols.at_end():
        raise _error("empty ALPN protocol list")
    names = []
    while not protocols.at_end():
        name = protocols.vector(1, "protocol name").data
        if not name:
            raise _error("empty ALPN protocol name")
        names.append(name.decode("latin-1"))
    return tuple(names)
