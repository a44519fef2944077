"""The catalog API as sidecars use it: real coordinator and agents, mTLS with admitted SVIDs.

Each refusal test presents exactly one thing wrong (no certificate, an expired one, one from
another CA, a revoked one, another peer's or group's service), so dropping that check fails it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import pytest
from meshkit import DB_COMPOSE, WEB_COMPOSE, Mesh, group_yaml, svid_pem

from teemesh.coordinator.catalog_client import CatalogClient
from teemesh.coordinator.client import AdmissionClient, Svid
from teemesh.coordinator.errors import AdmissionRefused, NotRegistered
from teemesh.errors import PeerError, Refused
from teemesh.identity.certs import new_p256_key, pem_pair
from teemesh.identity.meshca import (
    GET_KEY_PATH,
    issue_svid,
    mesh_ca_cert,
    mesh_ca_key,
)
from teemesh.identity.svid import spiffe_id
from teemesh.net.async_https import AsyncAttestedHttps
from teemesh.platform.agent_client import AgentClient

T = TypeVar("T")
pytestmark = pytest.mark.integration

WAIT = 15.0  # the longest any one expected event or chunk may take
LEASE_TTL = 3  # seconds: heartbeats every 0.5 s keep it alive through a 2.5 s stall


async def within(step: Awaitable[T]) -> T:
    """``step``, or a failure after WAIT seconds (a watch retries forever, it never gives up)."""
    try:
        return await asyncio.wait_for(step, WAIT)
    except TimeoutError:
        pytest.fail(f"nothing came within {WAIT} s")


class World:
    def __init__(self, mesh: Mesh, svids: dict[str, Svid], agents: dict[str, AgentClient]) -> None:
        self.mesh, self.svids, self.agents = mesh, svids, agents

    def client(self, peer: str) -> CatalogClient:
        svid = self.svids[peer]
        return CatalogClient(self.mesh.urls, self.mesh.catalog_check, svid_pem(svid))

    def raw(self, cert_and_key: Any = None) -> AsyncAttestedHttps:
        identity = pem_pair(*cert_and_key) if cert_and_key else None
        return AsyncAttestedHttps(self.mesh.url, self.mesh.catalog_check, client_cert=identity)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    mesh = Mesh(tmp_path_factory.mktemp("catalog"))
    mesh.write_policy(
        group_yaml("web", WEB_COMPOSE, "services: [web, web-admin]")
        + group_yaml("db", DB_COMPOSE, "services: [db]"),
        top=f"lease_ttl_seconds: {LEASE_TTL}\n",
    )
    agent_cm, agent_sock = mesh.coordinator_agent()
    with agent_cm, mesh.start_coordinator(agent_sock, "coordinator"):
        svids, agents = {}, {}
        with (
            mesh.admitted("web-0", WEB_COMPOSE, "web") as (svids["web-0"], agents["web-0"]),
            mesh.admitted("web-1", WEB_COMPOSE, "web") as (svids["web-1"], agents["web-1"]),
            mesh.admitted("db-0", DB_COMPOSE, "db") as (svids["db-0"], agents["db-0"]),
        ):
            yield World(mesh, svids, agents)


def test_a_peer_registers_and_every_watcher_sees_each_change_once(world: World) -> None:
    async def main() -> None:
        web, db = world.client("web-0"), world.client("db-0")
        updates = db.watch("instances/web/")
        first = await within(anext(updates))
        assert first.snapshot == {}
        reply = await web.register("web", "10.0.0.1", 8080, tags={"role": "primary"})
        await web.update("web", health="critical")
        await web.deregister("web")
        changes = [await within(anext(updates)) for _ in range(3)]
        await updates.aclose()
        assert [c.revision for c in changes] == sorted({c.revision for c in changes})
        assert changes[0].revision == reply["revision"]
        put = changes[0].events[0]
        assert put["type"] == "put" and put["key"] == "instances/web/web-0"
        admitted = world.agents["web-0"].info()
        assert put["value"] == {
            "service": "web", "group": "web", "peer_id": "web-0", "address": "10.0.0.1",
            "port": 8080, "tags": {"role": "primary"}, "health": "passing",
            "app_id": admitted["app_id"], "instance_id": admitted["instance_id"],
        }  # fmt: skip
        assert changes[1].events[0]["value"]["health"] == "critical"
        assert changes[2].events[0] == {
            "type": "delete",
            "key": "instances/web/web-0",
            "value": None,
        }

        # resuming after the first change replays exactly the two that followed it
        raw = world.raw((world.svids["db-0"].certificate, world.svids["db-0"].key))
        path = "/v1/catalog/watch?prefix=instances/web/"
        status, chunks = await raw.stream(path, [("Last-Event-ID", str(changes[0].revision))])
        assert status == 200
        text = b""
        while text.count(b"event: change") < 2:
            text += await within(anext(chunks))
        await chunks.aclose()  # type: ignore[attr-defined]
        assert f"id: {changes[1].revision}\n".encode() in text
        assert f"id: {changes[0].revision}\n".encode() not in text
        assert b"event: snapshot" not in text

    asyncio.run(main())


def test_a_peer_writes_only_its_own_instances_of_its_own_services(world: World) -> None:
    async def main() -> None:
        web0, web1, db = (world.client(p) for p in ("web-0", "web-1", "db-0"))
        await web0.register("web", "10.0.0.1", 8080)
        with pytest.raises(Refused, match="group db does not own service 'web'"):
            await db.register("web", "10.0.0.9", 8080)
        with pytest.raises(NotRegistered):  # web-1 can only name its own (absent) instance
            await web1.update("web", health="critical")
        with pytest.raises(NotRegistered):
            await web1.deregister("web")
        with pytest.raises(PeerError, match="peer_id"):  # who it is comes from its SVID
            await web1.call("POST", "/v1/catalog/register",
                            {"service": "web", "address": "10.0.0.2", "port": 1,
                             "peer_id": "web-0"})  # fmt: skip
        listing = await db.read("instances/")
        assert [i["key"] for i in listing["items"]] == ["instances/web/web-0"]
        assert listing["items"][0]["value"]["health"] == "passing"
        with pytest.raises(PeerError, match="not readable"):
            await db.read("admissions/")
        await web0.deregister("web")

    asyncio.run(main())


def _ca_key(world: World) -> Any:
    agent_sock = world.mesh.tmp / "coordinator-agent.sock"
    with AgentClient(str(agent_sock)) as agent:
        return mesh_ca_key(agent.get_key(GET_KEY_PATH, "mesh-ca"))


def test_the_catalog_refuses_missing_expired_and_foreign_certificates(world: World) -> None:
    ca_key = _ca_key(world)
    ca_cert = mesh_ca_cert(ca_key, "demo")
    key = new_p256_key()
    expired = issue_svid(
        ca_key, ca_cert, key.public_key(), spiffe=spiffe_id("demo", "web", "web-0"),
        peer_id="web-0", app_id=b"\0" * 20,
        now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=3), ttl=dt.timedelta(hours=1),
    )  # fmt: skip
    other_ca_key = mesh_ca_key(b"another cluster's secret".ljust(32, b"\0"))
    foreign = issue_svid(
        other_ca_key, mesh_ca_cert(other_ca_key, "demo"), key.public_key(),
        spiffe=spiffe_id("demo", "web", "web-0"), peer_id="web-0", app_id=b"\0" * 20,
        now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(hours=1),
    )  # fmt: skip
    # the mesh CA really signed this one, but no admission ever listed its serial
    unlisted = issue_svid(
        ca_key, ca_cert, key.public_key(), spiffe=spiffe_id("demo", "web", "web-0"),
        peer_id="web-0", app_id=b"\0" * 20,
        now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(hours=1),
    )  # fmt: skip

    async def main() -> None:
        status, doc = await world.raw().request("GET", "/v1/catalog")
        assert status == 401 and "SVID" in doc["error"]
        for cert in (expired, foreign):
            with pytest.raises(PeerError):  # the TLS handshake itself fails
                await world.raw((cert, key)).request("GET", "/v1/catalog")
        status, doc = await world.raw((unlisted, key)).request("GET", "/v1/catalog")
        assert status == 403 and "revoked or superseded" in doc["error"]

    asyncio.run(main())


def test_a_revoked_peer_is_cut_off_published_and_not_let_back(world: World) -> None:
    token = (world.mesh.tmp / "coordinator" / "admin.token").read_text().strip()

    async def main() -> None:
        admin = world.raw()
        status, doc = await admin.request(
            "POST", "/v1/admin/revoke", {"group": "web", "peer_id": "web-1"}
        )
        assert status == 401
        bearer = [("Authorization", f"Bearer {token}")]
        status, doc = await admin.request(
            "POST", "/v1/admin/revoke", {"group": "web", "peer_id": "web-1"}, bearer
        )
        assert status == 200, doc
        serial = f"{world.svids['web-1'].certificate.serial_number:x}"
        assert doc["serials"] == [serial]
        with pytest.raises(Refused, match="revoked or superseded"):
            await world.client("web-1").read()
        listing = await world.client("web-0").read("revocations/")
        assert [i["value"]["serial"] for i in listing["items"]] == [serial]
        assert listing["items"][0]["value"]["peer_id"] == "web-1"
        status, doc = await admin.request("GET", "/v1/admin/admissions", None, bearer)
        revoked = {a["peer_id"]: a["revoked"] for a in doc["admissions"]}
        assert revoked == {"web-0": None, "web-1": "revoked by an administrator", "db-0": None}

    asyncio.run(main())
    client = AdmissionClient(world.mesh.url, world.mesh.pinned, world.agents["web-1"])
    with pytest.raises(AdmissionRefused, match="PEER_REVOKED"):
        client.admit("demo", "web", "web-1")


def test_a_silent_peer_drops_out_when_its_lease_expires(world: World) -> None:
    async def main() -> None:
        web = world.client("web-0")
        await web.register("web-admin", "10.0.0.1", 9000)
        for _ in range(2 * LEASE_TTL + 1):  # heartbeats for longer than the TTL
            await asyncio.sleep(0.5)
            assert (await web.heartbeat())["lease_ttl"] == LEASE_TTL
        assert len((await web.read("instances/web-admin/"))["items"]) == 1
        deadline = time.monotonic() + LEASE_TTL + WAIT
        while (await web.read("instances/web-admin/"))["items"]:
            if time.monotonic() > deadline:
                pytest.fail("the instance outlived its lease")
            await asyncio.sleep(0.2)
        with pytest.raises(NotRegistered, match="register its services again"):
            await web.heartbeat()

    asyncio.run(main())
