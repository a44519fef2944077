"""dstack-vpc's interfaces on the local platform, driven from inside the CVMs with curl as an app
written for dstack-vpc would: the client proxy (``compat.client_proxy``) into the mesh, to the
guest agent, and to the VPC API the coordinators serve (``coordinators.vpc``).

Needs root; the cluster comes up once for the module and is always taken down.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from localkit import teemesh

pytestmark = pytest.mark.e2e
SPEC = """
cluster: compat
tee: simulated
network: 10.82.0.0/24
kms: {count: 0}
coordinators: {vpc: {allowed: [web]}}
workload_groups:
  web:
    command: python -m teemesh.examples.starter --port 8080
    backends:
      web: {port: 8080, health: {http: /hello}}
    compat: {client_proxy: {}}
  api:
    replicas: 2
    command: python -m teemesh.examples.starter --port 9090
    backends:
      api: {port: 9090, health: {http: /hello}}
    routes:
      api: {backend: api, callers: [web]}
  ops:
    command: python -m teemesh.examples.starter --port 8080
    backends:
      ops: {port: 8080, health: {http: /hello}}
    compat: {client_proxy: {listen: "127.0.0.1:9091"}}
"""
PROXY = {"web-0": "http://127.0.0.1:8091", "ops-0": "http://127.0.0.1:9091"}


@dataclass
class Cluster:
    state: Path
    app_ids: dict[str, str]

    def curl(self, cvm: str, path: str, *headers: str, method: str = "GET") -> tuple[int, Any]:
        """(status, JSON body or text) of a request to ``cvm``'s client proxy."""
        flags = [arg for h in headers for arg in ("-H", h)]
        result = teemesh("exec", cvm, "--state", self.state, "--", "curl", "-sS", "--max-time",
                         "10", "-X", method, "-w", "\n%{http_code}", *flags,
                         f"{PROXY[cvm]}{path}")  # fmt: skip
        assert result.returncode == 0, result.stderr
        body, _, status = result.stdout.rpartition("\n")
        try:
            return int(status), json.loads(body)
        except ValueError:
            return int(status), body

    def to_app(self, app: str, port: int | None = None) -> list[str]:
        headers = [f"x-dstack-target-app: {self.app_ids[app]}"]
        return headers + ([f"x-dstack-target-port: {port}"] if port else [])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("the e2e tests make network namespaces: run them as root")
    home = tmp_path_factory.mktemp("compat")
    spec = home / "cluster.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    plan = teemesh("plan", spec, "--json")
    assert plan.returncode == 0, plan.stderr
    try:
        result = teemesh("up", spec, "--state", home / "state", timeout=150)
        assert result.returncode == 0, result.stdout + result.stderr
        yield Cluster(home / "state", json.loads(plan.stdout)["app_ids"])
    finally:
        teemesh("down", "--state", home / "state")


def test_the_client_proxy_reaches_an_app_through_the_mesh(cluster: Cluster) -> None:
    peers = set()
    for _ in range(6):
        status, body = cluster.curl("web-0", "/hello", *cluster.to_app("api", 9090))
        assert status == 200, body
        peers.add(body["peer_id"])
    assert peers <= {"api-0", "api-1"} and peers


def test_the_target_app_decides_the_callers_rule_applies(cluster: Cluster) -> None:
    status, body = cluster.curl("ops-0", "/hello", *cluster.to_app("api", 9090))
    assert status == 403, body
    status, body = cluster.curl("web-0", "/hello", *cluster.to_app("api", 9999))
    assert status == 404, body
    status, body = cluster.curl(
        "web-0", "/hello", *cluster.to_app("api"), "x-dstack-target-port: x"
    )
    assert status == 400 and "x-dstack-target-port" in json.dumps(body), body


def test_without_a_target_the_proxy_is_the_guest_agent(cluster: Cluster) -> None:
    status, info = cluster.curl("web-0", "/info")
    assert status == 200, info
    assert info["app_id"] == cluster.app_ids["web"]


def test_the_vpc_api_answers_allowed_apps_through_the_proxy(cluster: Cluster) -> None:
    vpc = cluster.to_app("coordinator")
    status, registered = cluster.curl("web-0", "/api/register?instance_id=web-0", *vpc)
    assert status == 200, registered
    assert registered["pre_auth_key"] is None and len(registered["shared_key"]) >= 64
    query = "uuid=web-0&node_type=app&hostname=web-0&tailscale_ip=10.82.0.50"
    status, updated = cluster.curl("web-0", f"/api/nodes/update?{query}", *vpc, method="POST")
    assert status == 200 and updated["status"] in ("created", "updated"), updated
    status, found = cluster.curl("web-0", "/api/discover/app", *vpc)
    assert status == 200 and found["count"] == 1, found
    assert found["nodes"][0]["hostname"] == "web-0"
    status, refused = cluster.curl("ops-0", "/api/register?instance_id=ops-0", *vpc)
    assert status == 403, refused
