"""SNI routing (``gateway.sni``): dstack's ``<id>[-<port>][s|g]`` rule, written out as a table.

The rows come from the rule as dstack documents it (research/dstack.md, section 6.1), not from
the code: split on '-', at most two parts; strip a trailing 'g' (h2) and then a trailing 's'
(passthrough) from the part after the dash, never both; port 443 with 's', else 80.
"""

from __future__ import annotations

import pytest

from teemesh.errors import InputError
from teemesh.gateway.sni import (
    CustomDomain,
    Destination,
    Mode,
    host_name,
    parse_subdomain,
    route_sni,
)

T, H2, P = Mode.TERMINATE, Mode.H2, Mode.PASSTHROUGH
APP = "3327603e03f5bd1f830812ca4a789277fc31f577"

RULES: list[tuple[str, tuple[str, int, Mode] | str]] = [
    # subdomain, (id, port, mode) or the error it raises
    ("myapp", ("myapp", 80, T)),
    ("myapp-8080", ("myapp", 8080, T)),
    ("myapp-443s", ("myapp", 443, P)),
    ("myapp-s", ("myapp", 443, P)),
    ("myapps", ("myapps", 80, T)),  # suffixes only count after the dash
    ("myappg", ("myappg", 80, T)),
    ("myapp-g", ("myapp", 80, H2)),
    ("myapp-8080g", ("myapp", 8080, H2)),
    ("myapp-8443s", ("myapp", 8443, P)),
    ("myapp-80s", ("myapp", 80, P)),
    ("myapp-1", ("myapp", 1, T)),
    ("myapp-65535", ("myapp", 65535, T)),
    ("myapp-65535s", ("myapp", 65535, P)),
    ("myapp-0080", ("myapp", 80, T)),  # dstack parses leading zeros too
    (APP, (APP, 80, T)),
    (f"{APP}-8090", (APP, 8090, T)),
    (f"{APP}-s", (APP, 443, P)),
    ("a", ("a", 80, T)),
    ("9", ("9", 80, T)),
    ("gateway", ("gateway", 80, T)),
    ("gateway-9090", ("gateway", 9090, T)),
    ("gateway-s", ("gateway", 443, P)),
    ("health", ("health", 80, T)),
    ("health-80", ("health", 80, T)),
    ("health-g", ("health", 80, H2)),
    # errors
    ("myapp-8080-x", "more than one '-'"),
    ("my-app-80", "more than one '-'"),
    ("myapp-443sg", "'s' and 'g' together"),
    ("myapp-sg", "'s' and 'g' together"),
    ("myapp-443gs", "port '443g' is not a number"),
    ("myapp-gs", "port 'g' is not a number"),
    ("myapp-ss", "port 's' is not a number"),
    ("myapp-gg", "port 'g' is not a number"),
    ("myapp-x", "port 'x' is not a number"),
    ("myapp-0", "port '0' is not a number from 1 to 65535"),
    ("myapp-65536", "port '65536'"),
    ("myapp-100000", "port '100000'"),
    ("myapp-+80", "port '\\+80'"),
    ("myapp- 80", "port ' 80'"),
    ("myapp-", "nothing after '-'"),
    ("-80", "the id must be"),
    ("-s", "the id must be"),
    ("", "the id must be"),
    ("MyApp", "the id must be"),
    ("my_app", "the id must be"),
    ("a" * 64, "the id must be"),
    ("caf\u00e9", "the id must be"),
    ("health-443", "'health' is answered by the gateway on port 80"),
    ("health-s", "'health' is answered"),
    ("health-80s", "'health' is answered"),
    ("health-8080g", "'health' is answered"),
]


@pytest.mark.parametrize(("subdomain", "expected"), RULES, ids=[repr(r[0]) for r in RULES])
def test_rule(subdomain: str, expected: tuple[str, int, Mode] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(InputError, match=expected) as info:
            parse_subdomain(subdomain)
        assert info.value.field == "sni"
    else:
        assert parse_subdomain(subdomain) == Destination(*expected)


def test_reserved() -> None:
    assert parse_subdomain("health").reserved
    assert parse_subdomain("gateway-8000").reserved
    assert not parse_subdomain("healthy").reserved
    assert not parse_subdomain(APP).reserved


BASES = frozenset({"example.com", "apps.internal.test"})


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        ("myapp.example.com", Destination("myapp", 80, T)),
        ("myapp-443s.example.com", Destination("myapp", 443, P)),
        ("MyApp-8080G.Example.COM.", Destination("myapp", 8080, H2)),
        ("health.apps.internal.test", Destination("health", 80, T)),
        ("myapp.internal.test", CustomDomain("myapp.internal.test")),
        ("a.b.example.com", CustomDomain("a.b.example.com")),  # one level only, as in dstack
        ("example.com.evil.test", CustomDomain("example.com.evil.test")),
        ("www.customer.org", CustomDomain("www.customer.org")),
        ("customer.org", CustomDomain("customer.org")),
        ("my-app-x.customer.org", CustomDomain("my-app-x.customer.org")),
        ("xn--caf-dma.example.org", CustomDomain("xn--caf-dma.example.org")),
    ],
)
def test_route(server_name: str, expected: Destination | CustomDomain) -> None:
    assert route_sni(server_name, BASES) == expected


@pytest.mark.parametrize(
    ("server_name", "message"),
    [
        ("example.com", "is a base domain itself"),
        ("example.com.", "is a base domain itself"),
        ("localhost", "single label"),
        ("my-app-x.example.com", "more than one '-'"),
        ("myapp-sg.example.com", "'s' and 'g' together"),
        ("health-443.example.com", "'health' is answered"),
        ("my_app.example.com", "invalid label"),
        ("a..example.com", "invalid label ''"),
        (".example.com", "invalid label ''"),
        ("", "1 to 253 characters"),
        ("caf\u00e9.example.com", "not ASCII"),
        ("10.0.0.1", "an IP address"),
        ("a" * 64 + ".example.com", "invalid label"),
    ],
)
def test_route_errors(server_name: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        route_sni(server_name, BASES)
    assert info.value.field == "sni"


def test_host_name() -> None:
    assert host_name("A-1.Example.COM.") == "a-1.example.com"
    assert host_name("a" * 63 + ".b") == "a" * 63 + ".b"
    longest = ".".join(["a" * 63] * 3 + ["a" * 61])
    assert host_name(longest) == longest
    with pytest.raises(InputError, match="1 to 253"):
        host_name(longest + "a")
    with pytest.raises(InputError, match="1 to 253"):
        host_name(".")
    with pytest.raises(InputError) as info:
        host_name("a b", field="base_domain")
    assert info.value.field == "base_domain"
