"""ClientHello parsing (``gateway.clienthello``) on real OpenSSL ClientHellos, split and re-framed.

Every ClientHello here comes from Python's ssl module (OpenSSL) writing into a memory BIO;
malformed ones are real ones with one field changed, or built field by field.
"""

from __future__ import annotations

import pytest
from hellokit import frame, handshake_bytes, openssl_hello, reframe

from teemesh.errors import InputError
from teemesh.gateway.clienthello import MAX_CLIENT_HELLO, ClientHello, parse_client_hello


def split_body(message: bytes) -> tuple[bytes, bytes]:
    """A ClientHello message's fields before the extensions, and its extensions block."""
    pos = 4 + 2 + 32
    pos += 1 + message[pos]
    pos += 2 + int.from_bytes(message[pos : pos + 2], "big")
    pos += 1 + message[pos]
    return message[4:pos], message[pos + 2 :]


def message(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


def hello_message(head: bytes, extensions: bytes | None) -> bytes:
    if extensions is None:
        return message(head)
    return message(head + len(extensions).to_bytes(2, "big") + extensions)


def extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def sni_extension(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + len(n).to_bytes(2, "big") + n for n in names)
    return extension(0, len(entries).to_bytes(2, "big") + entries)


def alpn_extension(*names: bytes) -> bytes:
    entries = b"".join(bytes([len(n)]) + n for n in names)
    return extension(16, len(entries).to_bytes(2, "big") + entries)


HEAD = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
"""A minimal ClientHello up to its extensions: no session id, one suite, null compression."""


def built(*extensions: bytes, head: bytes = HEAD) -> bytes:
    return frame(hello_message(head, b"".join(extensions)))


FILLER = 0xFFFE  # an unassigned extension type (OpenSSL already sends padding, 21)


def with_extension(records: bytes, kind: int, data: bytes) -> bytes:
    """A real ClientHello with one more extension at the end (e.g. padding, to grow it)."""
    head, extensions = split_body(handshake_bytes(records))
    return hello_message(head, extensions + extension(kind, data))


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
@pytest.mark.parametrize(
    ("alpn", "expected"),
    [(None, ()), (["h2"], ("h2",)), (["h2", "http/1.1"], ("h2", "http/1.1")),
     (["http/1.1"], ("http/1.1",))],
)  # fmt: skip
def test_openssl_hello(tls12: bool, alpn: list[str] | None, expected: tuple[str, ...]) -> None:
    hello = openssl_hello("myapp-8080s.example.com", alpn, tls12)
    assert parse_client_hello(hello) == ClientHello("myapp-8080s.example.com", expected, len(hello))


@pytest.mark.parametrize("host", [None, "127.0.0.1", "::1"])
def test_no_server_name(host: str | None) -> None:
    hello = openssl_hello(host, ["h2"])  # OpenSSL sends no SNI for IP addresses
    assert parse_client_hello(hello) == ClientHello(None, ("h2",), len(hello))


def test_server_name_is_canonical() -> None:
    hello = openssl_hello("MyApp-443S.Example.COM.")
    result = parse_client_hello(hello)
    assert result is not None
    assert result.server_name == "myapp-443s.example.com"


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_every_prefix_waits(tls12: bool) -> None:
    hello = openssl_hello(alpn=["h2", "http/1.1"], tls12=tls12)
    for cut in range(len(hello)):
        assert parse_client_hello(hello[:cut]) is None, cut
    assert parse_client_hello(hello) is not None


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 64, 100, 255, 300, 511])
def test_fragmented_across_records(size: int) -> None:
    hello = openssl_hello(alpn=["h2"])
    records = reframe(hello, size)
    assert len(records) > len(hello)
    assert parse_client_hello(records) == ClientHello("myapp.example.com", ("h2",), len(records))


@pytest.mark.parametrize("size", [1, 3, 100])
def test_fragmented_and_split_byte_by_byte(size: int) -> None:
    records = reframe(openssl_hello(alpn=["h2"]), size)
    for cut in range(len(records)):
        assert parse_client_hello(records[:cut]) is None, cut
    assert parse_client_hello(records) is not None


def test_bytes_after_the_hello_are_left_alone() -> None:
    hello = openssl_hello()
    early_data = b"\x17\x03\x03\x00\x05hello"
    result = parse_client_hello(hello + early_data + b"\xff" * 100)
    assert result == ClientHello("myapp.example.com", (), len(hello))


def test_post_quantum_sized_hello() -> None:
    # an X25519MLKEM768 key share is 1216 bytes; a filler extension stands in for it
    hello = frame(with_extension(openssl_hello(), FILLER, bytes(1400)))
    assert len(hello) > 1800
    assert parse_client_hello(hello) == ClientHello("myapp.example.com", (), len(hello))


def test_largest_hello() -> None:
    # four records of at most 4096 bytes: 20 bytes of headers and 16364 of message
    pad = 16364 - len(with_extension(openssl_hello(), FILLER, b""))
    records = frame(with_extension(openssl_hello(), FILLER, bytes(pad)), 4096)
    assert len(records) == MAX_CLIENT_HELLO
    assert parse_client_hello(records) is not None
    longer = frame(with_extension(openssl_hello(), FILLER, bytes(pad + 1)), 4096)
    with pytest.raises(InputError, match="no complete ClientHello in 16384 bytes"):
        parse_client_hello(longer)


def test_over_long_hello() -> None:
    big = with_extension(openssl_hello(), FILLER, bytes(20_000))
    with pytest.raises(InputError, match="over 16384"):
        parse_client_hello(frame(big, 1000)[:9])  # known from the handshake header alone
    records = frame(big, 1000)
    for cut in (MAX_CLIENT_HELLO - 10, MAX_CLIENT_HELLO + 1, len(records)):
        with pytest.raises(InputError, match="ClientHello"):
            parse_client_hello(records[:cut])


def test_too_many_bytes_without_a_hello() -> None:
    # small records whose handshake header claims more than they carry
    records = frame(with_extension(openssl_hello(), FILLER, bytes(8000)), 1)
    assert parse_client_hello(records[:MAX_CLIENT_HELLO]) is None
    with pytest.raises(InputError, match="no complete ClientHello"):
        parse_client_hello(records[: MAX_CLIENT_HELLO + 1])


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET / HTTP/1.1\r\nHost: myapp.example.com\r\n\r\n", b"POST /x HTTP/1.1\r\n",
     b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"G", b"GET"],
)  # fmt: skip
def test_plain_http(request_bytes: bytes) -> None:
    with pytest.raises(InputError, match="not TLS: looks like plain HTTP") as info:
        parse_client_hello(request_bytes)
    assert info.value.field == "client_hello"


@pytest.mark.parametrize(
    "data",
    [b"\x00", b"SSH-2.0-OpenSSH_9.6\r\n", b"\x80\x2e\x01\x00\x02", b"\x15\x03\x03\x00\x02\x02\x28",
     b"\x17\x03\x03\x00\x01x", b"\xff" * 100],
)  # fmt: skip
def test_not_tls(data: bytes) -> None:
    with pytest.raises(InputError, match="not TLS"):
        parse_client_hello(data)


def test_empty_buffer_waits() -> None:
    assert parse_client_hello(b"") is None


TRUNCATED_HEAD = b"\x03\x03" + bytes(20)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (b"\x16\x02\x00", "record version 0200"),
        (b"\x16\x03\x01\x00\x00", "record of 0 bytes"),
        (b"\x16\x03\x01\x40\x01", "record of 16385 bytes"),
        (b"\x16\x03\x01\x00\x05\x02", "type 2, expected a ClientHello"),  # a ServerHello
        (b"\x16\x03\x03\x00\x01\x0b", "type 11"),  # a Certificate
        (frame(b"\x01\x00\x00\x02\x03\x03" + b"\x01\x00\x00\x00"), "4 handshake bytes after"),
        (frame(hello_message(TRUNCATED_HEAD, None)), "random runs past the end"),
        (frame(hello_message(HEAD[:-2], None)), "length of legacy_compression_methods runs past"),
        (built(head=b"\x02\x00" + HEAD[2:]), "version 0200"),
        (built(head=HEAD[:34] + b"\x21" + bytes(33) + HEAD[35:]), "session_id longer than 32"),
        (built(head=HEAD[:35] + b"\x00\x00" + HEAD[39:]), "cipher_suites of 0 bytes"),
        (built(head=HEAD[:35] + b"\x00\x03\x13\x01\x13" + HEAD[39:]), "cipher_suites of 3 bytes"),
        (built(head=HEAD[:-2] + b"\x00"), "empty legacy_compression_methods"),
        (frame(hello_message(HEAD, b"") + b"x"), "1 handshake bytes after the ClientHello"),
        (frame(message(HEAD + b"\x00\x00x")), "1 stray bytes after the ClientHello"),
        (
            frame(message(HEAD + b"\x00\x05\x00\x00\x00")),
            "extensions runs past the end of the ClientHello",
        ),
        (built(b"\x00\x2b\x00\x09\x00"), "extension 43 runs past the end of extensions"),
        (built(b"\x00"), "extension type runs past the end"),
        (
            built(extension(43, b"\x02\x03\x04"), extension(43, b"\x02\x03\x04")),
            "extension 43 appears twice",
        ),
        (
            built(sni_extension(b"a.example.com"), sni_extension(b"b.example.com")),
            "extension 0 appears twice",
        ),
        (built(extension(0, b"")), "length of server_name_list runs past"),
        (built(extension(0, b"\x00\x00")), "empty server_name list"),
        (built(extension(0, b"\x00\x04\x00\x00\x01a\x00")), "1 stray bytes after extension 0"),
        (built(sni_extension(b"a.example.com", name_type=1)), "type 1, only host_name"),
        (built(sni_extension(b"a.example.com", b"b.example.com")), "more than one host_name"),
        (built(sni_extension(b"caf\xc3\xa9.example.com")), "not ASCII"),
        (built(sni_extension(b"my_app.example.com")), "invalid label 'my_app'"),
        (built(sni_extension(b"-app.example.com")), "invalid label '-app'"),
        (built(sni_extension(b"a..example.com")), "invalid label ''"),
        (built(sni_extension(b"")), "1 to 253 characters"),
        (built(sni_extension(b"a" * 250 + b".com")), "1 to 253 characters"),
        (built(sni_extension(b"a" * 64 + b".com")), "invalid label"),
        (built(sni_extension(b"192.168.1.1")), "an IP address"),
        (built(sni_extension(b"a\x00.example.com")), "invalid label"),
        (built(extension(16, b"\x00\x00")), "empty ALPN protocol list"),
        (built(extension(16, b"\x00\x01\x00")), "empty ALPN protocol name"),
        (built(extension(16, b"\x00\x03\x05h2")), "protocol name runs past"),
        (built(extension(16, b"")), "length of protocol_name_list runs past"),
    ],
)
def test_malformed(records: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        parse_client_hello(records)
    assert info.value.field == "client_hello"


def test_errors_show_before_the_hello_is_complete() -> None:
    # a ServerHello is refused from its first handshake byte on, even fragmented
    assert parse_client_hello(b"\x16\x03\x01\x00\x01") is None
    with pytest.raises(InputError, match="type 2"):
        parse_client_hello(b"\x16\x03\x01\x00\x01\x02")
    with pytest.raises(InputError, match="type 2"):
        parse_client_hello(b"\x16\x03\x01\x00\x50\x02\x00")


def test_another_record_type_inside_the_hello() -> None:
    records = reframe(openssl_hello(), 100)
    alert = b"\x15\x03\x03\x00\x02\x01\x00"
    with pytest.raises(InputError, match="content type 21 inside the ClientHello"):
        parse_client_hello(records[:105] + alert + records[105:])


def test_without_extensions() -> None:
    records = frame(hello_message(HEAD, None))
    assert parse_client_hello(records) == ClientHello(None, (), len(records))


def test_other_extensions_are_skipped() -> None:
    records = built(
        extension(43, b"\x02\x03\x04"), extension(0x0A0A, b""), alpn_extension(b"h2"),
        extension(21, bytes(10)), sni_extension(b"App.Example.Com."), extension(0xFFFF, b"x"),
    )  # fmt: skip
    assert parse_client_hello(records) == ClientHello("app.example.com", ("h2",), len(records))


def test_alpn_keeps_every_byte() -> None:
    records = built(alpn_extension(b"\x0a\x0a", b"h2", b"\xff"))
    result = parse_client_hello(records)
    assert result is not None
    assert result.alpn == ("\n\n", "h2", "\xff")
