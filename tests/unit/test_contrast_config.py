"""Contrast's sidecar settings (``sidecar.contrast``): the exact grammar, every refusal, and
how they combine with the rest of a sidecar configuration.

The grammar follows Contrast's ``service-mesh/config.go``: ``##`` between entries (empty ones
skipped), ``#`` between exactly three fields, Go's Atoi and ParseBool; ports are range-checked.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sidecar_config import BASE as SIDECAR_BASE

from teemesh.config import ConfigError
from teemesh.errors import InputError
from teemesh.sidecar.config import SidecarConfig, config_from_json, parse_sidecar_config
from teemesh.sidecar.contrast import (
    ContrastProxy,
    EgressEntry,
    Inbound,
    IngressEntry,
    from_environment,
    inbound,
    with_environment,
)

BASE: dict[str, Any] = SIDECAR_BASE | {
    "backends": {"web": {"port": 8080}, "metrics": {"port": 9100}}
}
IN, OUT, ADMIN = "EDG_INGRESS_PROXY_CONFIG", "EDG_EGRESS_PROXY_CONFIG", "EDG_ADMIN_PORT"


def sidecar(**changes: Any) -> SidecarConfig:
    return parse_sidecar_config({**copy.deepcopy(BASE), **changes}, source="sidecar.yaml")


def problems(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_environment(environ)
    assert info.value.source == "environment"
    return info.value.problems


def ingress(text: str) -> tuple[IngressEntry, ...]:
    proxy = from_environment({IN: text})
    assert proxy is not None
    return proxy.ingress


# -- the grammar -----------------------------------------------------------------------------


def test_a_full_setting() -> None:
    proxy = from_environment({
        IN: "web#8080#false##ssh#22#true",
        OUT: "db#127.137.0.1:5432#db.internal:5432##api#127.0.0.2:443#[fd00::1]:8443",
        ADMIN: "9901",
    })  # fmt: skip
    assert proxy == ContrastProxy(
        ingress=(IngressEntry("web", 8080, False), IngressEntry("ssh", 22, True)),
        egress=(EgressEntry("db", "127.137.0.1", 5432, "db.internal", 5432),
                EgressEntry("api", "127.0.0.2", 443, "fd00::1", 8443)),
        admin_port=9901,
    )  # fmt: skip


def test_no_variable_means_no_setting_and_an_empty_one_means_mtls_everywhere() -> None:
    assert from_environment({"PATH": "/bin"}) is None
    assert from_environment({IN: ""}) == ContrastProxy()
    assert from_environment({ADMIN: ""}) == ContrastProxy()
    assert from_environment({ADMIN: "0"}) == ContrastProxy()


def test_contrast_names_win_over_edg_ones() -> None:
    proxy = from_environment({
        IN: "old#1#true", "CONTRAST_INGRESS_PROXY_CONFIG": "new#2#true",
        OUT: "old#127.0.0.1:1#a:1", ADMIN: "3", "CONTRAST_ADMIN_PORT": "4",
    })  # fmt: skip
    assert proxy is not None
    assert [e.name for e in proxy.ingress] == ["new"]
    assert [e.name for e in proxy.egress] == ["old"]  # only EDG_ set: it counts
    assert proxy.admin_port == 4
    # present but empty still wins: Contrast's CLI sets the variable from an empty annotation
    proxy = from_environment({IN: "old#1#true", "CONTRAST_INGRESS_PROXY_CONFIG": ""})
    assert proxy == ContrastProxy()


def test_entries_split_on_double_hashes_and_empty_ones_are_skipped() -> None:
    assert ingress("##a#1#t####b#2#f##") == (
        IngressEntry("a", 1, True),
        IngressEntry("b", 2, False),
    )
    assert ingress("##") == ingress("####") == ()
    # three hashes: the split leaves '#b#2#t', four fields (as Go's strings.Split does)
    assert problems({IN: "a#1#t###b#2#t"}) == [
        f"{IN}: entry 2 '#b#2#t': expected 3 fields separated by '#', got 4"
    ]


@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_parse_bool_true(text: str) -> None:
    assert ingress(f"x#80#{text}")[0].disable_tls is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_parse_bool_false(text: str) -> None:
    assert ingress(f"x#80#{text}")[0].disable_tls is False


@pytest.mark.parametrize("text", ["", "yes", "no", "TRue", " true", "true ", "2", "on"])
def test_parse_bool_refuses_the_rest(text: str) -> None:
    (problem,) = problems({IN: f"x#80#{text}"})
    assert problem.startswith(f"{IN}: entry 1 'x#80#{text}': disableTLS {text!r} is not a boolean")


@pytest.mark.parametrize(
    ("text", "port"), [("80", 80), ("+80", 80), ("0080", 80), ("65535", 65535)]
)
def test_ports_read_like_atoi(text: str, port: int) -> None:
    assert ingress(f"x#{text}#t")[0].port == port


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("+", "port '+' is not a number"),
        (" 80", "port ' 80' is not a number"),
        ("8_0", "port '8_0' is not a number"),
        ("\u0668\u0660", "port '\u0668\u0660' is not a number"),  # Arabic-Indic digits
        ("0x50", "port '0x50' is not a number"),
        ("0", "port 0 is out of range (1-65535)"),
        ("-80", "port -80 is out of range (1-65535)"),
        ("65536", "port 65536 is out of range (1-65535)"),
    ],
)
def test_bad_ingress_ports(text: str, why: str) -> None:
    assert problems({IN: f"x#{text}#t"}) == [f"{IN}: entry 1 {f'x#{text}#t'!r}: {why}"]


def test_disabled_turns_ingress_off_and_only_exactly() -> None:
    assert from_environment({IN: "DISABLED"}) == ContrastProxy(ingress_disabled=True)
    assert problems({IN: "disabled"}) == [
        f"{IN}: entry 1 'disabled': expected 3 fields separated by '#', got 1"
    ]
    assert problems({IN: "DISABLED##"})  # not the keyword: an entry of one field


def test_bad_ingress_entries() -> None:
    assert problems({IN: "#80#t##a#1#t#x##b\x00#2#t##a#1##" + "y" * 100 + "#1#t#"}) == [
        f"{IN}: entry 1 '#80#t': the name is empty",
        f"{IN}: entry 2 'a#1#t#x': expected 3 fields separated by '#', got 4",
        f"{IN}: entry 3 'b\\x00#2#t': the name must be printable, at most 128 characters",
        f"{IN}: entry 4 'a#1': expected 3 fields separated by '#', got 2",
        f"{IN}: entry 5 {'y' * 80 + '...'!r}: expected 3 fields separated by '#', got 4",
    ]


def test_one_port_twice() -> None:
    assert problems({IN: "a#80#t##b#80#f"}) == [f"{IN}: port 80 appears in more than one entry"]
    assert ingress("a#80#t##b#80#1") == (IngressEntry("a", 80, True), IngressEntry("b", 80, True))


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("db#10.0.0.1:5432#db:5432", "listen address 10.0.0.1 is not in 127.0.0.0/8"),
        ("db#[::1]:5432#db:5432", "listen address '[::1]:5432' is not IPv4:PORT"),
        ("db#localhost:5432#db:5432", "listen address 'localhost:5432' is not IPv4:PORT"),
        ("db#127.0.0.1#db:5432", "listen address '127.0.0.1' is not IPv4:PORT"),
        ("db#127.0.0.1:0#db:5432", "listen port 0 is out of range (1-65535)"),
        ("db#127.0.0.1:99999#db:5432", "listen port 99999 is out of range (1-65535)"),
        ("db#127.0.0.1:5432#db", "remote 'db' is not HOST:PORT"),
        ("db#127.0.0.1:5432#:5432", "remote ':5432' is not HOST:PORT"),
        ("db#127.0.0.1:5432#d b:5432", "remote 'd b:5432' is not HOST:PORT"),
        ("db#127.0.0.1:5432#db:x", "remote port 'x' is not a number"),
        ("db#127.0.0.1:5432#db:70000", "remote port 70000 is out of range (1-65535)"),
        ("db#127.0.0.1:5432#127.0.0.1:5432", "the remote is the listen address itself (a loop)"),
        ("#127.0.0.1:5432#db:5432", "the name is empty"),
    ],
)
def test_bad_egress_entries(entry: str, why: str) -> None:
    assert problems({OUT: entry}) == [f"{OUT}: entry 1 {entry!r}: {why}"]


def test_egress_names_and_listen_addresses_are_unique() -> None:
    text = "a#127.0.0.1:1#x:1##a#127.0.0.1:2#x:1##b#127.0.0.1:1#x:1"
    assert problems({OUT: text}) == [
        f"{OUT}: name 'a' appears in more than one entry",
        f"{OUT}: listen address 127.0.0.1:1 appears in more than one entry",
    ]


@pytest.mark.parametrize(
    ("text", "why"),
    [("x", "port 'x' is not a number"), ("70000", "port 70000 is out of range (0-65535)"),
     ("-1", "port -1 is out of range (0-65535)")],
)  # fmt: skip
def test_bad_admin_ports(text: str, why: str) -> None:
    assert problems({ADMIN: text}) == [f"{ADMIN}: {why}"]


def test_every_problem_is_reported_at_once() -> None:
    found = problems({IN: "a#1#maybe##b#0#t", OUT: "c#10.0.0.1:1#x:1", "CONTRAST_ADMIN_PORT": "x"})
    assert [p.split(":")[0] for p in found] == [IN, IN, OUT, "CONTRAST_ADMIN_PORT"]


def test_errors_are_input_errors_naming_the_source() -> None:
    with pytest.raises(InputError, match=r"^environment: 1 problem\(s\):\n  - EDG_ADMIN_PORT"):
        from_environment({ADMIN: "x"})


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["EDG_INGRESS_PROXY_CONFIG", "EDG_EGRESS_PROXY_CONFIG",
                                        "EDG_ADMIN_PORT", "CONTRAST_INGRESS_PROXY_CONFIG"]),
                       st.text(max_size=60)))  # fmt: skip
def test_fuzz_any_text_parses_or_is_an_input_error(environ: dict[str, str]) -> None:
    with contextlib.suppress(InputError):
        from_environment(environ)


PIECES = st.sampled_from(["#", "##", "a", "web", "80", "+1", "0", "65536", "t", "false",
                          "127.0.0.1:", "10.0.0.1", ":", "[", "]", "::1", "db", "DISABLED",
                          "-", " ", "\x00", "9"])  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(PIECES, max_size=12).map("".join), st.lists(PIECES, max_size=12).map("".join),
       st.lists(PIECES, max_size=3).map("".join))  # fmt: skip
def test_fuzz_near_valid_text(ingress_text: str, egress_text: str, admin: str) -> None:
    """Strings made of the grammar's own pieces reach the deeper checks; and whatever parses
    passes the rest of the sidecar checks or fails them as an InputError too."""
    environ = {IN: ingress_text, OUT: egress_text, ADMIN: admin}
    try:
        proxy = from_environment(environ)
        with_environment(sidecar(), environ)
    except InputError:
        return
    assert proxy is not None
    assert all(1 <= e.port <= 65535 for e in proxy.ingress)
    assert all(e.listen_ip.startswith("127.") for e in proxy.egress)


# -- with the rest of the configuration ------------------------------------------------------


def test_inbound_listeners() -> None:
    config = with_environment(
        sidecar(backends={"web": {"port": 8080}, "ssh": {"port": 22, "host": "127.0.0.5"},
                          "db": {"port": 5432}}),
        {IN: "web#8080#false##ssh#22#true##extra#7000#0##admin#9901#true", ADMIN: "9901"},
    )  # fmt: skip
    assert inbound(config) == [
        Inbound("web", 8080, "tls", "127.0.0.1", "web"),
        Inbound("ssh", 22, "plain", "127.0.0.5", "ssh"),
        Inbound("extra", 7000, "tls", "127.0.0.1", None),
        Inbound("db", 5432, "mtls", "127.0.0.1", "db"),
    ]  # the admin entry is its exemption: the admin listener serves that port


def test_disabled_ingress_opens_no_listener() -> None:
    config = with_environment(sidecar(), {IN: "DISABLED", OUT: "db#127.0.0.9:5432#db:5432"})
    assert config.contrast is not None
    assert inbound(config) == []
    assert inbound(sidecar()) == []  # no setting at all


@pytest.mark.parametrize(
    ("entry", "what"),
    [("api#7001#true", "the sidecar's API"), ("cp#8091#true", "the client proxy"),
     ("auth#8092#false", "the auth service")],
)  # fmt: skip
def test_the_sidecars_own_loopback_services_stay_inside(entry: str, what: str) -> None:
    config = sidecar(api="127.0.0.1:7001", client_proxy={"listen": "127.0.0.1:8091"},
                     auth={"listen": "127.0.0.1:8092"})  # fmt: skip
    with pytest.raises(ConfigError) as info:
        with_environment(config, {IN: entry})
    name, port = entry.split("#")[:2]
    assert info.value.problems == [
        f"contrast: port {port} ({name}): is {what}, which stays inside the CVM (it acts as "
        "this CVM)"
    ]


def test_checks_against_the_sidecar_config() -> None:
    def refused(config: SidecarConfig, environ: dict[str, str]) -> list[str]:
        with pytest.raises(ConfigError) as info:
            with_environment(config, environ)
        return info.value.problems

    assert refused(sidecar(address="127.0.0.1"), {IN: ""}) == [
        f"contrast: port {p} ({n}): a listener on 127.0.0.1 would relay to itself; the app binds "
        "loopback, the sidecar the CVM's address"
        for n, p in (("web", 8080), ("metrics", 9100))
    ]
    assert refused(sidecar(address="0.0.0.0"), {ADMIN: "9901"})[0].startswith(
        "contrast: the ingress listeners bind address 0.0.0.0"
    )
    assert refused(sidecar(ingress="0.0.0.0:8443"), {IN: "x#8443#t"}) == [
        "contrast: port 8443 (x): is the sidecar's own ingress port"
    ]
    assert refused(sidecar(), {IN: "admin#9901#false", ADMIN: "9901"}) == [
        "contrast: port 9901 (admin): is the admin port (plain HTTP): list it with disableTLS "
        "true (the exemption Contrast needs) or not at all"
    ]
    assert refused(sidecar(), {ADMIN: "9100"}) == [
        "contrast: port 9100 (metrics): is the admin port too"
    ]
    routes = {"web": {"backend": "web", "port": 8080, "callers": ["ops"]},
              "db": {"backend": "db", "port": 5432, "vip": "127.0.0.9"}}  # fmt: skip
    environ = {IN: "web#8080#true", OUT: "db#127.0.0.9:5432#x:1"}
    assert refused(sidecar(routes=routes), environ) == [
        "contrast: port 8080 (web): backend web admits only some groups (its routes' callers), "
        "so it needs client certificates",
        "contrast: egress db listens where route db does (127.0.0.9:5432)",
    ]
    with_environment(sidecar(routes=routes), {IN: ""})  # mTLS: callers are checked


def test_a_config_file_section_or_the_environment_not_both() -> None:
    section = {"ingress": [{"name": "web", "port": 8080, "disable_tls": True}], "admin_port": 9901}
    config = sidecar(contrast=section)
    assert config.contrast == ContrastProxy((IngressEntry("web", 8080, True),), admin_port=9901)
    assert with_environment(config, {}) is config
    with pytest.raises(ConfigError, match="contrast section too"):
        with_environment(config, {IN: ""})
    with pytest.raises(ConfigError, match=r"contrast\.egress\.0\.listen_ip"):
        sidecar(contrast={"egress": [{"name": "x", "listen_ip": "10.0.0.1", "listen_port": 1,
                                      "remote_host": "x", "remote_port": 1}]})  # fmt: skip
    with pytest.raises(ConfigError, match="contrast: port 8080"):  # the cross-checks run too
        sidecar(contrast=section, address="127.0.0.1")


def test_the_setting_survives_the_launch_file() -> None:
    config = with_environment(sidecar(), {IN: "web#8080#true", OUT: "db#127.0.0.9:5432#db:5432",
                                          ADMIN: "9901"})  # fmt: skip
    doc = json.loads(json.dumps(dataclasses.asdict(config)))
    assert config_from_json(doc) == config
    assert config_from_json(json.loads(json.dumps(dataclasses.asdict(sidecar())))).contrast is None
