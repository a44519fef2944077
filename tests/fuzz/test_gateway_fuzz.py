"""Fuzz the gateway's pure core: each parser returns a value or raises ``InputError``, nothing else.

Targets: ``parse_client_hello`` (arbitrary bytes, and real OpenSSL ClientHellos mutated,
re-framed and cut anywhere), ``parse_subdomain``, ``route_sni``, ``host_name`` and
``parse_app_address``. What parses must also round-trip or satisfy its invariants.
"""

from __future__ import annotations

from typing import Any

from fuzzkit import input_error_only
from hellokit import openssl_hello, reframe
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from teemesh.encoding import DNS_LABEL
from teemesh.errors import InputError
from teemesh.gateway.clienthello import MAX_CLIENT_HELLO, ClientHello, parse_client_hello
from teemesh.gateway.resolve import AppAddress, candidate_names, parse_app_address
from teemesh.gateway.sni import (
    CustomDomain,
    Destination,
    Mode,
    host_name,
    parse_subdomain,
    route_sni,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SMALL = settings(FUZZ, max_examples=120)  # slower examples: every cut of a ClientHello


HELLOS = [
    openssl_hello("myapp-443s.example.com", ["h2", "http/1.1"]),
    openssl_hello("shop.customer.org", [], tls12=True),
    openssl_hello(None, ["h2"]),
]
HELLOS += [reframe(HELLOS[0], 7), reframe(HELLOS[1], 100)]

# -- the ClientHello ---------------------------------------------------------------------------


def outcome(buffer: bytes) -> ClientHello | str | None:
    """The parser's answer, with every InputError the same answer ("error")."""
    try:
        return parse_client_hello(buffer)
    except InputError as exc:
        assert exc.field == "client_hello"
        assert exc.problem
        return "error"


def check_hello(buffer: bytes) -> ClientHello | str | None:
    result = outcome(buffer)
    if isinstance(result, ClientHello):
        assert 0 < result.record_bytes <= min(len(buffer), MAX_CLIENT_HELLO)
        assert outcome(buffer[: result.record_bytes]) == result
        if result.server_name is not None:
            assert host_name(result.server_name) == result.server_name
    return result


@st.composite
def mutated_hellos(draw: Any) -> bytes:
    """A real ClientHello with a few bytes changed, inserted or deleted, maybe cut short."""
    data = bytearray(draw(st.sampled_from(HELLOS)))
    for _ in range(draw(st.integers(1, 4))):
        # most structure sits in the first bytes and around the length fields; favour them
        pos = draw(st.integers(0, 80) | st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "add", "insert", "delete"]))
        if op == "set":
            data[pos] = draw(st.sampled_from([0, 1, 0xFF, 0x16, 0x03]) | st.integers(0, 255))
        elif op == "add":
            data[pos] = (data[pos] + draw(st.sampled_from([1, -1, 2, 0x80]))) % 256
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[pos : pos + draw(st.integers(1, 4))]
    return bytes(data)


handshake_like = st.builds(
    bytes.__add__,
    st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03", b"\x16\x03\x01\x00\x40\x01\x00\x00"]),
    st.binary(max_size=120),
)
wire = st.binary(max_size=200) | handshake_like | mutated_hellos()


@FUZZ
@given(wire)
@example(b"GET / HTTP/1.1\r\n\r\n")
@example(b"\x16\x03\x01\x00\x01\x01")
@example(b"\x16" * (MAX_CLIENT_HELLO + 1))
def test_client_hello_value_or_input_error(buffer: bytes) -> None:
    check_hello(buffer)


@FUZZ
@given(mutated_hellos(), st.lists(st.integers(0, 2000), max_size=8))
def test_client_hello_prefixes_agree(buffer: bytes, cuts: list[int]) -> None:
    """A prefix waits (None) or already answers as the whole does: read by read, the parser
    never refuses a ClientHello it would accept whole, nor accepts one it would refuse."""
    whole = check_hello(buffer)
    for cut in cuts:
        answer = outcome(buffer[:cut])
        assert answer is None or answer == whole, cut


@FUZZ_SMALL
@given(st.sampled_from(HELLOS) | mutated_hellos())
def test_client_hello_every_cut(buffer: bytes) -> None:
    whole = outcome(buffer)
    for cut in range(len(buffer)):
        answer = outcome(buffer[:cut])
        assert answer is None or answer == whole, cut


@FUZZ_SMALL
@given(st.sampled_from(HELLOS[:3]), st.integers(1, 600), st.binary(max_size=20))
def test_any_framing_gives_the_same_hello(hello: bytes, size: int, after: bytes) -> None:
    expected = parse_client_hello(hello)
    assert expected is not None
    records = reframe(hello, size)
    result = parse_client_hello(records + after)
    assert result == ClientHello(expected.server_name, expected.alpn, len(records))


# -- SNI routing and TXT values ----------------------------------------------------------------

NAME_CHARS = "abcgs0189-._AGSé\x00 +"
names = st.text(NAME_CHARS, max_size=24) | st.text(max_size=12)
subdomains = (
    st.from_regex(r"[a-z0-9]{1,8}(-[0-9]{0,6}[sg]{0,2})?", fullmatch=True)
    | st.from_regex(r"(health|gateway)(-[0-9]{0,3}[sg]{0,2})?", fullmatch=True)
    | names
)
BASES = frozenset({"example.com", "a.test"})


def render(destination: Destination) -> str:
    suffix = {Mode.TERMINATE: "", Mode.H2: "g", Mode.PASSTHROUGH: "s"}[destination.mode]
    return f"{destination.id}-{destination.port}{suffix}"


@FUZZ
@given(subdomains)
@example("myapp-443sg")
@example("health-s")
def test_parse_subdomain_value_or_input_error(subdomain: str) -> None:
    destination = input_error_only(parse_subdomain, subdomain)
    if destination is not None:
        assert 1 <= destination.port <= 65535
        assert DNS_LABEL.fullmatch(destination.id) and "-" not in destination.id
        assert parse_subdomain(render(destination)) == destination


@FUZZ
@given(
    st.builds(lambda sub, base: f"{sub}.{base}", subdomains, st.sampled_from([*BASES, "b.org"]))
    | names
)
def test_route_sni_value_or_input_error(server_name: str) -> None:
    route = input_error_only(route_sni, server_name, BASES)
    if isinstance(route, CustomDomain):
        assert host_name(route.name) == route.name
        assert route.name.partition(".")[2] not in BASES
        assert len(candidate_names(route.name)) == 3
    elif route is not None:
        assert isinstance(route, Destination)
        assert route == parse_subdomain(host_name(server_name).partition(".")[0])


@FUZZ
@given(names | st.from_regex(r"[a-z0-9-]{0,8}:[0-9+-]{0,7}", fullmatch=True))
def test_parse_app_address_value_or_input_error(text: str) -> None:
    address = input_error_only(parse_app_address, text)
    if address is not None:
        assert isinstance(address, AppAddress)
        assert parse_app_address(f"{address.app_id}:{address.port}") == address
