"""The coordinators' DCS (``coordinators.dcs``) and ``per_replica`` routes in the cluster spec.

Every spec here starts from a small one that plans cleanly and changes one thing, so a problem
it expects can only come from that change.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_spec import _set

from teemesh.attest.dstack import compose_hash
from teemesh.config import ConfigError
from teemesh.errors import InputError
from teemesh.sidecar.config import load_sidecar_config
from teemesh.spec import (
    checks,
    cluster_policy,
    coordinator_attest_policy,
    group_app_compose,
    parse_spec,
    plan_cluster,
    runs_sidecar,
    sidecar_config,
    system_app_compose,
)
from teemesh.spec.model import ClusterSpec

BASE: dict[str, Any] = {
    "cluster": "pg",
    "tee": "simulated",
    "coordinators": {"count": 3, "store": "etcd"},
    "workload_groups": {
        "db": {
            "replicas": 3,
            "command": "run-db",
            "backends": {"postgres": {"port": 5432}, "api": {"port": 8008}},
            "routes": {"postgres": {"backend": "postgres", "callers": ["db", "web"]}},
        },
        "web": {
            "replicas": 2,
            "command": "run-web",
            "backends": {"web": {"port": 8080}},
            "routes": {"web": {"backend": "web"}},
        },
    },
}
PEM = "-----BEGIN PUBLIC KEY-----\nplatform\n-----END PUBLIC KEY-----\n"
DCS = "coordinators.dcs"
W = "workload_groups"


def doc(change: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:
    out = copy.deepcopy(BASE)
    if change:
        change(out)
    return out


def with_dcs(**dcs: Any) -> dict[str, Any]:
    return doc(_set(DCS, {"callers": ["db"], **dcs}))


def per_replica(**route: Any) -> dict[str, Any]:
    body = {"backend": "api", "per_replica": True, "callers": ["db"], **route}
    return doc(_set(f"{W}.db.routes.api", body))


def problems(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_spec(d, source="cluster.yaml")
    assert info.value.source == "cluster.yaml"
    return info.value.problems


def spec_of(d: dict[str, Any]) -> ClusterSpec:
    return parse_spec(d)


# -- coordinators.dcs: what it plans to ------------------------------------------------------


def test_without_dcs_the_mesh_groups_are_the_workload_groups() -> None:
    spec = spec_of(doc())
    assert list(spec.mesh_groups()) == ["db", "web"]
    assert spec.coordinators.dcs is None


def test_dcs_makes_the_coordinators_a_mesh_group_serving_etcd() -> None:
    spec = spec_of(with_dcs())
    groups = spec.mesh_groups()
    assert list(groups) == ["db", "web", "coordinator"]
    coordinator = groups["coordinator"]
    assert coordinator.replicas == 3
    assert list(coordinator.backends) == ["etcd"]
    etcd = coordinator.backends["etcd"]
    assert etcd.port == 2379
    assert etcd.health is not None and etcd.health.http == "/health"
    route = coordinator.routes["etcd"]
    assert (route.backend, route.callers, route.vip) == ("etcd", ("db",), None)
    assert "coordinator" not in spec.workload_groups  # the spec's own groups are untouched


def test_dcs_fields_default_and_may_be_chosen() -> None:
    spec = spec_of(with_dcs(route="dcs", port=2400, vip="127.77.5.5"))
    dcs = spec.coordinators.dcs
    assert dcs is not None
    assert (dcs.route, dcs.port, dcs.callers, dcs.vip) == ("dcs", 2400, ("db",), "127.77.5.5")
    plan = plan_cluster(spec)
    route = {r.name: r for r in plan.routes}["dcs"]
    assert (route.group, route.backend, route.port, route.vip) == (
        "coordinator", "dcs", 2400, "127.77.5.5"
    )  # fmt: skip


def test_the_dcs_route_is_planned_after_the_workload_routes() -> None:
    plan = plan_cluster(spec_of(with_dcs()))
    assert [(r.name, r.group, r.backend, r.port, r.callers, r.peer) for r in plan.routes] == [
        ("postgres", "db", "postgres", 5432, ("db", "web"), None),
        ("web", "web", "web", 8080, None, None),
        ("etcd", "coordinator", "etcd", 2379, ("db",), None),
    ]
    assert [r.vip for r in plan.routes] == ["127.77.0.10", "127.77.0.11", "127.77.0.12"]
    assert [c.name for c in plan.replicas("coordinator")] == [
        "coordinator-0", "coordinator-1", "coordinator-2"
    ]  # fmt: skip


def test_the_policy_admits_the_coordinators_as_the_group_coordinator() -> None:
    spec = spec_of(with_dcs())
    plan = plan_cluster(spec)
    policy = cluster_policy(plan, PEM)
    assert list(policy["groups"]) == ["db", "web", "coordinator"]
    assert policy["groups"]["coordinator"] == {
        "compose_hashes": [compose_hash(system_app_compose(spec, "coordinator")).hex()],
        "os_images": policy["groups"]["db"]["os_images"],
        "key_providers": [{"name": "kms"}],
        "allowed_tcb_statuses": ["UpToDate"],
        "peer_ids": ["coordinator-0", "coordinator-1", "coordinator-2"],
        "services": ["etcd"],
    }
    assert "coordinator" not in cluster_policy(plan_cluster(spec_of(doc())))["groups"]


def test_the_policy_names_the_dcs_route_as_the_service() -> None:
    policy = cluster_policy(plan_cluster(spec_of(with_dcs(route="dcs"))))
    assert policy["groups"]["coordinator"]["services"] == ["dcs"]


def test_a_coordinator_sidecar_serves_etcd_with_an_http_health_check(tmp_path: Path) -> None:
    plan = plan_cluster(spec_of(with_dcs()))
    pin = coordinator_attest_policy(plan, PEM)
    config = sidecar_config(plan, "coordinator-1", plan.coordinator_urls(), pin)
    assert (config["group"], config["peer_id"]) == ("coordinator", "coordinator-1")
    assert config["address"] == plan.cvm("coordinator-1").address
    assert list(config["backends"]) == ["etcd"]
    assert config["backends"]["etcd"]["port"] == 2379
    assert config["backends"]["etcd"]["owner"] == "platform"
    assert config["backends"]["etcd"]["health"]["http"] == "/health"
    assert config["routes"]["etcd"] == {
        "backend": "etcd", "port": 2379, "role": None, "peer": None, "callers": ["db"],
        "vip": "127.77.0.12",
    }  # fmt: skip
    assert list(config["routes"]) == ["postgres", "web", "etcd"]
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_sidecar_config(path)
    assert loaded.callers_of("etcd") == frozenset({"db"})
    check = loaded.backends["etcd"].health_check()
    assert check is not None and check.http == "/health"


def test_every_sidecar_offers_the_dcs_route() -> None:
    plan = plan_cluster(spec_of(with_dcs()))
    config = sidecar_config(plan, "web-0", plan.coordinator_urls(), {})
    assert config["routes"]["etcd"]["vip"] == "127.77.0.12"
    assert list(config["backends"]) == ["web"]


def test_without_dcs_a_coordinator_runs_no_sidecar() -> None:
    plan = plan_cluster(spec_of(doc()))
    with pytest.raises(InputError, match="coordinator-0 is a coordinator CVM"):
        sidecar_config(plan, "coordinator-0", [], {})
    with pytest.raises(InputError, match="kms-0 is a kms CVM"):
        sidecar_config(plan_cluster(spec_of(with_dcs())), "kms-0", [], {})


@pytest.mark.parametrize(
    ("role", "plain", "dcs"),
    [
        ("workload", True, True),
        ("gateway", True, True),
        ("coordinator", False, True),
        ("kms", False, False),
    ],
)
def test_runs_sidecar(role: str, plain: bool, dcs: bool) -> None:
    assert runs_sidecar(spec_of(doc()), role) is plain
    assert runs_sidecar(spec_of(with_dcs()), role) is dcs


def test_the_coordinator_compose_measures_the_dcs() -> None:
    def compose(d: dict[str, Any]) -> bytes:
        return system_app_compose(spec_of(d), "coordinator")

    plain = compose(doc())
    dcs = compose(with_dcs())
    assert plain != dcs
    assert compose(with_dcs(callers=["db", "web"])) != dcs
    assert compose(with_dcs(port=2400)) != dcs
    assert compose(with_dcs(route="dcs")) != dcs
    # its VIP is measured: every sidecar's route table is (the same VIP gives the same bytes)
    assert compose(with_dcs(vip="127.77.9.9")) != dcs
    assert compose(with_dcs(vip="127.77.0.12")) == dcs
    measured = json.loads(dcs)["teemesh"]
    etcd = measured["sidecar"]["backends"]["etcd"]
    assert (etcd["port"], etcd["health"]["http"]) == (2379, "/health")
    assert measured["sidecar"]["routes"]["etcd"]["callers"] == ["db"]
    assert "compose_hashes" not in measured["sidecar"]["coordinator_policy"]  # its own
    assert "sidecar" not in json.loads(plain)["teemesh"]
    assert b"teemesh-dcs" in dcs and b"teemesh-dcs" not in plain
    # the KMS's compose does not depend on it
    assert system_app_compose(spec_of(doc()), "kms") == system_app_compose(
        spec_of(with_dcs()), "kms"
    )


# -- coordinators.dcs: what is refused --------------------------------------------------------


IN_COORDINATORS = "in the coordinator CVMs"


def test_the_dcs_port_may_not_be_the_coordinators_port() -> None:
    assert problems(with_dcs(port=8443)) == [
        f"{DCS}.port: 8443 is also the coordinators' port {IN_COORDINATORS}"
    ]
    d = with_dcs(port=9000)
    d["coordinators"]["port"] = 9000
    assert problems(d) == [f"{DCS}.port: 9000 is also the coordinators' port {IN_COORDINATORS}"]


@pytest.mark.parametrize(
    ("port", "what"),
    [
        (8443, "the coordinators' port"),
        (2379, "the catalog etcd's client port"),
        (2380, "the catalog etcd's peer port"),
        (2381, "the catalog etcd's metrics port"),
        (2390, "the DCS's peer port"),
    ],
)
def test_with_a_dcs_the_sidecar_ingress_takes_no_port_of_the_coordinator_cvms(
    port: int, what: str
) -> None:
    d = with_dcs(port=2479)
    d["sidecar"] = {"ingress": port}
    found = problems(d)
    assert f"sidecar.ingress: {port} is also {what} {IN_COORDINATORS}" in found, found


def test_loopback_and_the_cvm_address_are_different_places() -> None:
    d = with_dcs(port=2380)  # the DCS's clients on loopback, the catalog's peers on the address
    d["sidecar"] = {"api": 2379}
    spec_of(d)


def test_without_a_dcs_the_coordinator_cvms_run_no_sidecar() -> None:
    d = doc()
    d["sidecar"] = {"ingress": 2380}
    spec_of(d)


def test_the_dcs_route_may_not_take_a_workload_route_name() -> None:
    d = with_dcs(route="web")
    found = problems(d)
    assert f"{DCS}: route name already used by group web" in found
    # its backend is named as its route, so the backend clashes too
    assert f"{DCS}: backend name already used by group web" in found
    assert len(found) == 2


def test_the_dcs_route_may_not_take_a_workload_backend_name() -> None:
    d = with_dcs()
    d[W]["db"]["backends"]["etcd"] = {"port": 2379}
    assert problems(d) == [f"{DCS}: backend name already used by group db"]


def test_the_dcs_callers_must_be_groups() -> None:
    found = problems(with_dcs(callers=["db", "nosuch"]))
    assert len(found) == 1
    assert found[0].endswith("callers: no group named nosuch")
    assert found[0].startswith(DCS)


def test_the_dcs_callers_may_not_be_empty() -> None:
    found = problems(with_dcs(callers=[]))
    assert len(found) == 1
    assert found[0].startswith(f"{DCS}.callers: ")
    assert "at least 1 item" in found[0]


def test_the_dcs_callers_are_required() -> None:
    found = problems(doc(_set(DCS, {})))
    assert found == [f"{DCS}.callers: Field required"]


def test_the_dcs_port_may_not_be_a_sidecar_port() -> None:
    found = problems(with_dcs(port=7443))
    assert len(found) == 1
    assert found[0].startswith(DCS)
    assert found[0].endswith("7443 is the sidecar's ingress port")


def test_the_dcs_vip_may_not_be_taken_twice() -> None:
    d = with_dcs(vip="127.77.3.3")
    d[W]["web"]["routes"]["web"]["vip"] = "127.77.3.3"
    found = problems(d)
    assert len(found) == 1
    assert found[0].startswith(DCS)
    assert found[0].endswith("127.77.3.3 already used by route web")


# -- per_replica routes -------------------------------------------------------------------------


def test_a_per_replica_route_is_one_route_per_replica() -> None:
    plan = plan_cluster(spec_of(per_replica()))
    routes = {r.name: r for r in plan.routes}
    assert list(routes) == ["postgres", "api-0", "api-1", "api-2", "web"]
    assert [(routes[f"api-{i}"].peer, routes[f"api-{i}"].group) for i in range(3)] == [
        ("db-0", "db"), ("db-1", "db"), ("db-2", "db")
    ]  # fmt: skip
    for i in range(3):
        r = routes[f"api-{i}"]
        assert (r.backend, r.port, r.callers, r.role) == ("api", 8008, ("db",), None)
    vips = [r.vip for r in plan.routes]
    assert len(set(vips)) == len(vips)
    assert vips == [f"127.77.0.{10 + i}" for i in range(5)]
    assert routes["postgres"].peer is None


def test_served_routes_expand_only_per_replica_routes() -> None:
    group = spec_of(per_replica()).workload_groups["db"]
    served = dict(group.served_routes("db"))
    assert {n: (s.declared, s.peer) for n, s in served.items()} == {
        "postgres": ("postgres", None),
        "api-0": ("api", "db-0"),
        "api-1": ("api", "db-1"),
        "api-2": ("api", "db-2"),
    }
    assert served["api-1"].route is group.routes["api"]


def test_sidecars_get_the_per_replica_routes_with_their_peer(tmp_path: Path) -> None:
    plan = plan_cluster(spec_of(per_replica()))
    pin = coordinator_attest_policy(plan, PEM)
    config = sidecar_config(plan, "db-1", plan.coordinator_urls(), pin)
    assert {n: r["peer"] for n, r in config["routes"].items()} == {
        "postgres": None, "api-0": "db-0", "api-1": "db-1", "api-2": "db-2", "web": None
    }  # fmt: skip
    assert config["routes"]["api-2"] == {
        "backend": "api", "port": 8008, "role": None, "peer": "db-2", "callers": ["db"],
        "vip": "127.77.0.13",
    }  # fmt: skip
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_sidecar_config(path)
    assert loaded.routes["api-0"].peer == "db-0"
    assert loaded.routes["postgres"].peer is None


def test_a_per_replica_route_follows_the_replica_count() -> None:
    d = per_replica()
    d[W]["db"]["replicas"] = 1
    assert [r.name for r in plan_cluster(spec_of(d)).routes] == ["postgres", "api-0", "web"]


def test_a_per_replica_route_may_not_pin_a_vip() -> None:
    assert problems(per_replica(vip="127.77.9.9")) == [
        f"{W}.db.routes.api.vip: a per_replica route has one VIP per replica, picked for it"
    ]


def test_an_expanded_name_may_not_be_a_cvm_name() -> None:
    d = doc(_set(f"{W}.db.routes.db", {"backend": "api", "per_replica": True}))
    assert problems(d) == [
        f"{W}.db.routes.db: route name db-{i} is also the name of a CVM" for i in range(3)
    ]


def test_an_expanded_name_may_not_be_another_groups_route() -> None:
    d = per_replica()
    d[W]["web"]["routes"]["api-1"] = {"backend": "web"}
    assert problems(d) == [f"{W}.web.routes.api-1: route name already used by group db"]


def test_the_expanded_names_of_two_groups_may_not_clash() -> None:
    d = per_replica()
    d[W]["web"]["routes"]["api"] = {"backend": "web", "per_replica": True}
    assert problems(d) == [
        f"{W}.web.routes.api: route name api-{i} already used by group db" for i in range(2)
    ]


def measured_routes(d: dict[str, Any], group: str = "db") -> dict[str, Any]:
    measured = json.loads(group_app_compose(spec_of(d), group))["teemesh"]
    routes: dict[str, Any] = measured["sidecar"]["routes"]
    return routes


def test_per_replica_is_measured_as_the_names_it_serves() -> None:
    plain = measured_routes(doc())
    assert plain["postgres"] == {"backend": "postgres", "port": 5432, "role": None,
                                 "peer": None, "callers": ["db", "web"], "vip": "127.77.0.10"}  # fmt: skip
    # saying false is saying nothing: the compose (and so the app id) stays as it was
    said_false = doc(_set(f"{W}.db.routes.postgres.per_replica", False))
    assert group_app_compose(spec_of(said_false), "db") == group_app_compose(spec_of(doc()), "db")
    expanded = measured_routes(per_replica())
    assert [expanded[f"api-{i}"]["peer"] for i in range(2)] == ["db-0", "db-1"]
    assert "api" not in expanded
    one_route = doc(_set(f"{W}.db.routes.api", {"backend": "api", "callers": ["db"]}))
    assert measured_routes(one_route)["api"]["peer"] is None
    assert group_app_compose(spec_of(per_replica()), "db") != group_app_compose(
        spec_of(one_route), "db"
    )


def test_the_served_route_count_is_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "MAX_SERVED_ROUTES", 5)
    assert len(plan_cluster(spec_of(per_replica())).routes) == 5  # at the limit
    d = per_replica()
    d[W]["web"]["routes"]["web2"] = {"backend": "web"}
    assert problems(d) == [
        f"{W}: 6 routes (a per_replica route counts once per replica); at most 5"
    ]
    with_etcd = per_replica()
    with_etcd["coordinators"]["dcs"] = {"callers": ["db"]}  # the DCS route counts too
    assert problems(with_etcd) == [
        f"{W}: 6 routes (a per_replica route counts once per replica); at most 5"
    ]


# -- expanded names are names like any other -------------------------------------------------


def test_an_expanded_name_may_not_be_a_route_of_the_same_group() -> None:
    d = per_replica()
    d[W]["db"]["routes"]["api-0"] = {"backend": "api"}
    assert problems(d) == [
        "workload_groups.db.routes.api-0: route name is also the name of route api"
    ]


def test_an_expanded_name_must_be_a_dns_label() -> None:
    name = "r" * 62  # a label; r...r-0 is 64 characters, not one
    d = doc(_set(f"{W}.db.routes.{name}", {"backend": "api", "per_replica": True}))
    found = problems(d)
    assert (
        f"workload_groups.db.routes.{name}: route name {name}-0 is longer than a DNS label (63)"
        in found
    ), found


def test_a_workload_route_to_the_dcs_backend_names_coordinators_dcs() -> None:
    d = with_dcs()
    d[W]["db"]["routes"]["mine"] = {"backend": "etcd"}
    assert problems(d) == [
        f"{W}.db.routes.mine.backend: etcd is the coordinators' DCS, served only by its own "
        "route (coordinators.dcs.route)"
    ]
