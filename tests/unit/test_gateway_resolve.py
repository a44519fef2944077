"""Custom-domain resolution (``gateway.resolve``): TXT values, the names tried, the static resolver.

The DNS resolver runs against a real dnsmasq in tests/integration/test_gateway_dns.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from teemesh.errors import InputError
from teemesh.gateway.resolve import (
    AppAddress,
    DnsResolver,
    StaticResolver,
    candidate_names,
    parse_app_address,
)

APP = "3327603e03f5bd1f830812ca4a789277fc31f577"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{APP}:8090", AppAddress(APP, 8090)),
        (f" {APP}:443 ", AppAddress(APP, 443)),
        ("web:1", AppAddress("web", 1)),
        ("my-app:65535", AppAddress("my-app", 65535)),
    ],
)
def test_app_address(text: str, expected: AppAddress) -> None:
    assert parse_app_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected '<app_id>:<port>'"),
        (APP, "expected '<app_id>:<port>'"),
        (":8090", "app id ''"),
        (f"{APP.upper()}:8090", "lower-case"),
        ("a:b:8090", "app id 'a:b'"),
        ("my_app:80", "app id 'my_app'"),
        (f"{APP}:", "port ''"),
        (f"{APP}:0", "port '0'"),
        (f"{APP}:65536", "port '65536'"),
        (f"{APP}:80s", "port '80s'"),
        (f"{APP}:-1", "port '-1'"),
        (f"{APP}: 80", "port ' 80'"),
    ],
)
def test_bad_app_address(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        parse_app_address(text)
    assert info.value.field == "app_address"


def test_candidate_names() -> None:
    assert candidate_names("www.customer.org") == [
        "_dstack-app-address.www.customer.org",
        "_tapp-address.www.customer.org",
        "_dstack-app-address-wildcard.customer.org",
    ]
    assert candidate_names("WWW.Customer.Org.", compat=False) == [
        "_dstack-app-address.www.customer.org",
        "_dstack-app-address-wildcard.customer.org",
    ]
    assert candidate_names("a.b.c", prefix="_mesh") == [
        "_mesh.a.b.c", "_tapp-address.a.b.c", "_mesh-wildcard.b.c",
    ]  # fmt: skip
    assert candidate_names("localhost") == [
        "_dstack-app-address.localhost",
        "_tapp-address.localhost",
    ]


def lookup(resolver: StaticResolver, sni: str) -> AppAddress | None:
    return asyncio.run(resolver.lookup(sni))


RECORDS = {
    "_dstack-app-address.both.customer.org": "primary:1",
    "_tapp-address.both.customer.org": "legacy:2",
    "_tapp-address.old.customer.org": "legacy:3",
    "_dstack-app-address-wildcard.customer.org": "wild:4",
    "_dstack-app-address.bad.example.net": "nonsense",
}


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("both.customer.org", AppAddress("primary", 1)),
        ("old.customer.org", AppAddress("legacy", 3)),
        ("other.customer.org", AppAddress("wild", 4)),
        ("customer.org", None),  # the wildcard covers subdomains only
        ("a.other.customer.org", None),  # and one level only
        ("nothing.example.net", None),
    ],
)
def test_static_lookup_order(sni: str, expected: AppAddress | None) -> None:
    assert lookup(StaticResolver(RECORDS), sni) == expected


def test_static_without_compat_and_with_a_prefix() -> None:
    assert lookup(StaticResolver(RECORDS, compat=False), "old.customer.org") == AppAddress(
        "wild", 4
    )
    resolver = StaticResolver({"_mesh.a.test": "x:5", "_dstack-app-address.a.test": "y:6"}, "_mesh")
    assert lookup(resolver, "a.test") == AppAddress("x", 5)


def test_static_names_ignore_case() -> None:
    resolver = StaticResolver({"_DSTACK-App-Address.Shop.Test.": "shop:443"})
    assert lookup(resolver, "shop.test") == AppAddress("shop", 443)


def test_static_malformed_record() -> None:
    with pytest.raises(InputError, match="expected '<app_id>:<port>'") as info:
        lookup(StaticResolver(RECORDS), "bad.example.net")
    assert info.value.field == "_dstack-app-address.bad.example.net"


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "records.yaml"
    path.write_text(
        '_dstack-app-address.shop.test: "shop:443"\n'
        f"_tapp-address.old.test: {APP}:8090\n"
        "_dstack-app-address-wildcard.test: 'any:80'\n"
    )
    resolver = StaticResolver.from_file(path)
    assert lookup(resolver, "shop.test") == AppAddress("shop", 443)
    assert lookup(resolver, "old.test") == AppAddress(APP, 8090)
    assert lookup(resolver, "new.test") == AppAddress("any", 80)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# no custom domains yet\n")
    assert lookup(StaticResolver.from_file(empty), "shop.test") is None


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        ("- a\n- b\n", "expected a mapping of TXT name to value, got list", ""),
        ("a: [b\n", "not YAML", ""),
        ("\xff\xfe", "cannot read", ""),
        ("1: 'x:1'\n", "TXT name 1 is not a non-empty string", ""),
        ("'': 'x:1'\n", "TXT name '' is not a non-empty string", ""),
        ("_dstack-app-address.a.test: 1234:56\n", "quoted string", ": _dstack-app-address.a.test"),
        ("n.test:\n", "got NoneType", ": n.test"),
        ("n.test: 'x'\n", "expected '<app_id>:<port>'", ": n.test"),
        ("n.test: 'x:0'\n", "port '0'", ": n.test"),
        ("n.test: 'x:1'\nN.TEST.: 'y:2'\n", "the same TXT name twice", ": N.TEST."),
    ],
)
def test_from_file_errors(tmp_path: Path, text: str, message: str, where: str) -> None:
    path = tmp_path / "records.yaml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match=message) as info:
        StaticResolver.from_file(path)
    assert info.value.field == f"{path}{where}"


def test_from_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read the TXT records file"):
        StaticResolver.from_file(tmp_path / "missing.yaml")


def test_dns_resolver_needs_a_nameserver() -> None:
    with pytest.raises(InputError, match="empty list of nameservers"):
        DnsResolver([])
