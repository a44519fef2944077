"""High availability: three coordinators on one three-member etcd cluster, all real processes.

Admission and the catalog work through any coordinator: a nonce issued by one is accepted once
by another (and by no one after that), and a peer admitted by one registers through a second
while a watch through a third sees it. Killing the coordinator a watch is connected to, or the
etcd member the coordinators talk to, stops neither admissions nor the watch, which resumes
elsewhere and delivers every change exactly once, in order: what it delivered is compared with
etcd's own history of the prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import httpx
import pytest
from etcdkit import EtcdServer, etcd_cluster
from meshkit import DB_COMPOSE, WEB_COMPOSE, Mesh, group_yaml, svid_pem
from procs import Proc

from teemesh.attest.policy import Reason
from teemesh.catalog.etcd import EtcdStore, cluster_prefix
from teemesh.coordinator.catalog_client import CatalogClient, CatalogUpdate
from teemesh.coordinator.client import AdmissionClient, Svid
from teemesh.coordinator.errors import AdmissionRefused
from teemesh.errors import PeerError
from teemesh.identity.certs import load_cert_pem
from teemesh.platform.agent_client import AgentClient

pytestmark = [pytest.mark.integration, pytest.mark.etcd]

CLUSTER = "demo"
WAIT = 15.0  # the longest any one expected step may take (a failover included)
T = TypeVar("T")
Shape = tuple[int, list[tuple[str, str]]]  # a revision and its (type, key) events


@dataclass
class HA:
    mesh: Mesh
    etcd: list[EtcdServer]
    urls: list[str]  # coordinators A, B, C
    procs: list[Proc]
    agents: dict[str, AgentClient]  # the workloads' guest agents
    watcher: Svid  # db-0's, for watching the web services

    def admission(self, url: str, agent: str) -> AdmissionClient:
        return AdmissionClient(url, self.mesh.pinned, self.agents[agent])

    def admit(self, url: str, agent: str, group: str, peer_id: str) -> Svid:
        return self.admission(url, agent).admit(CLUSTER, group, peer_id)

    def catalog(self, svid: Svid, *urls: str) -> CatalogClient:
        return CatalogClient(urls, self.mesh.catalog_check, svid_pem(svid), timeout=5)

    def live(self) -> list[str]:
        return [u for u, p in zip(self.urls, self.procs, strict=True) if p.process.poll() is None]

    def kill_coordinator(self, url: str) -> None:
        process = self.procs[self.urls.index(url)].process
        process.kill()
        process.wait(10)

    def live_etcd(self) -> list[str]:
        return [m.url for m in self.etcd if m.process.poll() is None]


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HA]:
    tmp = tmp_path_factory.mktemp("ha")
    mesh = Mesh(tmp)
    mesh.write_policy(
        group_yaml("web", WEB_COMPOSE, "services: [web, api, admin]")
        + group_yaml("db", DB_COMPOSE, "services: [db]"),
        top="lease_ttl_seconds: 120\n",  # no instance expires while the module runs
    )
    (tmp / "etcd").mkdir()
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(etcd_cluster(tmp / "etcd", 3))
        store = ["--store", "etcd", "--etcd-endpoints", ",".join(m.url for m in etcd)]
        for name in "abc":
            agent, sock = mesh.coordinator_agent(f"coordinator-agent-{name}")
            stack.enter_context(agent)
            stack.enter_context(mesh.start_coordinator(sock, f"coordinator-{name}", *store))
        agents = {}
        for name in ("web-a", "web-b"):
            agent, sock = mesh.agent(name, WEB_COMPOSE)
            stack.enter_context(agent)
            agents[name] = stack.enter_context(AgentClient(str(sock)))
        watcher, _ = stack.enter_context(mesh.admitted("db-0", DB_COMPOSE, "db"))
        yield HA(mesh, etcd, list(mesh.urls), list(mesh.coordinators), agents, watcher)


# -- helpers -----------------------------------------------------------------------------------


async def within(step: Awaitable[T], what: str) -> T:
    try:
        return await asyncio.wait_for(step, WAIT)
    except TimeoutError:
        pytest.fail(f"{what}: nothing after {WAIT} s")


async def changes(updates: AsyncIterator[CatalogUpdate], count: int) -> list[CatalogUpdate]:
    out = [await within(anext(updates), f"change {n + 1} of {count}") for n in range(count)]
    assert all(u.snapshot is None for u in out), "the watch listed again instead of resuming"
    return out


def shape(update: CatalogUpdate) -> Shape:
    return update.revision, [(e["type"], e["key"]) for e in update.events]


async def etcd_history(ha: HA, prefix: str, first: int, last: int) -> list[Shape]:
    """What etcd itself recorded under ``prefix`` from ``first`` to ``last``, like ``shape``."""
    store = await EtcdStore.open(ha.live_etcd(), prefix=cluster_prefix(CLUSTER))
    async with store, store.watch(prefix, start_revision=first) as watch:
        out: list[Shape] = []
        while not out or out[-1][0] < last:
            batch = await within(anext(watch), "etcd's history")
            out.append((batch[0].mod_revision, [(e.type.value, e.key) for e in batch]))
    return out


async def retried(call: Callable[[], Awaitable[T]]) -> T:
    """A catalog call while etcd elects a leader: coordinators may answer 503 until it has one.

    Only calls that may safely land twice (an ambiguous failure can hide a success).
    """
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return await call()
        except PeerError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def make_leader(members: list[EtcdServer], member: EtcdServer) -> None:
    """Move etcd's leadership to ``member`` (asked of the current leader), bounded."""
    deadline = time.monotonic() + WAIT
    with httpx.Client(trust_env=False, timeout=2) as http:
        while time.monotonic() < deadline:
            status = [http.post(f"{m.url}/v3/maintenance/status", json={}).json() for m in members]
            ids = [s["header"]["member_id"] for s in status]
            leader = ids.index(status[0]["leader"]) if status[0]["leader"] in ids else None
            if leader == members.index(member):
                return
            if leader is not None:
                target = {"targetID": ids[members.index(member)]}
                http.post(f"{members[leader].url}/v3/maintenance/transfer-leadership", json=target)
            time.sleep(0.05)
    pytest.fail(f"etcd member {member.name} did not become the leader in {WAIT} s")


# -- the tests ---------------------------------------------------------------------------------


def test_a_nonce_from_one_coordinator_is_accepted_once_by_another(ha: HA) -> None:
    a, b, c = ha.urls
    nonce = ha.admission(a, "web-a").challenge()
    prepared = ha.admission(a, "web-a").prepare(CLUSTER, "web", "web-0", nonce)
    svid = ha.admission(b, "web-a").attest(prepared)
    assert svid.spiffe_id == f"spiffe://{CLUSTER}/web/web-0"
    for url in (c, a, b):  # the very same request, replayed anywhere
        with pytest.raises(AdmissionRefused) as info:
            ha.admission(url, "web-a").attest(prepared)
        assert [r.code for r in info.value.refusals] == [Reason.NONCE_INVALID], url
    for url in ha.urls:  # one mesh CA: each coordinator derives its key from the same app keys
        ca = httpx.get(f"{url}/v1/ca", verify=False, timeout=5).json()["ca_certificate"]
        svid.certificate.verify_directly_issued_by(load_cert_pem(ca, field="ca"))


def test_admission_and_the_catalog_work_through_any_coordinator(ha: HA) -> None:
    a, b, c = ha.urls
    svid = ha.admit(b, "web-b", "web", "web-1")

    async def main() -> None:
        updates = ha.catalog(ha.watcher, c).watch("instances/web/")
        first = await within(anext(updates), "the snapshot")
        assert first.snapshot is not None and "instances/web/web-1" not in first.snapshot
        reply = await ha.catalog(svid, a).register("web", "10.0.0.1", 8080)
        (change,) = await changes(updates, 1)
        await updates.aclose()
        assert shape(change) == (reply["revision"], [("put", "instances/web/web-1")])
        assert change.events[0]["value"]["instance_id"] == ha.agents["web-b"].info()["instance_id"]
        listing = await ha.catalog(ha.watcher, b).read("instances/web/")
        assert [i["key"] for i in listing["items"]] == ["instances/web/web-1"]
        await ha.catalog(svid, b).deregister("web")

    asyncio.run(main())


def test_killing_the_watched_coordinator_stops_neither_watches_nor_admissions(ha: HA) -> None:
    victim, *survivors = ha.live()
    writer_svid = ha.admit(survivors[0], "web-a", "web", "web-2")

    async def main() -> None:
        watcher = ha.catalog(ha.watcher, victim, *survivors)  # it watches through the victim
        writer = ha.catalog(writer_svid, victim, *survivors)  # its calls fail over too
        updates = watcher.watch("instances/api/")
        first = await within(anext(updates), "the snapshot")
        assert first.snapshot == {}
        before = (await writer.register("api", "10.0.0.2", 80))["revision"]
        assert shape((await changes(updates, 1))[0]) == (before, [("put", "instances/api/web-2")])
        assert watcher.coordinators[watcher._current].url == victim

        ha.kill_coordinator(victim)
        # at once, while the watch is still reconnecting: these are replayed from history
        written = [
            (await writer.update("api", health="critical"))["revision"],
            (await writer.update("api", tags={"v": "2"}))["revision"],
            (await writer.deregister("api"))["revision"],
            (await writer.register("api", "10.0.0.3", 81))["revision"],
        ]
        after = await changes(updates, len(written))
        assert watcher.coordinators[watcher._current].url != victim
        assert [u.revision for u in after] == written
        assert [e["type"] for u in after for e in u.events] == ["put", "put", "delete", "put"]
        assert after[3].events[0]["value"]["address"] == "10.0.0.3"
        marker = (await writer.update("api", health="passing"))["revision"]
        (next_one,) = await changes(updates, 1)  # nothing repeated before it
        assert next_one.revision == marker
        await updates.aclose()
        delivered = [shape(u) for u in [*after, next_one]]
        assert delivered == await etcd_history(ha, "instances/api/", before + 1, marker)
        await writer.deregister("api")

    asyncio.run(main())
    with pytest.raises(PeerError):
        ha.admit(victim, "web-b", "web", "web-3")
    svid = ha.admit(ha.live()[-1], "web-b", "web", "web-3")
    assert svid.spiffe_id == f"spiffe://{CLUSTER}/web/web-3"


def test_killing_the_etcd_leader_in_use_stops_neither_watches_nor_admissions(ha: HA) -> None:
    coordinators = ha.live()
    writer_svid = ha.admit(coordinators[0], "web-b", "web", "web-4")
    member = ha.etcd[0]  # first of every coordinator's endpoints: the one they all use
    make_leader(ha.etcd, member)  # and the leader: its death also means an election

    async def main() -> None:
        watcher = ha.catalog(ha.watcher, *coordinators)
        writer = ha.catalog(writer_svid, *reversed(coordinators))
        updates = watcher.watch("instances/admin/")
        first = await within(anext(updates), "the snapshot")
        assert first.snapshot == {}
        before = (await writer.register("admin", "10.0.0.4", 90))["revision"]
        assert shape((await changes(updates, 1))[0]) == (before, [("put", "instances/admin/web-4")])

        member.kill()
        written = [
            (await retried(lambda: writer.update("admin", health="critical")))["revision"],
            (await retried(lambda: writer.update("admin", tags={"v": "2"})))["revision"],
            (await retried(lambda: writer.register("admin", "10.0.0.5", 91)))["revision"],
        ]
        delivered: list[CatalogUpdate] = []
        while not delivered or delivered[-1].revision < written[-1]:
            delivered += await changes(updates, 1)
        await updates.aclose()
        assert watcher.coordinators[watcher._current].url != coordinators[0], (
            "the watch never lost its etcd stream: the test proves nothing"
        )
        # a write retried after an ambiguous failure may have landed twice: etcd's history says
        assert set(written) <= {u.revision for u in delivered}
        history = await etcd_history(ha, "instances/admin/", before + 1, written[-1])
        assert [shape(u) for u in delivered] == history
        await writer.deregister("admin")

    asyncio.run(main())
    svid = ha.admit(coordinators[-1], "web-b", "web", "web-5")
    assert svid.spiffe_id == f"spiffe://{CLUSTER}/web/web-5"
