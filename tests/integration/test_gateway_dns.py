"""The gateway's DNS resolver against a real dnsmasq on loopback serving TXT records.

dnsmasq (Debian's dnsmasq-base, which scripts/test installs) answers for ``.test`` only: other
names there are NXDOMAIN, names elsewhere REFUSED.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from dnskit import dnsmasq as run_dnsmasq
from dnskit import free_udp_and_tcp_port

from teemesh.errors import InputError, PeerError
from teemesh.gateway.resolve import AppAddress, DnsResolver

pytestmark = pytest.mark.integration

WAIT = 10.0
RECORDS = {
    "_dstack-app-address.primary.test": ["primary:1"],
    "_tapp-address.legacy.test": ["legacy:2"],
    "_dstack-app-address-wildcard.wild.test": ["wild:3"],
    "_dstack-app-address.both.wild.test": ["first:4"],
    "_tapp-address.both.wild.test": ["second:5"],
    "_tapp-address.old.wild.test": ["second:6"],
    "_dstack-app-address.multi.test": ["multi:7", "other:8"],
    "_mesh.custom.test": ["custom:9"],
    "_dstack-app-address.bad.test": ["nonsense"],
    "_dstack-app-address.port.test": ["app:99999"],
}


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A dnsmasq serving RECORDS; yields its port."""
    extra = ["--host-record=_dstack-app-address.noanswer.wild.test,127.0.0.9"]
    with run_dnsmasq(tmp_path_factory.mktemp("dnsmasq"), RECORDS, extra) as port:
        yield port


def lookup(port: int, sni: str, **options: object) -> AppAddress | None:
    resolver = DnsResolver([("127.0.0.1", port)], **options)  # type: ignore[arg-type]
    return asyncio.run(resolver.lookup(sni))


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("primary.test", AppAddress("primary", 1)),
        ("PRIMARY.Test.", AppAddress("primary", 1)),
        ("legacy.test", AppAddress("legacy", 2)),
        ("anything.wild.test", AppAddress("wild", 3)),
        ("both.wild.test", AppAddress("first", 4)),  # the primary name before the legacy one
        ("old.wild.test", AppAddress("second", 6)),  # the legacy name before the wildcard
        ("noanswer.wild.test", AppAddress("wild", 3)),  # a name without TXT (NoAnswer)
        ("multi.test", AppAddress("multi", 7)),  # the first string
        ("nothing.test", None),
        ("wild.test", None),  # the wildcard covers subdomains only
        ("a.b.wild.test", None),  # and one level only
        ("custom.test", None),  # under another prefix
    ],
)
def test_lookup(dnsmasq: int, sni: str, expected: AppAddress | None) -> None:
    assert lookup(dnsmasq, sni) == expected


def test_without_compat(dnsmasq: int) -> None:
    assert lookup(dnsmasq, "old.wild.test", compat=False) == AppAddress("wild", 3)
    assert lookup(dnsmasq, "legacy.test", compat=False) is None
    assert lookup(dnsmasq, "both.wild.test", compat=False) == AppAddress("first", 4)


def test_prefix(dnsmasq: int) -> None:
    assert lookup(dnsmasq, "custom.test", prefix="_mesh") == AppAddress("custom", 9)
    assert lookup(dnsmasq, "primary.test", prefix="_mesh") is None


@pytest.mark.parametrize(
    ("sni", "message"),
    [("bad.test", "expected '<app_id>:<port>', got 'nonsense'"), ("port.test", "port '99999'")],
)
def test_malformed_record(dnsmasq: int, sni: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        lookup(dnsmasq, sni)
    assert info.value.field == f"_dstack-app-address.{sni}"


def test_a_refusing_server(dnsmasq: int) -> None:
    with pytest.raises(PeerError, match="REFUSED"):
        lookup(dnsmasq, "www.example.org")


def test_a_silent_server_times_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never read
        start = time.monotonic()
        with pytest.raises(PeerError, match=r"timed out after 0\.5 s"):
            lookup(silent.getsockname()[1], "primary.test", timeout=0.5)
        assert time.monotonic() - start < 1.5


def test_no_server_listening() -> None:
    port = free_udp_and_tcp_port()
    start = time.monotonic()
    with pytest.raises(PeerError):
        lookup(port, "primary.test", timeout=1.0)
    assert time.monotonic() - start < 2.5
