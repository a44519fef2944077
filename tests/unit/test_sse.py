"""The server-sent events parser: the WHATWG rules a catalog watch relies on, one per test."""

from __future__ import annotations

import json

import pytest

from teemesh.coordinator.http_catalog import sse
from teemesh.errors import PeerError
from teemesh.net.sse import SseEvent, SseParser


def parse(*chunks: bytes, max_line: int = 1024) -> list[SseEvent]:
    parser = SseParser(max_line=max_line)
    return [event for chunk in chunks for event in parser.feed(chunk)]


def bytewise(stream: bytes, max_line: int = 1024) -> list[SseEvent]:
    return parse(*(stream[i : i + 1] for i in range(len(stream))), max_line=max_line)


STREAM = b"id: 7\nevent: change\ndata: one\ndata: two\n\ndata: three\n\n"
EXPECTED = [SseEvent("change", "one\ntwo", "7"), SseEvent("message", "three", "7")]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_lf_crlf_and_cr_end_lines_alike(ending: bytes) -> None:
    stream = STREAM.replace(b"\n", ending)
    assert parse(stream) == EXPECTED
    assert bytewise(stream) == EXPECTED


def test_mixed_line_endings_in_one_stream() -> None:
    assert parse(b"data: a\r\ndata: b\rdata: c\n\r\n") == [SseEvent("message", "a\nb\nc", None)]


def test_a_crlf_split_across_chunks_is_one_line_end() -> None:
    expected = [SseEvent("message", "a\nb", None)]
    assert parse(b"data: a\r", b"\ndata: b\r\n\r\n") == expected
    assert parse(b"data: a\r", b"", b"\ndata: b\r\n\r\n") == expected  # an empty read between


def test_a_lone_cr_at_a_chunk_end_still_ends_the_line() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [SseEvent("message", "a", None)]
    assert parser.feed(b"data: b\r\r") == [SseEvent("message", "b", None)]


def test_comments_are_ignored_and_dispatch_nothing() -> None:
    stream = b": keepalive\n\n:\n\ndata: x\n: inside an event\ndata: y\n\n"
    assert parse(stream) == [SseEvent("message", "x\ny", None)]


def test_multi_line_data_keeps_empty_lines_and_inner_spaces() -> None:
    stream = b"data\ndata:\ndata:  two spaces\ndata:tight\ndata: a: b\n\n"
    assert parse(stream) == [SseEvent("message", "\n\n two spaces\ntight\na: b", None)]


def test_only_the_first_space_after_the_colon_is_dropped() -> None:
    assert parse(b"event:  x\ndata: y\n\n") == [SseEvent(" x", "y", None)]


def test_the_event_type_resets_after_each_dispatch() -> None:
    stream = b"event: snapshot\ndata: 1\n\ndata: 2\n\nevent: lost\n\ndata: 3\n\n"
    assert [(e.event, e.data) for e in parse(stream)] == [
        ("snapshot", "1"),
        ("message", "2"),
        ("message", "3"),  # an event without data is not dispatched, its type is forgotten
    ]


def test_the_id_persists_until_changed() -> None:
    parser = SseParser()
    events = parser.feed(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\nid\ndata: d\n\n")
    assert [e.id for e in events] == ["1", "1", "2", ""]
    assert parser.last_id == ""


def test_an_id_with_nul_is_ignored() -> None:
    parser = SseParser()
    events = parser.feed(b"id: 5\n\nid: 6\x007\ndata: a\n\n")
    assert events == [SseEvent("message", "a", "5")]
    assert parser.last_id == "5"


def test_an_id_survives_an_event_without_data() -> None:
    parser = SseParser()
    assert parser.feed(b"id: 9\n\n") == []
    assert parser.last_id == "9"
    assert parser.feed(b"data: x\n\n") == [SseEvent("message", "x", "9")]


def test_unknown_fields_are_ignored() -> None:
    assert parse(b"retry: 10\nfoo: bar\nDATA: no\ndata: yes\n\n") == [
        SseEvent("message", "yes", None)
    ]


def test_an_unfinished_event_is_not_dispatched() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\n\ndata: b\n") == [SseEvent("message", "a", None)]
    assert parser.feed(b"data: c") == []
    assert parser.feed(b"\n\n") == [SseEvent("message", "b\nc", None)]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert parse(b"data: \xff\xfe ok\n\n") == [SseEvent("message", "\ufffd\ufffd ok", None)]


def test_utf8_split_across_chunks_decodes_whole() -> None:
    stream = "data: é😀\n\n".encode()
    assert bytewise(stream) == [SseEvent("message", "é😀", None)]


def test_an_over_long_line_is_an_error_however_it_arrives() -> None:
    line = b"data: " + b"x" * 20
    with pytest.raises(PeerError, match="over 16 bytes"):
        parse(line, max_line=16)  # no line end yet: the buffer would grow without bound
    with pytest.raises(PeerError, match="over 16 bytes"):
        bytewise(line + b"\n\n", max_line=16)
    with pytest.raises(PeerError, match="over 16 bytes"):
        parse(line + b"\n\n", max_line=16)  # whole, in one read, with its line end


def test_a_line_of_exactly_max_line_bytes_is_fine() -> None:
    line = b"data: " + b"x" * 10  # 16 bytes
    assert parse(line + b"\n\n", max_line=16) == [SseEvent("message", "x" * 10, None)]
    assert bytewise(line + b"\r\n\r\n", max_line=16) == [SseEvent("message", "x" * 10, None)]


def test_what_the_coordinator_writes_parses_back() -> None:
    doc = {"revision": 12, "events": [{"type": "put", "key": "instances/web/a", "value": "é\n"}]}
    stream = sse("change", doc, 12) + b": keepalive\n\n" + sse("error", {"reason": "COMPACTED"})
    events = bytewise(stream)
    assert [(e.event, e.id) for e in events] == [("change", "12"), ("error", "12")]
    assert json.loads(events[0].data) == doc
    assert json.loads(events[1].data) == {"reason": "COMPACTED"}
