"""The anchors' interfaces in the cluster spec: a group's ``compat`` (dstack-vpc's client proxy
and auth service in its sidecars) and ``coordinators.vpc`` (dstack-vpc's VPC API)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from teemesh.attest.dstack import compose_hash
from teemesh.config import ConfigError
from teemesh.coordinator.policy import load_cluster_policy
from teemesh.sidecar.config import AuthService, ClientProxy, config_from_json, parse_sidecar_config
from teemesh.sidecar.contrast import ContrastProxy, EgressEntry, IngressEntry
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


# -- Contrast's sidecar settings -------------------------------------------------------------

CONTRAST = {"ingress": "open#9090#false##raw#9091#true", "egress": "api#127.0.0.10:8080#api:8080",
            "admin_port": 9901}  # fmt: skip


def test_contrast_settings_reach_the_sidecars_of_their_group_as_the_file_section() -> None:
    plan = plan_cluster(parse_spec(spec_doc(compat={"contrast": CONTRAST})))
    pin = coordinator_attest_policy(plan, PEM)
    doc = sidecar_config(plan, "web-1", plan.coordinator_urls(), pin)
    assert doc["contrast"] == {
        "ingress": [{"name": "open", "port": 9090, "disable_tls": False},
                    {"name": "raw", "port": 9091, "disable_tls": True}],
        "ingress_disabled": False,
        "egress": [{"name": "api", "listen_ip": "127.0.0.10", "listen_port": 8080,
                    "remote_host": "api", "remote_port": 8080}],
        "admin_port": 9901,
    }  # fmt: skip
    expected = ContrastProxy(
        (IngressEntry("open", 9090, False), IngressEntry("raw", 9091, True)),
        egress=(EgressEntry("api", "127.0.0.10", 8080, "api", 8080),),
        admin_port=9901,
    )
    # the file form (YAML) and the launch file's JSON read back to the same setting
    text = yaml.safe_dump({**doc, "coordinator_policy": {**pin, "platform_key": PEM}})
    assert parse_sidecar_config(yaml.safe_load(text), source="x").contrast == expected
    assert config_from_json(doc).contrast == expected
    assert "contrast" not in sidecar_config(plan, "api-0", plan.coordinator_urls(), pin)


@pytest.mark.parametrize(
    ("contrast", "section"),
    [
        ({"ingress": "DISABLED"}, {"ingress": [], "ingress_disabled": True, "egress": [],
                                   "admin_port": None}),
        ({"ingress": ""}, {"ingress": [], "ingress_disabled": False, "egress": [],
                           "admin_port": None}),
        ({"admin_port": "0"}, {"ingress": [], "ingress_disabled": False, "egress": [],
                               "admin_port": None}),
    ],
)  # fmt: skip
def test_contrast_settings_mean_what_the_variables_do(
    contrast: dict[str, Any], section: dict[str, Any]
) -> None:
    plan = plan_cluster(parse_spec(spec_doc(compat={"contrast": contrast})))
    pin = coordinator_attest_policy(plan, PEM)
    assert sidecar_config(plan, "web-0", plan.coordinator_urls(), pin)["contrast"] == section


def test_contrast_settings_are_measured() -> None:
    plain = parse_spec(spec_doc(compat={"client_proxy": {}}))
    with_contrast = parse_spec(spec_doc(compat={"client_proxy": {}, "contrast": CONTRAST}))
    measured = json.loads(group_app_compose(with_contrast, "web"))["teemesh"]["sidecar"]
    plan = plan_cluster(with_contrast)
    pin = coordinator_attest_policy(plan, PEM)
    assert measured["contrast"] == sidecar_config(plan, "web-0", [], pin)["contrast"]
    assert compose_hash(group_app_compose(with_contrast, "web")) != compose_hash(
        group_app_compose(plain, "web")
    )
    assert group_app_compose(with_contrast, "api") == group_app_compose(plain, "api")


@pytest.mark.parametrize(
    ("contrast", "expected"),
    [
        ({"ingress": "web#8080"}, ["ingress: entry 1 'web#8080': expected 3 fields separated "
                                   "by '#', got 2"]),
        ({"ingress": "a#1#true##b#x#maybe"}, ["ingress: entry 2 'b#x#maybe': "]),
        ({"egress": "db#10.0.0.1:5432#db:5432"}, ["egress: entry 1 'db#10.0.0.1:5432#db:5432': "
                                                  "listen address 10.0.0.1 is not in 127.0.0.0/8"]),
        ({"admin_port": 70000}, ["admin_port: port 70000 is out of range (0-65535)"]),
        ({"admin_port": "x", "egress": "a#127.0.0.9:1#b:1##a#127.0.0.8:1#b:1"},
         ["egress: name 'a' appears in more than one entry", "admin_port: port 'x' is not a "
          "number"]),
    ],
)  # fmt: skip
def test_malformed_contrast_settings_are_refused_naming_the_entry(
    contrast: dict[str, Any], expected: list[str]
) -> None:
    found = problems(spec_doc(compat={"contrast": contrast}))
    assert len(found) == len(expected), found
    for problem, start in zip(found, expected, strict=True):
        assert problem.startswith(f"{W}.web.compat.contrast.{start}"), problem


@pytest.mark.parametrize(
    ("group", "contrast", "expected"),
    [
        ("web", {"ingress": "x#7443#false"}, "port 7443 (x): is the sidecar's own ingress port"),
        ("web", {"ingress": "x#7001#false"}, "port 7001 (x): is the sidecar's API, which stays "
                                             "inside the CVM (it acts as this CVM)"),
        ("api", {"ingress": "api#8080#true"}, "port 8080 (api): backend api admits only some "
                                              "groups (its routes' callers), so it needs client "
                                              "certificates"),
        ("web", {"egress": "api#127.77.0.10:8080#api:8080"}, "egress api listens where route "
                                                             "api does (127.77.0.10:8080)"),
        ("web", {"egress": "x#127.0.0.1:7001#api:8080"}, "egress x listens where the sidecar's "
                                                         "API does (127.0.0.1:7001)"),
        ("api", {"egress": "x#127.0.0.1:8080#db:5432"}, "egress x listens where backend api "
                                                        "does (127.0.0.1:8080)"),
        ("web", {"admin_port": 7443}, "admin port 7443: is the sidecar's own ingress port"),
    ],
)  # fmt: skip
def test_contrast_settings_the_sidecar_would_refuse_are_refused_at_plan_time(
    group: str, contrast: dict[str, Any], expected: str
) -> None:
    doc = spec_doc()
    doc[W][group]["compat"] = {"contrast": contrast}
    assert problems(doc) == [f"{W}.{group}.compat.contrast: {expected}"]


def test_a_contrast_ingress_leaves_open_backends_without_callers_alone() -> None:
    doc = spec_doc()
    doc[W]["web"]["backends"] = {"web": {"port": 8080}}
    doc[W]["web"]["compat"] = {"contrast": {"ingress": "web#8080#false", "admin_port": 9901}}
    parse_spec(doc)


def test_an_egress_listener_on_a_routes_planned_vip_is_refused() -> None:
    """The VIP the plan gives a route that names none: the one every sidecar listens on."""
    vip = next(r.vip for r in plan_cluster(parse_spec(spec_doc())).routes if r.name == "api")
    found = problems(spec_doc(compat={"contrast": {"egress": f"x#{vip}:8080#api:1"}}))
    assert found == [f"{W}.web.compat.contrast: egress x listens where route api does "
                     f"({vip}:8080)"]  # fmt: skip
