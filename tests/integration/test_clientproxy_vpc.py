"""dstack-vpc's VPC server through the client proxy: a node names the coordinators' app id in
``x-dstack-target-app`` and its sidecar passes the request to a coordinator's VPC API.

Two real coordinators on one real etcd; real sidecars of an allowed app (web) and of another
(ops). The coordinators see the sidecar's SVID, so the app they judge is the attested one.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from etcdkit import etcd_cluster
from meshkit import COORDINATOR_COMPOSE, ROGUE_COMPOSE, WEB_COMPOSE, Mesh
from procs import Proc, free_port
from serverkit import exchange
from sidecarkit import mesh_policy, run_sidecar

from teemesh.attest.dstack import compose_hash

pytestmark = [pytest.mark.integration, pytest.mark.etcd]

WEB_APP = compose_hash(WEB_COMPOSE)[:20].hex()
VPC_APP = compose_hash(COORDINATOR_COMPOSE)[:20].hex()
"""The coordinators' app id: dstack's default for the compose hash their policy pins."""


@dataclass
class World:
    mesh: Mesh
    urls: list[str]
    coordinators: list[Proc]
    web: int
    ops: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("clientproxy-vpc")
    mesh = Mesh(tmp)
    mesh_policy(mesh, {"web": (WEB_COMPOSE, []), "ops": (ROGUE_COMPOSE, [])},
                top=f"vpc:\n  allowed_apps: [{WEB_APP}]\n")  # fmt: skip
    (tmp / "etcd").mkdir()
    web, ops = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(etcd_cluster(tmp / "etcd", 1))
        store = ["--store", "etcd", "--etcd-endpoints", etcd[0].url]
        for name in "ab":
            agent, sock = mesh.coordinator_agent(f"coordinator-agent-{name}")
            stack.enter_context(agent)
            stack.enter_context(mesh.start_coordinator(sock, f"coordinator-{name}", *store))
        urls, procs = list(mesh.urls), list(mesh.coordinators)
        for name, compose, group, port in (("web-0", WEB_COMPOSE, "web", web),
                                           ("ops-0", ROGUE_COMPOSE, "ops", ops)):  # fmt: skip
            stack.enter_context(run_sidecar(mesh, name, compose, group,
                extra={"client_proxy": {"listen": f"127.0.0.1:{port}"}}))  # fmt: skip
        yield World(mesh, urls, procs, web, ops)


def vpc(port: int, method: str, path: str, **kwargs: object) -> httpx.Response:
    """As dstack-vpc's nodes call their VPC server: through the client proxy on ``port``."""
    headers = {"x-dstack-target-app": VPC_APP, "host": "vpc-server"}
    return httpx.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, timeout=15,
                         **kwargs)  # type: ignore[arg-type]  # fmt: skip


def test_register_gives_the_shared_key(world: World) -> None:
    reply = vpc(world.web, "GET", "/api/register", params={"instance_id": "x"})
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert len(base64.b64decode(doc["shared_key"])) == 64
    assert doc["server_url"] in world.urls  # the coordinator's own URL, not the client's Host
    assert doc["pre_auth_key"] is None
    again = vpc(world.web, "GET", "/api/register", params={"instance_id": "y"})
    assert again.json()["shared_key"] == doc["shared_key"]
    # the app id is hex, compared without case; the coordinator's own messages come back
    upper = {"x-dstack-target-app": VPC_APP.upper()}
    reply = httpx.get(f"http://127.0.0.1:{world.web}/api/register", headers=upper, timeout=15)
    assert (reply.status_code, reply.json()) == (400, {"error": "Missing required parameters"})


def test_nodes_update_then_discover(world: World) -> None:
    update = {"uuid": "e1", "node_type": "etcd", "hostname": "etcd-1",
              "tailscale_ip": "100.64.0.1"}  # fmt: skip
    reply = vpc(world.web, "POST", "/api/nodes/update", params=update, content=b"ignored")
    assert (reply.status_code, reply.json()) == (200, {"status": "created"})
    reply = vpc(world.web, "GET", "/api/discover/etcd")
    assert (reply.status_code, reply.json()) == (200, {
        "nodes": [{"hostname": "etcd-1", "tailscale_ip": "100.64.0.1", "uuid": "e1",
                   "hostname_with_port": "etcd-1:2379"}],
        "count": 1, "node_type": "etcd",
    })  # fmt: skip
    assert [n["uuid"] for n in vpc(world.web, "GET", "/api/nodes").json()["nodes"]] == ["e1"]
    reply = vpc(world.web, "DELETE", "/api/nodes/e1")
    assert (reply.status_code, reply.json()) == (200, {"status": "deleted"})
    reply = vpc(world.web, "GET", "/api/discover/etcd")
    assert (reply.status_code, reply.json()) == (404, {"error": "No etcd nodes found"})
    ping = vpc(world.web, "GET", "/api/ping")  # not JSON: passed through as it is
    assert (ping.status_code, ping.text, ping.headers["content-type"]) == (
        200, "pong", "text/plain; charset=utf-8",
    )  # fmt: skip


def test_an_app_not_allowed_is_refused(world: World) -> None:
    for method, path in (("GET", "/api/register?instance_id=x"), ("GET", "/api/nodes"),
                         ("POST", "/api/nodes/update?uuid=z"), ("GET", "/api/discover/etcd")):  # fmt: skip
        reply = vpc(world.ops, method, path)
        assert (reply.status_code, reply.json()) == (403, {"error": "Forbidden"}), path


def raw(port: int, data: bytes) -> bytes:
    return exchange(port, data, timeout=15)


def test_the_vpc_servers_health_check_passes(world: World) -> None:
    """dstack-vpc checks its VPC server's ``/health`` through the mesh: a coordinator answers."""
    reply = vpc(world.web, "GET", "/health")
    assert (reply.status_code, reply.text) == (200, "OK")
    assert vpc(world.web, "GET", "/health/x").status_code == 404


def test_only_the_vpc_api_is_reached(world: World) -> None:
    for path in ("/v1/catalog", "/healthz", "/v1/catalog/register"):
        reply = vpc(world.web, "GET" if "register" not in path else "POST", path)
        assert reply.status_code == 404
        assert repr(path) in reply.json()["error"]
    head = f"x-dstack-target-app: {VPC_APP}\r\nHost: vpc-server\r\n\r\n".encode()
    for target in (b"/api/../v1/catalog", b"/api/%2e%2e/v1/catalog"):
        reply = raw(world.web, b"GET " + target + b" HTTP/1.1\r\n" + head)
        assert reply.startswith(b"HTTP/1.1 404 "), reply
        assert b"only the VPC API" in reply
    # another app id still means catalog instances
    reply = httpx.get(f"http://127.0.0.1:{world.web}/api/nodes",
                      headers={"x-dstack-target-app": "ab" * 20}, timeout=15)  # fmt: skip
    assert reply.status_code == 404
    assert "no live instance of app" in reply.json()["error"]


def test_a_stopped_coordinator_leaves_the_other_to_answer(world: World) -> None:
    """Last: it stops coordinator a for good."""
    first = world.coordinators[0].process
    first.kill()
    first.wait(10)
    for n in range(4):
        reply = vpc(world.web, "GET", "/api/register", params={"instance_id": f"f{n}"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["server_url"] == world.urls[1]
    reply = vpc(world.web, "POST", "/api/nodes/update", params={"uuid": "f1", "hostname": "f"})
    assert (reply.status_code, reply.json()) == (200, {"status": "created"})
    assert vpc(world.ops, "GET", "/api/nodes").status_code == 403
