"""Coordinators in high availability on the local platform: three coordinator CVMs, each with a
member of the etcd cluster their catalog lives in (``store: etcd``). Losing any one coordinator
CVM, etcd member included, changes nothing for the workloads: calls go on, and a rebooted
workload CVM is admitted again by the others. A coordinator CVM that comes back rejoins.

The cluster also runs the gateway transport: every tunnel between sidecars passes the gateway
in TLS passthrough, the mesh mTLS staying end to end.

Needs root; the cluster comes up once for the module and is always taken down.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from localkit import calls, store_peer_members, teemesh, wait_ready

pytestmark = pytest.mark.e2e
SPEC = """
cluster: ha
tee: simulated
network: 10.79.0.0/24
coordinators: {count: 3, store: etcd}
gateway: {publish: "127.0.0.1:8444"}
transport: gateway
workload_groups:
  api:
    command: python -m teemesh.examples.starter --port 8080
    backends:
      api: {port: 8080, health: {http: /hello}}
    routes:
      api: {backend: api}
  worker:
    replicas: 2
    command: python -m teemesh.examples.starter --port 9090
    backends:
      worker: {port: 9090, health: {http: /hello}}
    routes:
      worker: {backend: worker, callers: [api]}
"""


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the e2e tests make network namespaces: run them as root")
    home = tmp_path_factory.mktemp("ha")
    spec = home / "cluster.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    try:
        result = teemesh("up", spec, "--state", home / "state", timeout=150)
        assert result.returncode == 0, result.stdout + result.stderr
        yield home / "state"
    finally:
        teemesh("down", "--state", home / "state")


def processes(state: Path) -> dict[str, dict[str, str]]:
    doc = json.loads(teemesh("status", "--state", state, "--json").stdout)
    return {c["name"]: c["processes"] for c in doc["cvms"]}


def readmit(state: Path, cvm: str) -> None:
    """Reboot ``cvm`` and wait until it is admitted and routed to again."""
    result = teemesh("restart", cvm, "--state", state)
    assert result.returncode == 0, result.stderr
    wait_ready(state, timeout=45)


def test_every_coordinator_cvm_runs_an_etcd_member(state: Path) -> None:
    running = processes(state)
    for i in range(3):
        assert running[f"coordinator-{i}"] == {
            "agent": "running", "etcd": "running", "coordinator": "running"
        }  # fmt: skip
    tls = state / "cvms" / "coordinator-0" / "etcd-tls"
    member_list = teemesh("exec", "coordinator-0", "--state", state, "--",
                          "etcdctl", "--endpoints", "https://10.79.0.3:2379",
                          "--cacert", tls / "ca.crt", "--cert", tls / "member.crt",
                          "--key", tls / "member.key", "member", "list")  # fmt: skip
    assert member_list.returncode == 0, member_list.stderr
    assert all(f"coordinator-{i}" in member_list.stdout for i in range(3))


def member_tls(state: Path) -> list[str | Path]:
    """etcdctl's flags with coordinator-0's member certificate: files only a coordinator CVM
    has on dstack (the local platform keeps every CVM's files on this host)."""
    tls = state / "cvms" / "coordinator-0" / "etcd-tls"
    return ["--cacert", tls / "ca.crt", "--cert", tls / "member.crt", "--key", tls / "member.key"]


def test_a_workload_cvm_reads_nothing_from_the_catalogs_etcd(state: Path) -> None:
    """Clients need a certificate from the catalog's store CA, which only the coordinator app
    derives: a workload reaches the members on the bridge, and is refused."""
    ca = member_tls(state)[:2]

    def read(*flags: str | Path) -> subprocess.CompletedProcess[str]:
        return teemesh("exec", "api-0", "--state", state, "--", "etcdctl", *flags,
                       "--command-timeout=3s", "get", "--prefix", "/teemesh/")  # fmt: skip

    for refused in (read("--endpoints", "http://10.79.0.3:2379"),
                    read("--endpoints", "https://10.79.0.3:2379", *ca)):  # fmt: skip
        assert refused.returncode != 0 and "/teemesh/" not in refused.stdout, refused.stdout
    # the control: the same network path with a member's certificate reads the catalog
    allowed = read("--endpoints", "https://10.79.0.3:2379", *member_tls(state))
    assert allowed.returncode == 0 and "/teemesh/ha/" in allowed.stdout, allowed.stderr


def test_a_workload_cvm_cannot_talk_to_the_etcd_peers(state: Path) -> None:
    peer = "https://10.79.0.4:2380"  # coordinator-1's
    for cvm, certified in [("api-0", False), ("api-0", True)]:
        refused = store_peer_members(state, cvm, peer, "etcd", certified=certified)
        assert refused.returncode != 0 and "coordinator-1" not in refused.stdout, refused.stdout
    allowed = store_peer_members(state, "coordinator-0", peer, "etcd", certified=True)
    assert allowed.returncode == 0 and "coordinator-1" in allowed.stdout, allowed.stderr


def gateway_passages(state: Path) -> float:
    """How many tunnels the gateway passed to a sidecar's ingress (its own metrics)."""
    metrics = teemesh("exec", "gateway-0", "--state", state, "--",
                      "curl", "-sS", "http://127.0.0.1:7001/metrics")  # fmt: skip
    assert metrics.returncode == 0, metrics.stderr
    for line in metrics.stdout.splitlines():
        if line.startswith('teemesh_connections_total{direction="gateway",name="mesh"}'):
            return float(line.rpartition(" ")[2])
    return 0.0


def test_tunnels_between_sidecars_pass_the_gateway(state: Path) -> None:
    before = gateway_passages(state)
    doc = calls(state, "api-0", "http://worker:9090/hello", n=10)
    assert doc["errors"] == {} and len(doc["counts"]) == 2, doc
    assert gateway_passages(state) == before + 10
    refused = calls(state, "worker-0", "http://worker:9090/hello", n=2)  # callers: [api]
    assert refused["counts"] == {}, refused


def test_losing_a_coordinator_cvm_changes_nothing_for_workloads(state: Path) -> None:
    assert teemesh("kill", "coordinator-0", "--state", state).returncode == 0
    answered = calls(state, "api-0", "http://worker:9090/hello", n=10)
    assert answered["errors"] == {} and len(answered["counts"]) == 2, answered
    readmit(state, "worker-1")  # admitted by coordinator-1 or -2 through the two live members
    doc = calls(state, "api-0", "http://worker:9090/hello", n=10)
    assert doc["errors"] == {} and doc["counts"].get("worker-1"), doc


def test_a_coordinator_cvm_that_comes_back_rejoins(state: Path) -> None:
    assert teemesh("restart", "coordinator-0", "--state", state).returncode == 0
    # with coordinator-1's member gone too, etcd has a quorum only if coordinator-0's rejoined
    assert teemesh("kill", "coordinator-1", "--state", state).returncode == 0
    try:
        readmit(state, "worker-0")
        doc = calls(state, "api-0", "http://worker:9090/hello", n=10)
        assert doc["errors"] == {} and doc["counts"].get("worker-0"), doc
    finally:
        assert teemesh("restart", "coordinator-1", "--state", state).returncode == 0
