"""The tunnel header (``sidecar.tunnel``): exact bytes, what parses, what is refused and why."""

from __future__ import annotations

import pytest

from teemesh.errors import InputError
from teemesh.sidecar.tunnel import (
    HEAD_END,
    MAX_HEAD,
    Refusal,
    Target,
    accepted,
    connect_request,
    parse_reply,
    parse_request,
    refused,
    split_head,
)


def test_connect_request_bytes() -> None:
    assert connect_request(Target("db", 5432)) == (
        b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"
    )


@pytest.mark.parametrize("target", [Target("db", 5432), Target("a", 1), Target("x-9" * 21, 65535)])
def test_request_round_trip(target: Target) -> None:
    parts = split_head(connect_request(target) + b"early bytes")
    assert parts is not None
    head, rest = parts
    assert rest == b"early bytes"
    assert parse_request(head) == target


def test_split_head_waits_for_the_blank_line() -> None:
    request = connect_request(Target("db", 5432))
    for cut in range(len(request)):
        assert split_head(request[:cut]) is None, cut
    assert split_head(request) == (request[: -len(HEAD_END)], b"")


def test_split_head_keeps_everything_after_the_first_blank_line() -> None:
    assert split_head(b"A\r\n\r\nB\r\n\r\nC") == (b"A", b"B\r\n\r\nC")


def test_split_head_bounds_the_head() -> None:
    assert split_head(b"x" * MAX_HEAD) is None
    with pytest.raises(InputError, match="longer than"):
        split_head(b"x" * (MAX_HEAD + 4))
    assert split_head(b"x" * MAX_HEAD + HEAD_END + b"y" * 100_000) == (
        b"x" * MAX_HEAD,
        b"y" * 100_000,
    )
    with pytest.raises(InputError, match="longer than"):
        split_head(b"x" * (MAX_HEAD + 1) + HEAD_END)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_split_head_verdict_does_not_depend_on_how_the_stream_is_cut(cut: int) -> None:
    """A head of exactly MAX_HEAD bytes is accepted whole, so also when its end comes late."""
    stream = b"x" * MAX_HEAD + HEAD_END
    assert split_head(stream) == (b"x" * MAX_HEAD, b"")
    # the ingress calls split_head on each read; here the last ``cut`` bytes come in a later read
    assert split_head(stream[:-cut]) is None


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"GET / HTTP/1.1",
        b"CONNECT db:5432 HTTP/1.0",
        b"connect db:5432 HTTP/1.1",
        b"CONNECT  db:5432 HTTP/1.1",
        b"CONNECT db:5432 HTTP/1.1 ",
        b"CONNECT DB:5432 HTTP/1.1",  # labels are lower case
        b"CONNECT db_1:5432 HTTP/1.1",
        b"CONNECT db.svc:5432 HTTP/1.1",
        b"CONNECT -db:5432 HTTP/1.1",  # not a DNS label
        b"CONNECT db-:5432 HTTP/1.1",
        b"CONNECT " + b"a" * 64 + b":5432 HTTP/1.1",
        b"CONNECT db:0 HTTP/1.1",
        b"CONNECT db:65536 HTTP/1.1",
        b"CONNECT db:123456 HTTP/1.1",
        b"CONNECT db: HTTP/1.1",
        b"CONNECT db HTTP/1.1",
        b"CONNECT 10.0.0.1:5432 HTTP/1.1",
    ],
)
def test_parse_request_refuses(head: bytes) -> None:
    with pytest.raises(InputError) as info:
        parse_request(head + b"\r\nHost: db:5432")
    assert info.value.field == "tunnel"


def test_parse_request_reads_only_the_request_line() -> None:
    assert parse_request(b"CONNECT a-1:1 HTTP/1.1") == Target("a-1", 1)
    assert parse_request(b"CONNECT db:00080 HTTP/1.1\r\nHost: other:1\r\nX: y") == Target("db", 80)
    assert parse_request(b"CONNECT " + b"a" * 63 + b":65535 HTTP/1.1") == Target("a" * 63, 65535)


def test_accepted_reply() -> None:
    head, rest = split_head(accepted() + b"data") or (b"", b"")
    assert rest == b"data"
    assert parse_reply(head) is None


@pytest.mark.parametrize("reason", list(Refusal))
def test_refusal_round_trip(reason: Refusal) -> None:
    reply = refused(reason)
    assert reply.startswith(f"HTTP/1.1 {reason.status} ".encode())
    parts = split_head(reply)
    assert parts is not None
    assert parts[1] == b""
    assert parse_reply(parts[0]) is reason


def test_refusal_statuses_and_retryable() -> None:
    assert {r: r.status for r in Refusal} == {
        Refusal.BAD_REQUEST: 400,
        Refusal.NOT_A_PEER: 403,
        Refusal.REVOKED: 403,
        Refusal.CALLER_NOT_ALLOWED: 403,
        Refusal.UNKNOWN_BACKEND: 404,
        Refusal.BACKEND_UNREACHABLE: 502,
        Refusal.CONNECTION_LIMIT: 503,
        Refusal.DRAINING: 503,
    }
    assert {r for r in Refusal if r.retryable} == {
        Refusal.BACKEND_UNREACHABLE,
        Refusal.CONNECTION_LIMIT,
        Refusal.DRAINING,
    }


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"HTTP/1.1 200 OK", None),
        (b"HTTP/1.1 200 ", None),
        (b"HTTP/1.1 200 Connection established\r\nx-teemesh-refusal: DRAINING", None),
        (b"HTTP/1.1 503 Service Unavailable\r\nX-TeeMesh-Refusal:   DRAINING  ", Refusal.DRAINING),
        (b"HTTP/1.1 503 x\r\nContent-Length: 0\r\nx-teemesh-refusal: REVOKED", Refusal.REVOKED),
        (b"HTTP/1.1 403 Forbidden", Refusal.BAD_REQUEST),  # no reason: not retryable
        (b"HTTP/1.1 503 x\r\nx-teemesh-refusal: SOMETHING_NEW", Refusal.BAD_REQUEST),
        (b"HTTP/1.1 503 x\r\nx-teemesh-refusal: draining", Refusal.BAD_REQUEST),
        (b"HTTP/1.1 503 x\r\nx-teemesh-refusal: \xff\xfe", Refusal.BAD_REQUEST),
        (b"HTTP/1.1 201 Created", Refusal.BAD_REQUEST),
    ],
)
def test_parse_reply(head: bytes, expected: Refusal | None) -> None:
    assert parse_reply(head) is expected


@pytest.mark.parametrize(
    "head",
    [b"", b"HTTP/1.0 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 200", b"SSH-2.0"],
)
def test_parse_reply_refuses(head: bytes) -> None:
    with pytest.raises(InputError, match="not a tunnel reply"):
        parse_reply(head)
