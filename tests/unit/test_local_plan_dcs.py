"""The local platform's launch of a cluster whose coordinators serve a DCS (``coordinators.dcs``),
with per-replica and role routes: which processes the coordinator CVMs run, where the DCS
members listen, and how many instances each route waits for."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from teemesh.platform.local_plan import (
    DCS_PEER_PORT,
    STAGE_STORE,
    STAGE_WORKLOAD,
    Launch,
    ProcessSpec,
    launch,
    launch_files,
)
from teemesh.spec import parse_spec, plan_cluster

STATE = Path("/state")
DOC: dict[str, Any] = {
    "cluster": "pg",
    "tee": "simulated",
    "coordinators": {"count": 3, "store": "etcd", "dcs": {"port": 2479, "callers": ["db"]}},
    "workload_groups": {
        "db": {
            "replicas": 3,
            "command": "run-db",
            "backends": {"postgres": {"port": 5432, "owner": "workload"}, "api": {"port": 8008}},
            "routes": {
                "postgres-master": {"backend": "postgres", "role": "master"},
                "api": {"backend": "api", "per_replica": True, "callers": ["db"]},
            },
        },
        "web": {
            "replicas": 2,
            "command": "run-web",
            "backends": {"web": {"port": 8080}},
            "routes": {"web": {"backend": "web"}},
        },
    },
}


def spec_doc(dcs: bool = True) -> dict[str, Any]:
    doc = copy.deepcopy(DOC)
    if not dcs:
        del doc["coordinators"]["dcs"]
    return doc


def make(dcs: bool = True) -> Launch:
    plan = plan_cluster(parse_spec(spec_doc(dcs)))
    return launch(plan, STATE, Path("/spec/cluster.yaml"), "/bin/teemesh", b"seed", etcd="/e")


def process(record: Launch, cvm: str, name: str) -> ProcessSpec:
    found = [p for p in record.cvm(cvm).processes if p.name == name]
    assert len(found) == 1, [p.name for p in record.cvm(cvm).processes]
    return found[0]


def flag(p: ProcessSpec, name: str) -> str:
    """A flag of the command a process runs: etcd's, after ``teemesh store-member ... --``."""
    argv = p.argv[p.argv.index("--") + 1 :] if "--" in p.argv else p.argv
    return argv[argv.index(name) + 1]


def member_flags(p: ProcessSpec) -> tuple[str, ...]:
    """The ``teemesh store-member`` part of a store member's command line."""
    return p.argv[: p.argv.index("--")]


def test_each_coordinator_runs_both_etcd_members_and_a_sidecar() -> None:
    record = make()
    coordinators = [c for c in record.cvms if c.role == "coordinator"]
    assert [c.name for c in coordinators] == ["coordinator-0", "coordinator-1", "coordinator-2"]
    for cvm in coordinators:
        assert sorted(p.name for p in cvm.processes) == [
            "agent", "coordinator", "dcs", "etcd", "sidecar"
        ]  # fmt: skip
        assert cvm.api == "127.0.0.1:7001"
        assert cvm.group == "coordinator"


def test_without_dcs_a_coordinator_has_no_sidecar_and_no_api() -> None:
    cvm = make(dcs=False).cvm("coordinator-1")
    assert [p.name for p in cvm.processes] == ["agent", "etcd", "coordinator"]
    assert cvm.api is None


def test_the_dcs_member_listens_for_clients_on_loopback_and_peers_on_its_own_port() -> None:
    record = make()
    members = [c for c in record.cvms if c.role == "coordinator"]
    peers = ",".join(f"{c.name}=https://{c.address}:{DCS_PEER_PORT}" for c in members)
    assert DCS_PEER_PORT == 2390
    for cvm in members:
        dcs = process(record, cvm.name, "dcs")
        assert dcs.argv[dcs.argv.index("--") + 1] == "/e"
        assert dcs.stage == STAGE_STORE
        assert flag(dcs, "--name") == cvm.name
        assert flag(dcs, "--listen-client-urls") == "http://127.0.0.1:2479"
        assert flag(dcs, "--advertise-client-urls") == "http://127.0.0.1:2479"
        assert flag(dcs, "--listen-peer-urls") == f"https://{cvm.address}:2390"
        assert flag(dcs, "--initial-advertise-peer-urls") == f"https://{cvm.address}:2390"
        assert flag(dcs, "--initial-cluster") == peers
        assert flag(dcs, "--data-dir") == f"/state/cvms/{cvm.name}/dcs"
        assert dcs.ready_http is None  # the host cannot reach its loopback
        assert "--listen-metrics-urls" not in dcs.argv


def test_store_members_run_under_their_own_store_ca() -> None:
    record = make()
    for cvm in (c for c in record.cvms if c.role == "coordinator"):
        for store in ("etcd", "dcs"):
            wrapper = member_flags(process(record, cvm.name, store))
            assert wrapper[:2] == ("/bin/teemesh", "store-member")
            assert flag_in(wrapper, "--store") == store
            assert flag_in(wrapper, "--cluster") == "pg"
            assert flag_in(wrapper, "--tls-dir") == f"/state/cvms/{cvm.name}/{store}-tls"
            assert flag_in(wrapper, "--agent") == f"/state/cvms/{cvm.name}/agent.sock"
            assert cvm.address in wrapper and cvm.name in wrapper
            # the catalog's clients cross the bridge; the DCS's stay on loopback
            assert ("--client-tls" in wrapper) == (store == "etcd")


def flag_in(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_dcs_is_another_cluster_than_the_catalogs_etcd() -> None:
    record = make()
    etcd = process(record, "coordinator-2", "etcd")
    dcs = process(record, "coordinator-2", "dcs")
    address = record.cvm("coordinator-2").address
    assert flag(etcd, "--data-dir") == "/state/cvms/coordinator-2/etcd"
    assert flag(etcd, "--data-dir") != flag(dcs, "--data-dir")
    assert flag(etcd, "--initial-cluster-token") == "teemesh-pg-etcd"
    assert flag(dcs, "--initial-cluster-token") == "teemesh-pg-dcs"
    assert flag(etcd, "--listen-peer-urls") == f"https://{address}:2380"
    assert flag(etcd, "--listen-client-urls") == f"https://{address}:2379"
    assert flag(etcd, "--listen-metrics-urls") == f"http://{address}:2381"
    assert etcd.ready_http == f"http://{address}:2381/health"


def test_the_coordinator_sidecar_runs_with_the_workloads() -> None:
    record = make()
    sidecar = process(record, "coordinator-0", "sidecar")
    assert sidecar.stage == STAGE_WORKLOAD
    assert flag(sidecar, "--config") == "/state/cvms/coordinator-0/sidecar.yaml"
    assert flag(sidecar, "--agent") == "/state/cvms/coordinator-0/agent.sock"
    assert sidecar.argv[:3] == ("/bin/teemesh", "sidecar", "run")


def test_sidecar_configs_are_written_for_coordinators_only_with_dcs() -> None:
    def sidecar_files(dcs: bool) -> list[str]:
        plan = plan_cluster(parse_spec(spec_doc(dcs)))
        files = launch_files(plan, STATE, "PUB")
        return sorted(str(p) for p in files if p.name == "sidecar.yaml")

    workloads = [f"/state/cvms/{n}/sidecar.yaml" for n in ("db-0", "db-1", "db-2", "web-0",
                                                            "web-1")]  # fmt: skip
    coordinators = [f"/state/cvms/coordinator-{i}/sidecar.yaml" for i in range(3)]
    assert sidecar_files(dcs=True) == sorted(workloads + coordinators)
    assert sidecar_files(dcs=False) == sorted(workloads)


def test_a_coordinator_sidecar_config_is_secret_and_serves_the_dcs() -> None:
    plan = plan_cluster(parse_spec(spec_doc()))
    files = launch_files(plan, STATE, "PUB")
    data, secret = files[Path("/state/cvms/coordinator-1/sidecar.yaml")]
    assert secret is True
    config = yaml.safe_load(data)
    assert (config["group"], config["peer_id"]) == ("coordinator", "coordinator-1")
    assert list(config["backends"]) == ["etcd"]
    assert config["backends"]["etcd"]["port"] == 2479
    assert config["routes"]["etcd"]["callers"] == ["db"]


def test_workload_apps_get_a_data_dir_in_their_cvm() -> None:
    record = make()
    for name in ("db-0", "db-2", "web-1"):
        app = process(record, name, "app")
        assert app.env["TEEMESH_DATA_DIR"] == f"/state/cvms/{name}/data"
        assert app.env["TEEMESH_PEER_ID"] == name


def test_routes_wait_for_one_instance_per_role_or_peer_and_the_group_otherwise() -> None:
    record = make()
    assert record.instances == {
        "postgres-master": 1,
        "api-0": 1,
        "api-1": 1,
        "api-2": 1,
        "web": 2,
        "etcd": 3,
    }
    assert list(record.hosts) == list(record.instances)
    assert len(set(record.hosts.values())) == len(record.hosts)


def test_without_dcs_there_is_no_etcd_route() -> None:
    record = make(dcs=False)
    assert "etcd" not in record.instances
    assert record.instances["web"] == 2
