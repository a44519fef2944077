"""Fuzz the server-sent events parser: how a stream is cut into reads never changes what it says.

Streams are rendered from events (with random line ends, comments, unknown fields and id
changes), so each has a known meaning to compare against; random bytes only ever parse or
raise ``PeerError``, and the same whichever way they are cut.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teemesh.errors import PeerError
from teemesh.net.sse import SseEvent, SseParser

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# field values: no line breaks (they would end the line), anything else including NUL and ':'
values = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=12)
endings = st.sampled_from([b"\n", b"\r\n", b"\r"])


@dataclass(frozen=True)
class Block:
    """One event as a server writes it, and what a client must make of it."""

    event: str | None
    data: tuple[str, ...]
    id: str | None
    noise: tuple[bytes, ...]  # comment and unknown-field lines, placed first


names = values.filter(lambda v: not v.startswith(" "))  # one leading space is the separator's
blocks = st.builds(
    Block,
    event=st.none() | names,
    data=st.lists(values, max_size=3).map(tuple),
    id=st.none() | values,
    noise=st.lists(
        st.sampled_from([b":", b": keepalive", b"retry: 5", b"foo: bar", b"Data: x", b"id:\x00"]),
        max_size=2,
    ).map(tuple),
)


@dataclass(frozen=True)
class Stream:
    data: bytes
    events: list[SseEvent]
    last_id: str | None


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    """A rendered stream and what it means (the WHATWG model, by hand)."""
    out, expected, last_id = bytearray(), [], None

    def end_line() -> None:  # after a CR, an LF would join it as CRLF: one line end, not two
        after_cr = out.endswith(b"\r")
        out.extend(draw(st.sampled_from([b"\r\n", b"\r"]) if after_cr else endings))

    for block in draw(st.lists(blocks, max_size=5)):
        lines = list(block.noise)
        if block.id is not None:
            lines.append(b"id: " + block.id.encode())
        if block.event is not None:
            lines.append(b"event: " + block.event.encode())
        lines += [b"data: " + d.encode() for d in block.data]
        for line in lines:
            out += line
            end_line()
        end_line()  # the blank line that dispatches
        if block.id is not None and "\0" not in block.id:
            last_id = block.id
        if block.data:
            expected.append(SseEvent(block.event or "message", "\n".join(block.data), last_id))
    return Stream(bytes(out), expected, last_id)


def parse(chunks: list[bytes], max_line: int = 1 << 20) -> list[SseEvent] | type[PeerError]:
    """The events of a stream read as ``chunks``, or PeerError; any other exception escapes."""
    parser = SseParser(max_line=max_line)
    out: list[SseEvent] = []
    try:
        for chunk in chunks:
            events = parser.feed(chunk)
            assert all(isinstance(e, SseEvent) for e in events)
            out += events
    except PeerError:
        return PeerError
    return out


@st.composite
def cuts(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at random places, empty reads included."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
    for at in draw(st.lists(st.integers(0, len(chunks)), max_size=3)):
        chunks.insert(at, b"")
    return chunks


@FUZZ
@given(stream=streams())
def test_a_stream_means_the_same_cut_at_every_boundary(stream: Stream) -> None:
    data = stream.data
    assert parse([data]) == stream.events
    for i in range(len(data) + 1):
        assert parse([data[:i], data[i:]]) == stream.events, i
        assert parse([data[:i], b"", data[i:]]) == stream.events, f"{i}, an empty read between"
    assert parse([data[i : i + 1] for i in range(len(data))]) == stream.events


@FUZZ
@given(stream=streams(), data=st.data())
def test_a_stream_means_the_same_cut_anywhere_with_empty_reads(
    stream: Stream, data: st.DataObject
) -> None:
    assert parse(data.draw(cuts(stream.data))) == stream.events


@FUZZ
@given(stream=streams(), data=st.data())
def test_the_last_id_is_the_last_valid_one_sent(stream: Stream, data: st.DataObject) -> None:
    """What a client resends as ``Last-Event-ID``, events with no data included."""
    parser = SseParser()
    for chunk in data.draw(cuts(stream.data)):
        parser.feed(chunk)
    assert parser.last_id == stream.last_id


random_bytes = st.binary(max_size=200) | st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b":", b" ", b"data", b"id", b"event", b"\x00", b"\xff"])
    | st.binary(max_size=6),
    max_size=40,
).map(b"".join)


@FUZZ
@given(raw=random_bytes, max_line=st.integers(1, 64), data=st.data())
def test_random_bytes_parse_or_raise_peer_error_the_same_however_cut(
    raw: bytes, max_line: int, data: st.DataObject
) -> None:
    whole = parse([raw], max_line)
    pieces = parse(data.draw(cuts(raw)), max_line)
    assert (whole is PeerError) == (pieces is PeerError), (whole, pieces)
    if whole is not PeerError:
        assert whole == pieces
    lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    assert (whole is PeerError) == (max(map(len, lines)) > max_line), "a line over max_line"
