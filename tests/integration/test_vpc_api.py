"""dstack-vpc's VPC API as its nodes use it: real coordinators on one real etcd, real agents.

Callers present the SVIDs their workloads were admitted with; the allowlist names the web app
(in upper case: the comparison ignores case) and not the db app. Nodes written through one
coordinator are read through another and outlive both; the shared key is the same everywhere.
With both apps allowed, each may change only the nodes it created.
"""

from __future__ import annotations

import base64
import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from etcdkit import etcd_cluster
from meshkit import DB_COMPOSE, WEB_COMPOSE, Mesh, group_yaml
from procs import free_port

from teemesh.attest.dstack import compose_hash
from teemesh.coordinator import vpc
from teemesh.coordinator.client import Svid
from teemesh.identity.certs import pem_pair

pytestmark = [pytest.mark.integration, pytest.mark.etcd]

WEB_APP = compose_hash(WEB_COMPOSE)[:20].hex()
DB_APP = compose_hash(DB_COMPOSE)[:20].hex()
GROUPS = group_yaml("web", WEB_COMPOSE) + group_yaml("db", DB_COMPOSE)
VPC_ON = f"vpc:\n  allowed_apps: [{WEB_APP.upper()}]\n"


@dataclass
class World:
    mesh: Mesh
    store: list[str]
    agents: dict[str, Path]
    ports: dict[str, int]
    identities: dict[str, tuple[Path, Path]]
    clients: list[httpx.Client] = field(default_factory=list)

    @contextlib.contextmanager
    def coordinator(self, name: str) -> Iterator[str]:
        """Coordinator ``name`` (a or b), always on its own port; yields its URL."""
        port = self.ports[name]
        with self.mesh.start_coordinator(
            self.agents[name], f"coordinator-{name}", *self.store, port=port
        ):
            yield f"https://127.0.0.1:{port}"

    def client(self, url: str, peer: str | None = "web-0") -> httpx.Client:
        """Trusts the mesh CA (the coordinators' RA-TLS chains end there); presents ``peer``'s
        SVID, or no certificate."""
        context = ssl.create_default_context(cafile=self.mesh.tmp / "coordinator-a/mesh-ca.crt")
        context.check_hostname = False
        if peer is not None:
            context.load_cert_chain(*self.identities[peer])
        client = httpx.Client(base_url=url, verify=context, timeout=10)
        self.clients.append(client)
        return client


def _write_identity(tmp: Path, name: str, svid: Svid) -> tuple[Path, Path]:
    cert, key = pem_pair(svid.certificate, svid.key)
    (tmp / f"{name}.crt").write_text(cert)
    (tmp / f"{name}.key").write_text(key)
    return tmp / f"{name}.crt", tmp / f"{name}.key"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("vpc")
    mesh = Mesh(tmp)
    mesh.write_policy(GROUPS, top=VPC_ON)
    (tmp / "etcd").mkdir()
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(etcd_cluster(tmp / "etcd", 1))
        store = ["--store", "etcd", "--etcd-endpoints", etcd[0].url]
        agents = {}
        for name in "ab":
            agent, agents[name] = mesh.coordinator_agent(f"coordinator-agent-{name}")
            stack.enter_context(agent)
        world = World(mesh, store, agents, {n: free_port() for n in "ab"}, {})
        with world.coordinator("a"):  # admissions live in etcd: they outlive this process
            for peer, compose, group in (("web-0", WEB_COMPOSE, "web"), ("db-0", DB_COMPOSE, "db")):
                svid, _ = stack.enter_context(mesh.admitted(peer, compose, group))
                world.identities[peer] = _write_identity(tmp, peer, svid)
        yield world


@pytest.fixture(autouse=True)
def _close_clients(world: World) -> Iterator[None]:
    yield
    while world.clients:
        world.clients.pop().close()


def test_two_coordinators_serve_one_vpc_as_dstack_vpc_does(world: World) -> None:
    with world.coordinator("a") as url_a, world.coordinator("b") as url_b:
        a, b = world.client(url_a), world.client(url_b)

        # register: the same shared key from both, each one's own URL, never a pre-auth key
        replies = [c.get("/api/register", params={"instance_id": "i-1"}) for c in (a, b)]
        assert [r.status_code for r in replies] == [200, 200]
        docs = [r.json() for r in replies]
        assert docs[0]["shared_key"] == docs[1]["shared_key"]
        assert len(base64.b64decode(docs[0]["shared_key"])) == 64
        assert [d["server_url"] for d in docs] == [url_a, url_b]
        assert docs[0]["pre_auth_key"] is None and set(docs[0]) == {
            "pre_auth_key", "shared_key", "server_url",
        }  # fmt: skip
        reply = a.get("/api/register", params={"node_name": "n"})
        assert (reply.status_code, reply.json()) == (400, {"error": "Missing required parameters"})

        # update through a: created, then merged; read through b
        update = "/api/nodes/update"
        reply = a.post(update, params={"uuid": "e1", "node_type": "etcd"})
        assert (reply.status_code, reply.json()) == (200, {"status": "created"})
        reply = a.post(
            update, params={"uuid": "e1", "tailscale_ip": "100.64.0.1", "hostname": "etcd-1"}
        )
        assert (reply.status_code, reply.json()) == (200, {"status": "updated"})
        assert a.post(update, params={"uuid": "e2", "node_type": "etcd"}).json() == {
            "status": "created"
        }  # no host name: not discoverable yet
        assert b.post(
            update, params={"uuid": "a1", "node_type": "app", "hostname": "app-1"}
        ).json() == {"status": "created"}
        reply = b.get("/api/discover/etcd")
        assert (reply.status_code, reply.json()) == (200, {
            "nodes": [{"hostname": "etcd-1", "tailscale_ip": "100.64.0.1", "uuid": "e1",
                       "hostname_with_port": "etcd-1:2379"}],
            "count": 1, "node_type": "etcd",
        })  # fmt: skip
        reply = b.get("/api/discover/mongodb")
        assert (reply.status_code, reply.json()) == (404, {"error": "No mongodb nodes found"})
        listing = b.get("/api/nodes").json()
        assert listing["count"] == 3
        assert listing["nodes"][1] == {
            "uuid": "e1", "name": "e1", "node_type": "etcd",
            "tailscale_ip": "100.64.0.1", "actual_hostname": "etcd-1",
        }  # fmt: skip

        # delete through b, seen by a
        reply = b.delete("/api/nodes/e2")
        assert (reply.status_code, reply.json()) == (200, {"status": "deleted"})
        assert b.delete("/api/nodes/e2").status_code == 404
        assert [n["uuid"] for n in a.get("/api/nodes").json()["nodes"]] == ["a1", "e1"]

        # malformed input: 400 naming the parameter, dstack's message when uuid is missing
        reply = a.post(update, params={"node_type": "app"})
        assert (reply.status_code, reply.json()) == (400, {"error": "uuid parameter is required"})
        for name, value in (
            ("tailscale_ip", "not-an-ip"),
            ("uuid", "x" * 129),
            ("hostname", "a b"),
        ):
            reply = a.post(update, params={"uuid": "e9", name: value})
            assert reply.status_code == 400 and reply.json()["field"] == name, reply.text
        assert a.delete("/api/nodes/" + "x" * 200).json()["field"] == "uuid"
        assert a.get("/api/discover/a.b").json()["field"] == "node_type"

        # who may: no certificate 401, an app not on the allowlist 403 (the API's own bodies)
        for client, status, body in ((world.client(url_a, None), 401, "Unauthorized"),
                                     (world.client(url_b, "db-0"), 403, "Forbidden")):  # fmt: skip
            for method, path in (("GET", "/api/register?instance_id=i"), ("GET", "/api/nodes"),
                                 ("POST", "/api/nodes/update?uuid=z"), ("DELETE", "/api/nodes/a1"),
                                 ("GET", "/api/discover/app")):  # fmt: skip
                reply = client.request(method, path)
                assert (reply.status_code, reply.json()) == (status, {"error": body}), path
        # a header cannot claim another app: the app id is the one attested in the SVID
        reply = world.client(url_b, "db-0").get("/api/nodes", headers={"x-dstack-app-id": WEB_APP})
        assert reply.status_code == 403
        assert f"app {compose_hash(DB_COMPOSE)[:20].hex()} is not in vpc.allowed_apps" in (
            world.mesh.coordinators[1].output()
        )

        # no authentication for the liveness checks
        anonymous = world.client(url_a, None)
        assert (anonymous.get("/api/ping").status_code, anonymous.get("/api/ping").text) == (
            200, "pong",
        )  # fmt: skip
        assert (anonymous.get("/health").text, anonymous.head("/health").status_code) == ("OK", 200)
        for uuid in ("a1", "e1"):  # the next tests start from an empty VPC
            assert a.delete(f"/api/nodes/{uuid}").status_code == 200


def test_nodes_and_the_shared_key_outlive_every_coordinator(world: World) -> None:
    with world.coordinator("a") as url:
        client = world.client(url)
        assert client.post(
            "/api/nodes/update", params={"uuid": "r1", "hostname": "r-1"}
        ).json() == {"status": "created"}
        before = client.get("/api/register", params={"instance_id": "i-2"}).json()["shared_key"]
        nodes = client.get("/api/nodes").json()
    # no coordinator runs now; one starts again with a new process and a new TLS key
    with world.coordinator("a") as url:
        client = world.client(url)
        assert client.get("/api/nodes").json() == nodes
        assert (
            client.get("/api/register", params={"instance_id": "i-2"}).json()["shared_key"]
            == before
        )
        client.delete("/api/nodes/r1")


def test_without_a_vpc_section_the_api_is_off_until_the_policy_says_otherwise(world: World) -> None:
    token = (world.mesh.tmp / "coordinator-a" / "admin.token").read_text().strip()
    bearer = {"Authorization": f"Bearer {token}"}
    with world.coordinator("a") as url_a, world.coordinator("b") as url_b:
        admin = world.client(url_a, None)
        try:
            world.mesh.write_policy(GROUPS)
            assert admin.post("/v1/admin/policy/reload", headers=bearer).status_code == 200
            for url in (url_a, url_b):  # in force cluster-wide, at once
                client = world.client(url)
                for path in ("/api/nodes", "/api/register?instance_id=i", "/api/ping"):
                    assert client.get(path).status_code == 404, path
                assert client.post("/api/nodes/update?uuid=z").status_code == 404
                assert world.client(url, None).get("/api/nodes").status_code == 404
                assert client.get("/health").status_code == 200
                assert client.get("/v1/ca").status_code == 200  # the rest is untouched
        finally:
            world.mesh.write_policy(GROUPS, top=VPC_ON)
            assert admin.post("/v1/admin/policy/reload", headers=bearer).status_code == 200
        assert world.client(url_b).get("/api/nodes").status_code == 200


@contextlib.contextmanager
def _vpc_policy(world: World, url: str, top: str) -> Iterator[None]:
    """The policy with ``top`` in force cluster-wide (reloaded through ``url``), then back."""
    token = (world.mesh.tmp / "coordinator-a" / "admin.token").read_text().strip()
    bearer = {"Authorization": f"Bearer {token}"}
    admin = world.client(url, None)
    try:
        world.mesh.write_policy(GROUPS, top=top)
        assert admin.post("/v1/admin/policy/reload", headers=bearer).status_code == 200
        yield
    finally:
        world.mesh.write_policy(GROUPS, top=VPC_ON)
        assert admin.post("/v1/admin/policy/reload", headers=bearer).status_code == 200


def test_a_node_is_changed_only_by_the_app_that_created_it(world: World) -> None:
    update = "/api/nodes/update"
    both = f"vpc:\n  allowed_apps: [{WEB_APP}, {DB_APP}]\n"
    with (
        world.coordinator("a") as url_a,
        world.coordinator("b") as url_b,
        _vpc_policy(world, url_a, both),
    ):
        web, db = world.client(url_a, "web-0"), world.client(url_b, "db-0")
        etcd = {"uuid": "w1", "node_type": "etcd", "hostname": "etcd-w"}
        assert web.post(update, params=etcd).json() == {"status": "created"}
        assert db.post(update, params={"uuid": "d1", "hostname": "d-1"}).json() == {
            "status": "created"
        }
        try:
            # db may neither repoint web's etcd node nor delete it, and the reverse
            for client, uuid in ((db, "w1"), (web, "d1")):
                reply = client.post(update, params={"uuid": uuid, "hostname": "evil"})
                assert (reply.status_code, reply.json()) == (403, {"error": "Forbidden"})
                reply = client.delete(f"/api/nodes/{uuid}")
                assert (reply.status_code, reply.json()) == (403, {"error": "Forbidden"})
            assert (
                f"vpc: app {DB_APP} (db/db-0): forbidden: may not update node w1, "
                f"created by app {WEB_APP} (web/web-0)"
            ) in world.mesh.coordinators[1].output()
            assert f"app {WEB_APP} (web/web-0): forbidden: may not delete node d1" in (
                world.mesh.coordinators[0].output()
            )
            found = db.get("/api/discover/etcd").json()["nodes"]
            assert [(n["uuid"], n["hostname"]) for n in found] == [("w1", "etcd-w")]
            # the listing keeps dstack-vpc's NodeInfo: the owner is not shown
            assert {n["uuid"]: set(n) for n in web.get("/api/nodes").json()["nodes"]} == {
                u: {"uuid", "name", "node_type", "tailscale_ip", "actual_hostname"}
                for u in ("d1", "w1")
            }
            # the owner is the app, whichever coordinator it goes through
            reply = world.client(url_b, "web-0").post(update, params={"uuid": "w1"})
            assert reply.json() == {"status": "updated"}
        finally:
            assert web.delete("/api/nodes/w1").json() == {"status": "deleted"}
            assert db.delete("/api/nodes/d1").json() == {"status": "deleted"}


def test_an_app_cannot_create_more_nodes_than_its_limit(world: World) -> None:
    update = "/api/nodes/update"
    uuids = [f"cap{i}" for i in range(vpc.MAX_NODES_PER_APP)]
    with world.coordinator("a") as url:
        web = world.client(url)
        assert web.get("/api/nodes").json()["count"] == 0  # the tests before left none
        try:
            for uuid in uuids:
                assert web.post(update, params={"uuid": uuid}).json() == {"status": "created"}
            reply = web.post(update, params={"uuid": "one-more"})
            assert reply.status_code == 429
            assert reply.json() == {
                "error": f"app {WEB_APP} already has {vpc.MAX_NODES_PER_APP} nodes, the limit "
                f"is {vpc.MAX_NODES_PER_APP}: delete one (DELETE /api/nodes/<uuid>) before "
                "creating another"
            }
            reply = web.post(update, params={"uuid": uuids[0], "hostname": "h"})
            assert reply.json() == {"status": "updated"}  # its own nodes it still updates
            assert web.get("/api/nodes").json()["count"] == vpc.MAX_NODES_PER_APP
        finally:
            for uuid in uuids:
                web.delete(f"/api/nodes/{uuid}")
        assert web.post(update, params={"uuid": "one-more"}).json() == {"status": "created"}
        assert web.delete("/api/nodes/one-more").json() == {"status": "deleted"}
