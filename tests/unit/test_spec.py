"""The cluster spec (``teemesh.spec``): what loads, what the plan lays out, what is refused.

Every refusal starts from the starter spec, which plans cleanly, and changes one thing, so the
message it expects can only come from that change.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from teemesh.attest.dstack import compose_hash, default_app_id
from teemesh.attest.simulated import OsImage, PlatformKey
from teemesh.cli import cli
from teemesh.config import ConfigError, parse_model
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.errors import InputError
from teemesh.sidecar.config import hosts_lines, load_sidecar_config
from teemesh.spec import (
    app_id,
    cluster_policy,
    command_env,
    coordinator_attest_policy,
    gateway_settings,
    group_app_compose,
    load_spec,
    parse_spec,
    plan_cluster,
    public_endpoints,
    sidecar_config,
    system_app_compose,
)

ROOT = Path(__file__).resolve().parents[2]
STARTER_FILE = ROOT / "examples" / "starter" / "cluster.yaml"
STARTER: dict[str, Any] = {
    "cluster": "starter",
    "tee": "simulated",
    "workload_groups": {
        "api": {
            "replicas": 2,
            "command": "python -m teemesh.examples.starter --port 8080",
            "backends": {"api": {"port": 8080, "public": True, "health": {"http": "/hello"}}},
            "routes": {"api": {"backend": "api"}},
        },
        "worker": {
            "replicas": 5,
            "command": ["python", "-m", "teemesh.examples.starter", "--port", "9090"],
            "backends": {"worker": {"port": 9090}},
            "routes": {"worker": {"backend": "worker", "callers": ["api"]}},
        },
    },
}
PEM = PlatformKey.generate().public_pem().decode()


def doc(change: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:
    out = copy.deepcopy(STARTER)
    if change:
        change(out)
    return out


def groups(d: dict[str, Any]) -> dict[str, Any]:
    return d["workload_groups"]  # type: ignore[no-any-return]


def problems(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_spec(d, source="cluster.yaml")
    assert info.value.source == "cluster.yaml"
    return info.value.problems


# -- what a valid spec plans to ----------------------------------------------------------------


def test_the_starter_plans_its_cvms_in_platform_order() -> None:
    plan = plan_cluster(parse_spec(doc()))
    assert plan.bridge == "10.77.0.1"
    assert [(c.name, c.role, c.group, c.index, c.address) for c in plan.cvms] == [
        ("kms-0", "kms", "kms", 0, "10.77.0.2"),
        ("coordinator-0", "coordinator", "coordinator", 0, "10.77.0.3"),
        ("api-0", "workload", "api", 0, "10.77.0.4"),
        ("api-1", "workload", "api", 1, "10.77.0.5"),
        *((f"worker-{i}", "workload", "worker", i, f"10.77.0.{6 + i}") for i in range(5)),
    ]
    assert plan.coordinator_urls() == ["https://10.77.0.3:8443"]
    assert plan.kms_urls() == ["https://10.77.0.2:8011"]
    assert plan.cvm("worker-4").address == "10.77.0.10"
    assert plan.hosts_lines().splitlines()[2] == "10.77.0.4 api-0"
    assert plan.warnings == ()


def test_the_starter_routes_get_vips_in_declaration_order() -> None:
    plan = plan_cluster(parse_spec(doc()))
    assert [
        (r.name, r.group, r.backend, r.port, r.vip, r.callers, r.public) for r in plan.routes
    ] == [
        ("api", "api", "api", 8080, "127.77.0.10", None, True),
        ("worker", "worker", "worker", 9090, "127.77.0.11", ("api",), False),
    ]


def test_the_example_file_is_the_starter() -> None:
    spec = load_spec(STARTER_FILE)
    plan = plan_cluster(spec)
    assert spec.tee == "simulated"
    assert [c.name for c in plan.cvms if c.role == "workload"] == [
        "api-0", "api-1", "worker-0", "worker-1", "worker-2", "worker-3", "worker-4",
    ]  # fmt: skip
    assert {r.name: (r.port, r.callers) for r in plan.routes} == {
        "api": (8080, None),
        "worker": (9090, ("api",)),
    }
    assert spec.workload_groups["api"].backends["api"].public
    assert "teemesh.examples.starter" in str(spec.workload_groups["worker"].command)


def test_a_network_and_ports_may_be_chosen() -> None:
    spec = parse_spec(doc(lambda d: d.update(network="192.168.5.0/28", sidecar={"ingress": 9443})))
    plan = plan_cluster(spec)
    assert plan.cvm("worker-4").address == "192.168.5.10"
    config = sidecar_config(plan, "api-0", ["https://x:1"], {"tee": "simulated"})
    assert config["ingress"] == "0.0.0.0:9443"


def test_pinned_vips_are_kept_and_others_skip_them() -> None:
    spec = parse_spec(
        doc(lambda d: groups(d)["worker"]["routes"]["worker"].update(vip="127.77.0.10"))
    )
    assert [(r.name, r.vip) for r in plan_cluster(spec).routes] == [
        ("api", "127.77.0.11"),
        ("worker", "127.77.0.10"),
    ]


def test_the_tee_defaults_to_tdx_and_then_needs_os_image_hashes() -> None:
    no_tee = doc(lambda d: d.pop("tee"))
    assert problems(no_tee) == [
        "os_image_hashes: tee tdx needs the dstack OS image hashes admission accepts"
    ]
    spec = parse_spec({**no_tee, "os_image_hashes": ["ab" * 32]})
    assert spec.tee == "tdx"
    assert cluster_policy(plan_cluster(spec))["groups"]["api"]["os_images"] == ["ab" * 32]


def test_a_group_without_command_or_compose_is_a_warning() -> None:
    spec = parse_spec(doc(lambda d: groups(d)["worker"].pop("command")))
    assert plan_cluster(spec).warnings == (
        "workload_groups.worker: no command and no compose: runs nothing",
    )


# -- plan-time checks: each broken spec with its exact problems ------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set ``a.b.c`` in the document (creating mappings on the way)."""

    def change(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d.setdefault(key, {})
        d[last] = value

    return change


def _both(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        for one in changes:
            one(d)

    return change


def _add_group(name: str, body: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda d: groups(d).update({name: body})


W = "workload_groups"
BROKEN: list[tuple[str, Callable[[dict[str, Any]], object], list[str]]] = [
    ("zero replicas", _set(f"{W}.api.replicas", 0),
     [f"{W}.api.replicas: Input should be greater than or equal to 1"]),
    ("a route name used by two groups",
     _set(f"{W}.api.routes.worker", {"backend": "api"}),
     [f"{W}.worker.routes.worker: route name already used by group api"]),
    ("a backend served by two groups",
     _set(f"{W}.api.backends.worker", {"port": 9090}),
     [f"{W}.worker.backends.worker: backend name already used by group api"]),
    ("a route to another group's backend",
     _set(f"{W}.api.routes.w2", {"backend": "worker"}),
     [f"{W}.api.routes.w2.backend: worker is served by group worker: declare the route there "
      "(a route is declared by the group that serves it)"]),
    ("a route to no backend",
     _set(f"{W}.api.routes.db", {"backend": "db"}),
     [f"{W}.api.routes.db.backend: group api has no backend db"]),
    ("a route on another port than its backend",
     _set(f"{W}.api.routes.api.port", 81),
     [f"{W}.api.routes.api.port: 81 but backend api serves on 8080 "
      "(a route listens on its backend's port)"]),
    ("a role on a platform-owned backend",
     _set(f"{W}.worker.routes.worker.role", "master"),
     [f"{W}.worker.routes.worker.role: roles are tags the workload sets, so backend worker "
      "needs owner: workload"]),
    ("callers naming no group",
     _set(f"{W}.worker.routes.worker.callers", ["api", "web", "gateway"]),
     [f"{W}.worker.routes.worker.callers: no group named web, gateway"]),
    ("a caller listed twice",
     _set(f"{W}.worker.routes.worker.callers", ["api", "api"]),
     [f"{W}.worker.routes.worker.callers: a group is listed twice"]),
    ("two backends on one port",
     _set(f"{W}.api.backends.admin", {"port": 8080}),
     [f"{W}.api.backends.admin.port: 8080 already used by backend api"]),
    ("a backend on the sidecar's ingress port",
     _set(f"{W}.api.backends.admin", {"port": 7443}),
     [f"{W}.api.backends.admin.port: 7443 is the sidecar's ingress port"]),
    ("a backend on the sidecar API's port",
     _set(f"{W}.api.backends.admin", {"port": 7001}),
     [f"{W}.api.backends.admin.port: 7001 is the sidecar API"]),
    ("the sidecar's two ports equal",
     _set("sidecar", {"ingress": 7001}),
     ["sidecar.api: port 7001 is also the sidecar's ingress port"]),
    ("two routes pinned to one VIP",
     lambda d: (_set(f"{W}.api.routes.api.vip", "127.77.1.1")(d),
                _set(f"{W}.worker.routes.worker.vip", "127.77.1.1")(d)),
     [f"{W}.worker.routes.worker.vip: 127.77.1.1 already used by route api"]),
    ("a VIP that is not loopback",
     _set(f"{W}.api.routes.api.vip", "10.0.0.1"),
     [f"{W}.api.routes.api.vip: 10.0.0.1 is not a loopback address (127.0.0.0/8)"]),
    ("a reserved group name",
     _add_group("gateway", {"replicas": 1}),
     [f"{W}.gateway: gateway is reserved for the platform's own CVMs"]),
    ("a group name that is no DNS label",
     _add_group("Web_1", {"replicas": 1}),
     [f"{W}.Web_1.[key]: 'Web_1' is not a DNS label (a-z, 0-9 and '-', at most 63)"]),
    ("a route name that is no DNS label",
     _set(f"{W}.api.routes.API", {"backend": "api"}),
     [f"{W}.api.routes.API.[key]: 'API' is not a DNS label (a-z, 0-9 and '-', at most 63)"]),
    ("a route named like a CVM",
     _set(f"{W}.worker.routes.api-0", {"backend": "worker"}),
     [f"{W}.worker.routes.api-0: route name is also the name of a CVM"]),
    ("a peer id longer than a DNS label",
     _add_group("g" * 61, {"replicas": 11}),
     [f"{W}.{'g' * 61}.replicas: peer id {'g' * 61}-10 is longer than a DNS label (63)"]),
    ("a network too small",
     _set("network", "10.1.2.0/29"),
     ["network: 10.1.2.0/29 has 6 host addresses; the cluster needs 10 (the bridge and 9 CVMs)"]),
    ("a public network",
     _set("network", "8.8.8.0/24"),
     ["network: 8.8.8.0/24 is not a private network (10/8, 172.16/12, 192.168/16)"]),
    ("several coordinators on the embedded store",
     _set("coordinators", {"count": 3}),
     ["coordinators.count: 3 coordinators share a catalog only with store: etcd "
      "(embedded is one SQLite file)"]),
    ("gateway transport without a gateway",
     _set("transport", "gateway"),
     ["transport: gateway needs a gateway section"]),
    ("OS image hashes in a simulated cluster",
     _set("os_image_hashes", ["ab" * 32]),
     ["os_image_hashes: only for tee tdx (a simulated image's hash derives from os_image)"]),
    ("an environment variable the platform sets",
     _set(f"{W}.api.compose_env", {"TEEMESH_PEER_ID": "x"}),
     [f"{W}.api.compose_env.TEEMESH_PEER_ID: set by the platform"]),
    ("an empty command",
     _set(f"{W}.api.command", " "),
     [f"{W}.api.command: an empty command runs nothing: leave the field out instead"]),
    ("a command of numbers",
     _set(f"{W}.api.command", ["python", 3]),
     [f"{W}.api.command: expected a command line, or a list of arguments (strings)"]),
    ("a NUL in the environment",
     _set(f"{W}.api.compose_env", {"A": "x\x00y"}),
     [f"{W}.api.compose_env.A: contains a NUL character"]),
    ("an unknown field",
     _set(f"{W}.api.backends.api.prot", 8080),
     [f"{W}.api.backends.api.prot: Extra inputs are not permitted"]),
    ("a compose file in a spec without a file",
     _set(f"{W}.api.compose", "compose.yaml"),
     [f"{W}.api.compose: compose files are read only from a spec file"]),
    ("no groups",
     _set(W, {}),
     [f"{W}: Dictionary should have at least 1 item after validation, not 0"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_a_broken_spec_names_each_problem(
    change: Callable[[dict[str, Any]], object], expected: list[str]
) -> None:
    assert problems(doc(change)) == expected


def test_every_plan_problem_is_reported_together() -> None:
    def change(d: dict[str, Any]) -> None:
        groups(d)["api"]["routes"]["worker"] = {"backend": "api"}
        groups(d)["worker"]["routes"]["worker"]["callers"] = ["web"]
        d["transport"] = "gateway"

    assert problems(doc(change)) == [
        "transport: gateway needs a gateway section",
        f"{W}.worker.routes.worker: route name already used by group api",
        f"{W}.worker.routes.worker.callers: no group named web",
    ]


def test_not_a_mapping() -> None:
    for d, got in ((None, "an empty document"), ([1], "list")):
        with pytest.raises(ConfigError) as info:
            parse_spec(d, source="s.yaml")
        assert info.value.problems == [f"(top level): expected a mapping, got {got}"]


def test_plan_cluster_refuses_an_unchecked_spec() -> None:
    from teemesh.spec import ClusterSpec

    bad = ClusterSpec.model_validate(doc(_set("transport", "gateway")))
    with pytest.raises(ConfigError, match="transport: gateway needs a gateway section"):
        plan_cluster(bad)


def test_an_unknown_cvm_is_named() -> None:
    plan = plan_cluster(parse_spec(doc()))
    with pytest.raises(InputError, match="no CVM named 'worker-5'"):
        plan.cvm("worker-5")


# -- load_spec: the file, and the compose files beside it --------------------------------------


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster: [\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    path.write_text(yaml.safe_dump(doc(_set("transport", "gateway"))))
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert info.value.problems == ["transport: gateway needs a gateway section"]
    assert str(path) in str(info.value)


def test_compose_files_are_read_beside_the_spec_and_measured(tmp_path: Path) -> None:
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "compose.yaml").write_text("services: {web: {image: nginx}}\n")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc(_set(f"{W}.api.compose", "api/compose.yaml"))))
    spec = load_spec(path)
    measured = json.loads(group_app_compose(spec, "api"))
    rendered = yaml.safe_load(measured["docker_compose_file"])
    assert rendered["services"]["web"]["image"] == "nginx"
    assert rendered["services"]["web"]["network_mode"] == "host"
    (tmp_path / "api" / "compose.yaml").write_text("services: {web: {image: evil}}\n")
    assert group_app_compose(load_spec(path), "api") != group_app_compose(spec, "api")
    (tmp_path / "api" / "compose.yaml").unlink()
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert info.value.problems == [
        f"{W}.api.compose: cannot read {tmp_path}/api/compose.yaml: No such file or directory"
    ]


# -- the measured app-compose ----------------------------------------------------------------


def test_the_app_compose_is_dstack_normalized_json() -> None:
    spec = parse_spec(doc(_set(f"{W}.api.compose_env", {"B": "2", "A": "1"})))
    raw = group_app_compose(spec, "api")
    measured = json.loads(raw)
    assert raw == json.dumps(measured, sort_keys=True, separators=(",", ":")).encode()
    assert measured["name"] == "starter-api"
    assert measured["runner"] == "docker-compose"
    # names only: values are not measured; the replica's own settings are env too
    assert measured["allowed_envs"] == [
        "A", "B", "TEEMESH_ADDRESS", "TEEMESH_COORDINATORS", "TEEMESH_INDEX", "TEEMESH_PEER_ID",
        "TEEMESH_PLATFORM_KEY",
    ]  # fmt: skip
    app = yaml.safe_load(measured["docker_compose_file"])["services"]["app"]
    assert app["entrypoint"] == ["/bin/sh", "-c", "python -m teemesh.examples.starter --port 8080"]
    assert app["environment"]["A"] == "${A}"
    assert measured["teemesh"]["sidecar"]["routes"]["api"] == {
        "backend": "api", "port": 8080, "role": None, "peer": None, "callers": None,
        "vip": "127.77.0.10",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("change", "same"),
    [
        (_set(f"{W}.worker.replicas", 9), True),  # a new replica admits nothing new
        (_set(f"{W}.worker.compose_env", {"K": "v"}), False),
        (_set(f"{W}.worker.routes.worker.callers", ["api", "worker"]), False),
        (_set(f"{W}.worker.command", "sh -c evil"), False),
        (_set(f"{W}.worker.backends.worker.public", True), True),  # no gateway, no change
        (_both(_set("gateway", {}), _set(f"{W}.worker.backends.worker.public", True)), False),
    ],
)
def test_what_changes_a_group_compose_hash(
    change: Callable[[dict[str, Any]], object], same: bool
) -> None:
    before = group_app_compose(parse_spec(doc()), "worker")
    after = group_app_compose(parse_spec(doc(change)), "worker")
    assert (before == after) is same


def test_groups_and_system_roles_have_distinct_composes() -> None:
    spec = parse_spec(doc())
    composes = [group_app_compose(spec, g) for g in ("api", "worker")]
    composes += [system_app_compose(spec, r) for r in ("coordinator", "kms", "gateway")]
    assert len(set(composes)) == 5
    with pytest.raises(InputError):
        system_app_compose(spec, "api")


# -- the admission policy ------------------------------------------------------------------


def test_the_cluster_policy_loads_as_a_cluster_policy() -> None:
    spec = parse_spec(doc())
    plan = plan_cluster(spec)
    loaded = parse_model(ClusterPolicy, cluster_policy(plan, PEM), source="policy")
    assert loaded.tee == "simulated"
    assert set(loaded.groups) == {"api", "worker"}
    worker = loaded.groups["worker"]
    assert worker.peer_ids == tuple(f"worker-{i}" for i in range(5))
    assert worker.services == ("worker",)
    assert worker.compose_hashes == (compose_hash(group_app_compose(spec, "worker")).hex(),)
    assert worker.os_images == (OsImage("dstack-0.5.7-sim").os_image_hash.hex(),)


def test_a_gateway_is_admitted_as_its_own_group() -> None:
    spec = parse_spec(doc(_set("gateway", {"base_domain": "mesh.example"})))
    policy = parse_model(ClusterPolicy, cluster_policy(plan_cluster(spec), PEM), source="p")
    assert policy.groups["gateway"].peer_ids == ("gateway-0",)
    assert policy.groups["gateway"].services == ()


def test_without_a_platform_key_the_simulated_policy_is_incomplete() -> None:
    policy = cluster_policy(plan_cluster(parse_spec(doc())))
    assert "platform_key" not in policy
    with pytest.raises(ConfigError, match="platform_key"):
        parse_model(ClusterPolicy, policy, source="p")


# -- sidecar configurations ------------------------------------------------------------------


def _sidecar_configs(tmp_path: Path, d: dict[str, Any]) -> dict[str, Any]:
    """Each sidecar CVM's configuration, written out and loaded as the sidecar loads it."""
    plan = plan_cluster(parse_spec(d))
    pin = coordinator_attest_policy(plan, PEM)
    loaded = {}
    for cvm in plan.cvms:
        if cvm.role not in ("workload", "gateway"):
            continue
        path = tmp_path / f"{cvm.name}.yaml"
        gateway = None
        if cvm.role == "gateway":
            gateway = gateway_settings(plan, certificate="/tls.pem", key="/tls.key")
        config = sidecar_config(plan, cvm, plan.coordinator_urls(), pin, gateway=gateway)
        path.write_text(yaml.safe_dump(config))
        loaded[cvm.name] = load_sidecar_config(path)
    return loaded


def test_every_sidecar_config_loads_and_all_agree_on_vips(tmp_path: Path) -> None:
    configs = _sidecar_configs(tmp_path, doc())
    assert sorted(configs) == ["api-0", "api-1", *(f"worker-{i}" for i in range(5))]
    vips = {name: c.vips() for name, c in configs.items()}
    assert all(v == {"api": "127.77.0.10", "worker": "127.77.0.11"} for v in vips.values())
    assert len({hosts_lines(c) for c in configs.values()}) == 1
    worker = configs["worker-3"]
    assert (worker.cluster, worker.group, worker.peer_id) == ("starter", "worker", "worker-3")
    assert worker.address == "10.77.0.9"
    assert worker.coordinators == ("https://10.77.0.3:8443",)
    assert list(worker.backends) == ["worker"]
    assert worker.callers_of("worker") == frozenset({"api"})
    assert configs["api-0"].backends["api"].health_check().http == "/hello"  # type: ignore[union-attr]


def test_a_public_backend_admits_the_gateway_too(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["gateway"] = {}
        groups(d)["api"]["routes"]["api"]["callers"] = ["worker"]

    configs = _sidecar_configs(tmp_path, doc(change))
    assert "gateway-0" in configs
    assert configs["gateway-0"].backends == {}
    assert configs["api-1"].callers_of("api") == frozenset({"worker", "gateway"})
    assert configs["api-1"].callers_of("worker") == frozenset({"api"})


def test_the_gateway_serves_the_public_backends_by_app_id(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["gateway"] = {"base_domain": "apps.example"}
        groups(d)["worker"]["backends"]["worker"]["public"] = True

    plan = plan_cluster(parse_spec(doc(change)))
    gateway = _sidecar_configs(tmp_path, doc(change))["gateway-0"].gateway
    assert gateway is not None
    assert (gateway.base_domain, gateway.listen) == ("apps.example", "0.0.0.0:443")
    assert [(b.group, b.backend, b.port) for b in gateway.public] == [
        ("api", "api", 8080), ("worker", "worker", 9090)
    ]  # fmt: skip
    api = app_id(plan.spec, "api")
    assert api == default_app_id(compose_hash(group_app_compose(plan.spec, "api"))).hex()
    assert public_endpoints(plan)[0]["host"] == f"{api}-8080.apps.example"
    with pytest.raises(InputError, match="needs its gateway settings"):
        sidecar_config(plan, "gateway-0", [], {})


def test_the_gateway_transport_sends_every_sidecar_through_the_gateway(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["gateway"] = {"port": 8443}
        d["transport"] = "gateway"

    configs = _sidecar_configs(tmp_path, doc(change))
    via = configs["worker-2"].via_gateway
    assert via is not None and via.base_domain == "teemesh.localhost"
    assert via.address == f"{plan_cluster(parse_spec(doc(change))).cvm('gateway-0').address}:8443"
    assert configs["gateway-0"].via_gateway is None  # the gateway dials instances directly
    assert _sidecar_configs(tmp_path, doc())["worker-2"].via_gateway is None


def test_platform_cvms_have_no_sidecar_and_no_command() -> None:
    plan = plan_cluster(parse_spec(doc()))
    with pytest.raises(InputError, match="coordinator-0 is a coordinator CVM"):
        sidecar_config(plan, "coordinator-0", [], {})
    with pytest.raises(InputError, match="kms-0 is a kms CVM"):
        command_env(plan, "kms-0")


def test_a_replica_command_sees_its_identity() -> None:
    plan = plan_cluster(parse_spec(doc(_set(f"{W}.worker.compose_env", {"LOG": "debug"}))))
    assert command_env(plan, "worker-4") == {
        "LOG": "debug",
        "TEEMESH_CLUSTER": "starter",
        "TEEMESH_GROUP": "worker",
        "TEEMESH_INDEX": "4",
        "TEEMESH_PEER_ID": "worker-4",
        "TEEMESH_ADDRESS": "10.77.0.10",
        "TEEMESH_SIDECAR_API": "http://127.0.0.1:7001",
    }
    spec = plan.spec
    assert spec.workload_groups["api"].argv() == [
        "/bin/sh", "-c", "python -m teemesh.examples.starter --port 8080",
    ]  # fmt: skip
    assert spec.workload_groups["worker"].argv() == [
        "python", "-m", "teemesh.examples.starter", "--port", "9090",
    ]  # fmt: skip


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_plan_json_is_the_plan_and_its_policy() -> None:
    result = CliRunner().invoke(cli, ["plan", str(STARTER_FILE), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [c["name"] for c in out["cvms"]][:4] == ["kms-0", "coordinator-0", "gateway-0", "api-0"]
    assert out["routes"][1] == {
        "name": "worker", "group": "worker", "backend": "worker", "port": 9090,
        "vip": "127.77.0.11", "role": None, "callers": ["api"], "public": False, "peer": None,
    }  # fmt: skip
    assert out["policy"]["groups"]["api"]["peer_ids"] == ["api-0", "api-1"]


def test_cli_plan_tables() -> None:
    result = CliRunner().invoke(cli, ["plan", str(STARTER_FILE)], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in ("worker-4", "10.77.0.10", "127.77.0.11", "worker-0..4", "any group"):
        assert text in result.output


def test_cli_plan_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc(_set("transport", "gateway"))))
    result = CliRunner().invoke(cli, ["plan", str(path)], terminal_width=200)
    assert result.exit_code == 2
    assert "transport: gateway needs a gateway section" in result.output
    assert str(path) in result.output
