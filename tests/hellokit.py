"""Real ClientHellos for the gateway's tests: what OpenSSL sends first, and the same handshake
message framed into TLS records of any size."""

from __future__ import annotations

import ssl

import pytest


def openssl_hello(
    server_hostname: str | None = "myapp.example.com",
    alpn: list[str] | None = None,
    tls12: bool = False,
) -> bytes:
    """The bytes OpenSSL sends first: the ClientHello, in its own framing."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def handshake_bytes(records: bytes) -> bytes:
    """The handshake message carried by a run of records."""
    out, pos = b"", 0
    while pos < len(records):
        length = int.from_bytes(records[pos + 3 : pos + 5], "big")
        out += records[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return out


def frame(message: bytes, size: int = 2**14, version: bytes = b"\x03\x01") -> bytes:
    """``message`` in handshake records of ``size`` bytes of payload each."""
    return b"".join(
        b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (message[i : i + size] for i in range(0, len(message), size))
    )


def reframe(records: bytes, size: int) -> bytes:
    return frame(handshake_bytes(records), size)
