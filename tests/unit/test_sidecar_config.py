"""The sidecar's configuration (``sidecar.config``): what loads, what is refused, and the VIPs.

Every refusal test starts from a document that loads and changes one thing, so the message it
expects can only come from that change.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from teemesh.config import ConfigError
from teemesh.errors import InputError
from teemesh.sidecar.config import (
    HealthCheck,
    SidecarConfig,
    hosts_lines,
    load_sidecar_config,
    parse_sidecar_config,
    route_vips,
)

PEM = "-----BEGIN PUBLIC KEY-----\nplatform\n-----END PUBLIC KEY-----\n"
BASE: dict[str, Any] = {
    "cluster": "demo",
    "group": "web",
    "peer_id": "web-1",
    "coordinators": ["https://127.0.0.1:8443/"],
    "coordinator_policy": {"tee": "simulated", "platform_key": PEM},
    "address": "10.0.0.1",
}


def config(**changes: Any) -> SidecarConfig:
    return parse_sidecar_config({**copy.deepcopy(BASE), **changes}, source="sidecar.yaml")


def problems(**changes: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(**changes)
    assert info.value.source == "sidecar.yaml"
    return info.value.problems


def test_defaults() -> None:
    c = config()
    assert c.coordinators == ("https://127.0.0.1:8443",)  # the trailing slash dropped
    assert c.ingress_port == 7443
    assert c.api == "127.0.0.1:7001"
    assert (c.backends, c.routes, c.vips()) == ({}, {}, {})
    assert c.coordinator_policy["platform_key"] == PEM


def test_config_is_frozen() -> None:
    c = config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.group = "db"  # type: ignore[misc]


def test_field_problems_are_all_reported_with_their_paths() -> None:
    found = problems(
        peer_id="Web_1",
        ingress="7443",
        max_connections=0,
        backends={"db": {"port": 70000, "owner": "someone"}},
        routes={"db": {"backend": "db", "port": 5432, "vip": "10.0.0.5", "callerz": ["web"]}},
        unknown=1,
    )
    paths = sorted(p.partition(": ")[0] for p in found)
    assert paths == [
        "backends.db.owner",
        "backends.db.port",
        "ingress",
        "max_connections",
        "peer_id",
        "routes.db.callerz",
        "routes.db.vip",
        "unknown",
    ]
    assert any("not a loopback address" in p for p in found)
    assert any("expected HOST:PORT, got '7443'" in p for p in found)


def test_missing_fields_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_sidecar_config({}, source="s")
    assert sorted(p.partition(": ")[0] for p in info.value.problems) == [
        "address",
        "cluster",
        "coordinator_policy",
        "coordinators",
        "group",
        "peer_id",
    ]


def test_coordinator_policy_is_checked() -> None:
    found = problems(coordinator_policy={"tee": "simulated"})
    assert len(found) == 1
    assert found[0].startswith("coordinator_policy: ")
    assert "platform_key" in found[0]


def test_bad_coordinator_url_is_reported_with_its_path_and_with_other_problems() -> None:
    found = problems(coordinators=["https://ok.example", "http://plain.example"], peer_id="X")
    assert sorted(p.partition(": ")[0] for p in found) == ["coordinators.1", "peer_id"]


def test_empty_coordinators_refused() -> None:
    assert [p.partition(": ")[0] for p in problems(coordinators=[])] == ["coordinators"]


@pytest.mark.parametrize("value", ["0.0.0.0:", ":7443", "host", "host:65536", "host:-1", "h:7a"])
def test_host_port_refused(value: str) -> None:
    found = problems(ingress=value)
    assert found == [f"ingress: expected HOST:PORT, got {value!r}"]


@pytest.mark.parametrize(("value", "port"), [("[::]:9443", 9443), ("10.0.0.1:1", 1)])
def test_ingress_port(value: str, port: int) -> None:
    assert config(ingress=value).ingress_port == port


def test_duplicate_listener_refused_naming_both_routes() -> None:
    routes = {
        "db": {"backend": "db", "port": 5432, "vip": "127.0.0.9"},
        "db-copy": {"backend": "db2", "port": 5432, "vip": "127.0.0.9"},
    }
    found = problems(routes=routes)
    assert len(found) == 1
    assert "routes.db-copy" in found[0]
    assert "like route db" in found[0]
    assert "127.0.0.9:5432" in found[0]


def test_same_vip_other_port_and_same_port_other_vip_allowed() -> None:
    c = config(
        routes={
            "a": {"backend": "a", "port": 80, "vip": "127.0.0.9"},
            "b": {"backend": "b", "port": 81, "vip": "127.0.0.9"},
            "c": {"backend": "c", "port": 80},
        }
    )
    assert c.vips() == {"a": "127.0.0.9", "b": "127.0.0.9", "c": "127.77.0.10"}


def test_explicit_vip_equal_to_an_allocated_one_is_skipped_not_shared() -> None:
    c = config(
        routes={
            "a": {"backend": "a", "port": 80},
            "b": {"backend": "b", "port": 80, "vip": "127.77.0.10"},
        }
    )
    assert c.vips() == {"a": "127.77.0.11", "b": "127.77.0.10"}


def test_route_port_must_match_local_backend_port() -> None:
    found = problems(
        backends={"db": {"port": 5433}},
        routes={"db": {"backend": "db", "port": 5432}},
    )
    assert len(found) == 1
    assert "routes.db: port 5432 but backend db serves on 5433" in found[0]
    # the same route to a backend served elsewhere, or on the same port here, is fine
    assert config(routes={"db": {"backend": "db", "port": 5432}}).routes["db"].port == 5432
    config(backends={"db": {"port": 5432}}, routes={"db": {"backend": "db", "port": 5432}})


def test_every_cross_field_problem_is_reported() -> None:
    found = problems(
        backends={"db": {"port": 5433}, "kv": {"port": 6380}},
        routes={"db": {"backend": "db", "port": 5432}, "kv": {"backend": "kv", "port": 6379}},
    )
    assert len(found) == 2, found
    assert any("routes.db" in p for p in found)
    assert any("routes.kv" in p for p in found)


def test_route_vips_skip_explicit_ones_and_keep_declaration_order() -> None:
    routes = config(
        routes={
            "a": {"backend": "a", "port": 1},
            "b": {"backend": "b", "port": 1, "vip": "127.77.0.11"},
            "c": {"backend": "c", "port": 1},
            "d": {"backend": "d", "port": 1, "vip": "127.77.0.10"},
            "e": {"backend": "e", "port": 1},
        }
    ).routes
    expected = {
        "a": "127.77.0.12",
        "b": "127.77.0.11",
        "c": "127.77.0.13",
        "d": "127.77.0.10",
        "e": "127.77.0.14",
    }
    assert route_vips(routes) == expected
    assert route_vips(dict(routes)) == expected  # a pure function: the same again
    # another sidecar reading the same document gets the same VIPs
    again = config(
        routes={
            k: {f: v for f, v in dataclasses.asdict(r).items() if v is not None}
            for k, r in routes.items()
        }
    )
    assert again.vips() == expected


def test_hosts_lines() -> None:
    c = config(routes={"db": {"backend": "db", "port": 5432}, "kv": {"backend": "kv", "port": 1}})
    assert hosts_lines(c) == "127.77.0.10 db\n127.77.0.11 kv\n"
    assert hosts_lines(config()) == ""


def test_callers_of() -> None:
    c = config(
        routes={
            "db": {"backend": "db", "port": 5432, "callers": ["web"]},
            "db-ro": {"backend": "db", "port": 5433, "callers": ["api", "web"], "role": "replica"},
            "kv": {"backend": "kv", "port": 6379, "callers": ["web"]},
            "kv-any": {"backend": "kv", "port": 6380},
            "q": {"backend": "q", "port": 1, "callers": []},
        }
    )
    assert c.callers_of("db") == frozenset({"web", "api"})
    assert c.callers_of("kv") is None  # one route lets every group call it
    assert c.callers_of("q") == frozenset()  # nobody
    assert c.callers_of("nothing") is None


def test_backend_health_check_defaults() -> None:
    c = config(
        backends={
            "web": {"port": 80},
            "db": {"port": 5432, "owner": "workload"},
            "api": {"port": 81, "owner": "workload", "health": {"http": "/ready", "rise": 3}},
        }
    )
    assert c.backends["web"].health_check() == HealthCheck()
    assert c.backends["db"].health_check() is None
    assert c.backends["api"].health_check() == HealthCheck(http="/ready", rise=3)
    assert c.backends["web"].host == "127.0.0.1"


@pytest.mark.parametrize("path", ["ready", "/a b", "/\x7f"])
def test_health_http_path_refused(path: str) -> None:
    found = problems(backends={"web": {"port": 80, "health": {"http": path}}})
    assert [p.partition(": ")[0] for p in found] == ["backends.web.health.http"]


def write(folder: Path, doc: Any) -> Path:
    path = folder / "sidecar.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_load_reads_platform_key_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "platform.pub").write_text(PEM)
    doc = copy.deepcopy(BASE)
    doc["coordinator_policy"]["platform_key"] = "keys/platform.pub"
    elsewhere = tmp_path / "conf"
    elsewhere.mkdir()
    (elsewhere / "keys").mkdir()
    (elsewhere / "keys" / "platform.pub").write_text("other")
    c = load_sidecar_config(write(tmp_path, doc))
    assert c.coordinator_policy["platform_key"] == PEM
    assert load_sidecar_config(write(elsewhere, doc)).coordinator_policy["platform_key"] == "other"


def test_load_keeps_an_inline_platform_key(tmp_path: Path) -> None:
    assert load_sidecar_config(write(tmp_path, BASE)).coordinator_policy["platform_key"] == PEM


def test_load_names_a_missing_platform_key_file(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["coordinator_policy"]["platform_key"] = "missing.pub"
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(write(tmp_path, doc))
    assert len(info.value.problems) == 1
    assert "platform_key" in info.value.problems[0]
    assert str(tmp_path / "missing.pub") in info.value.problems[0]


def test_load_reports_every_problem_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "group": "Web", "routes": {"db": {"port": 0}}})
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(path)
    assert info.value.source == str(path)
    assert sorted(p.partition(": ")[0] for p in info.value.problems) == [
        "group",
        "routes.db.backend",
        "routes.db.port",
    ]


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n", "42\n"])
def test_load_refuses_a_document_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(path)
    assert info.value.problems == ["(top level): expected a mapping"]


def test_load_refuses_bad_yaml_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("cluster: [demo\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_sidecar_config(path)
    with pytest.raises(ConfigError):
        load_sidecar_config(tmp_path / "absent.yaml")


def test_load_refuses_an_invalid_yaml_date_as_a_config_error(tmp_path: Path) -> None:
    """PyYAML turns ``2001-13-01`` into a date and raises ValueError on the bad month."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(BASE) + "peer_id: 2001-13-01\n")
    with pytest.raises(InputError):
        load_sidecar_config(path)
