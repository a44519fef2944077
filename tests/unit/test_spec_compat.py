"""The anchors' interfaces in the cluster spec: a group's ``compat`` (dstack-vpc's client proxy
and auth service in its sidecars) and ``coordinators.vpc`` (dstack-vpc's VPC API)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from teemesh.attest.dstack import compose_hash
from teemesh.config import ConfigError
from teemesh.coordinator.policy import load_cluster_policy
from teemesh.sidecar.config import AuthService, ClientProxy, config_from_json
from teemesh.spec import (
    app_id,
    app_ids,
    cluster_policy,
    coordinator_attest_policy,
    group_app_compose,
    parse_spec,
    plan_cluster,
    sidecar_config,
)

PEM = "-----BEGIN PUBLIC KEY-----\nplatform\n-----END PUBLIC KEY-----\n"
BASE: dict[str, Any] = {
    "cluster": "vpc",
    "tee": "simulated",
    "workload_groups": {
        "web": {"replicas": 2, "command": "run-web"},
        "api": {
            "command": "run-api",
            "backends": {"api": {"port": 8080}},
            "routes": {"api": {"backend": "api", "callers": ["web"]}},
        },
    },
}
W = "workload_groups"


def spec_doc(**changes: Any) -> dict[str, Any]:
    """BASE with ``web.compat`` and ``coordinators`` from the keyword arguments."""
    doc = copy.deepcopy(BASE)
    if "compat" in changes:
        doc[W]["web"]["compat"] = changes["compat"]
    if "vpc" in changes:
        doc["coordinators"] = {"vpc": changes["vpc"]}
    return doc


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_spec(doc)
    return info.value.problems


def test_compat_goes_to_the_sidecars_of_its_group_only() -> None:
    plan = plan_cluster(
        parse_spec(spec_doc(compat={"client_proxy": {}, "auth": {"callers": ["api"]}}))
    )
    pin = coordinator_attest_policy(plan, PEM)
    web = config_from_json(sidecar_config(plan, "web-1", plan.coordinator_urls(), pin))
    assert web.client_proxy == ClientProxy(listen="127.0.0.1:8091")
    assert web.auth == AuthService(listen="127.0.0.1:8092", callers=("api",))
    api = config_from_json(sidecar_config(plan, "api-0", plan.coordinator_urls(), pin))
    assert api.client_proxy is None and api.auth is None


def test_compat_is_measured_only_when_set() -> None:
    plain = parse_spec(spec_doc())
    with_proxy = parse_spec(spec_doc(compat={"client_proxy": {"listen": "127.0.0.1:9091"}}))
    assert b"compat" not in group_app_compose(plain, "web")
    assert compose_hash(group_app_compose(with_proxy, "web")) != compose_hash(
        group_app_compose(plain, "web")
    )
    assert group_app_compose(with_proxy, "api") == group_app_compose(plain, "api")


@pytest.mark.parametrize("allowed", ["any", ["web"], ["web", "api"]])
def test_the_vpc_policy_names_the_allowed_groups_app_ids(allowed: Any, tmp_path: Path) -> None:
    plan = plan_cluster(parse_spec(spec_doc(vpc={"allowed": allowed})))
    doc = cluster_policy(plan, PEM)
    expected = "any" if allowed == "any" else [app_id(plan.spec, g) for g in allowed]
    assert doc["vpc"] == {"allowed_apps": expected}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    policy = load_cluster_policy(path)
    assert policy.vpc is not None
    assert policy.vpc.allows(app_id(plan.spec, "web"))
    assert policy.vpc.allows(app_id(plan.spec, "api")) == (allowed != ["web"])


def test_without_vpc_the_policy_has_no_vpc_section() -> None:
    assert "vpc" not in cluster_policy(plan_cluster(parse_spec(spec_doc())), PEM)


def test_app_ids_name_every_app_and_the_coordinators() -> None:
    spec = parse_spec(spec_doc())
    ids = app_ids(spec)
    assert set(ids) == {"web", "api", "coordinator"}
    assert ids["web"] == app_id(spec, "web")
    assert len(set(ids.values())) == 3 and all(len(i) == 40 for i in ids.values())


def test_unknown_groups_are_named() -> None:
    assert problems(spec_doc(vpc={"allowed": ["web", "nope"]})) == [
        "coordinators.vpc.allowed: no workload group named nope"
    ]
    assert problems(spec_doc(compat={"auth": {"callers": ["ghost"]}})) == [
        f"{W}.web.compat.auth.callers: no group named ghost"
    ]


@pytest.mark.parametrize(
    ("compat", "expected"),
    [
        ({"client_proxy": {"listen": "127.0.0.1:7001"}}, "client_proxy.listen: port 7001 is also "
         "the sidecar's API port"),
        ({"auth": {"listen": "0.0.0.0:7443"}}, "auth.listen: port 7443 is also the sidecar's "
         "ingress port"),
        ({"client_proxy": {"listen": "127.0.0.3:9000"}, "auth": {"listen": "127.0.0.3:9000"}},
         "auth.listen: port 9000 is also compat.client_proxy"),
        ({"auth": {"listen": "localhost:9000"}}, "auth.listen: 'localhost' is not "
         "an IP address to listen on"),
    ],
)  # fmt: skip
def test_compat_listeners_take_free_ports(compat: dict[str, Any], expected: str) -> None:
    assert problems(spec_doc(compat=compat)) == [f"{W}.web.compat.{expected}"]


def test_a_compat_listener_may_not_take_a_backends_port() -> None:
    doc = spec_doc()
    doc[W]["api"]["compat"] = {"client_proxy": {"listen": "127.0.0.1:8080"}}
    assert problems(doc) == [f"{W}.api.compat.client_proxy.listen: port 8080 is also backend api"]


@pytest.mark.parametrize("listen", ["0.0.0.0:8091", "10.0.0.5:8091", "localhost:8091"])
def test_the_client_proxy_listens_on_loopback_only(listen: str) -> None:
    """Whoever reaches it speaks as the CVM: in the mesh, to the VPC API, to its agent."""
    (problem,) = problems(spec_doc(compat={"client_proxy": {"listen": listen}}))
    assert problem.startswith(f"{W}.web.compat.client_proxy.listen: ")
    assert "loopback" in problem


def test_other_loopback_addresses_are_other_places() -> None:
    parse_spec(spec_doc(compat={"client_proxy": {"listen": "127.0.0.2:7001"}}))
