"""The store contract, one suite for both backends: SQLite (embedded) and a real etcd process.

The etcd runs are marked ``etcd``; they fail (never skip) when etcd cannot start. Lease expiry
runs on a manual clock for SQLite and on etcd's own clock for etcd (short TTLs, bounded waits).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import stat
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from etcdkit import EtcdServer, etcd_cluster, free_ports

from teemesh.catalog.etcd import EtcdStore, cluster_prefix
from teemesh.catalog.sqlite import MAX_PENDING, SqliteStore
from teemesh.catalog.store import (
    MAX_KEY_BYTES,
    MAX_LEASE_TTL,
    MAX_VALUE_BYTES,
    Event,
    EventType,
    KeyValue,
    Store,
    StoreError,
    StoreErrorReason,
    Watch,
)
from teemesh.clock import ManualClock

pytestmark = pytest.mark.anyio
PUT, DELETE = EventType.PUT, EventType.DELETE
WAIT = 5.0  # the longest any single expected event may take (etcd expires leases every ~0.5 s)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"use_uvloop": True})  # the coordinator runs on uvloop


# -- a real etcd, one per session --------------------------------------------------------------


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as (server,):
        yield server


# -- the two backends --------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    open: Callable[[], Awaitable[Store]]
    clock: ManualClock | None  # SQLite's; etcd keeps its own time

    async def let_time_pass(self, seconds: float) -> None:
        """Move the manual clock, or really wait: etcd's leases run on etcd's clock."""
        if self.clock is None:
            await asyncio.sleep(seconds)
        else:
            self.clock.advance(seconds)


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        clock = ManualClock()
        return Backend(
            "sqlite", lambda: SqliteStore.open(tmp_path / "catalog.db", clock=clock), clock
        )
    server: EtcdServer = request.getfixturevalue("etcd_server")
    prefix = f"/teemesh/test-{uuid.uuid4().hex[:12]}/"  # one etcd, a fresh namespace per test
    return Backend("etcd", lambda: EtcdStore.open(server.url, prefix=prefix), None)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.aclose()


async def next_batch(changes: Watch) -> tuple[Event, ...]:
    return await asyncio.wait_for(anext(changes), WAIT)


def reason(info: pytest.ExceptionInfo[StoreError]) -> StoreErrorReason:
    return info.value.reason


# -- keys and revisions ------------------------------------------------------------------------


async def test_put_get_delete_with_revisions(store: Store) -> None:
    start = await store.revision()
    first = await store.put("a", b"1")
    assert first > start
    assert await store.get("a") == KeyValue("a", b"1", first, first, 1, None)
    second = await store.put("a", b"2")
    assert second > first
    assert await store.get("a") == KeyValue("a", b"2", first, second, 2, None)
    assert await store.get("missing") is None
    assert await store.revision() == second

    deleted = await store.delete("a")
    assert deleted is not None and deleted > second
    assert await store.get("a") is None
    assert await store.delete("a") is None, "deleting nothing is no change"
    assert await store.revision() == deleted

    again = await store.put("a", b"3")
    assert await store.get("a") == KeyValue("a", b"3", again, again, 1, None), "a new life"


async def test_range_lists_a_prefix_in_key_order(store: Store) -> None:
    for key in ["svc/b", "svc/ü", "svc2/x", "sv", "svc/a"]:
        last = await store.put(key, key.encode())
    snapshot = await store.range("svc/")
    assert [kv.key for kv in snapshot.kvs] == ["svc/a", "svc/b", "svc/ü"]
    assert snapshot.kvs[2].value == "svc/ü".encode()
    assert snapshot.revision == last == await store.revision()
    assert [kv.key for kv in (await store.range()).kvs] == [
        "sv",
        "svc/a",
        "svc/b",
        "svc/ü",
        "svc2/x",
    ]
    assert (await store.range("none/")).kvs == ()


async def test_limits_are_accepted_up_to_the_documented_size(store: Store) -> None:
    key, value = "k" * MAX_KEY_BYTES, os.urandom(MAX_VALUE_BYTES)
    await store.put(key, value)
    stored = await store.get(key)
    assert stored is not None and stored.value == value


async def test_bad_input_is_refused_and_changes_nothing(store: Store) -> None:
    await store.put("k", b"original")
    before = await store.revision()
    cases: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("key", lambda: store.put("", b"x")),
        ("key", lambda: store.put("k" * (MAX_KEY_BYTES + 1), b"x")),
        ("key", lambda: store.put("\ud800", b"x")),
        ("key", lambda: store.get(b"k")),  # type: ignore[arg-type]
        ("value", lambda: store.put("k", "text")),  # type: ignore[arg-type]
        ("value", lambda: store.put("k", b"x" * (MAX_VALUE_BYTES + 1))),
        ("lease", lambda: store.put("k", b"x", lease=0)),
        ("mod_revision", lambda: store.put_if("k", b"x", mod_revision=0)),
        ("mod_revision", lambda: store.delete_if("k", mod_revision=-1)),
        ("ttl", lambda: store.grant(0)),
        ("ttl", lambda: store.grant(MAX_LEASE_TTL + 1)),
        ("ttl", lambda: store.grant(True)),
        ("prefix", lambda: store.range(7)),  # type: ignore[arg-type]
        ("revision", lambda: store.compact(0)),
    ]
    for field, call in cases:
        with pytest.raises(StoreError) as info:
            await call()
        assert reason(info) is StoreErrorReason.INVALID_ARGUMENT, field
        assert info.value.field == field
        assert field in str(info.value)
    with pytest.raises(StoreError, match="start_revision"):
        store.watch("", start_revision=0)
    with pytest.raises(StoreError, match=r"after the current revision|future revision"):
        await store.compact(before + 1000)
    assert await store.revision() == before
    stored = await store.get("k")
    assert stored is not None and stored.value == b"original"


# -- compare-and-set ---------------------------------------------------------------------------


async def test_create_only_when_absent(store: Store) -> None:
    won = await store.create("peer/p1", b"instance-a")
    assert won.succeeded and won.current is None
    assert won.revision == await store.revision()
    lost = await store.create("peer/p1", b"instance-b")
    assert not lost.succeeded
    assert lost.current == KeyValue("peer/p1", b"instance-a", won.revision, won.revision, 1, None)
    assert lost.revision == won.revision
    assert (await store.get("peer/p1")) == lost.current


async def test_put_if_mod_revision_equals(store: Store) -> None:
    first = await store.put("cfg", b"v1")
    won = await store.put_if("cfg", b"v2", mod_revision=first)
    assert won.succeeded and won.revision > first
    stale = await store.put_if("cfg", b"v3", mod_revision=first)
    assert not stale.succeeded
    assert stale.current is not None and stale.current.value == b"v2"
    assert stale.current.mod_revision == won.revision
    absent = await store.put_if("nothing", b"x", mod_revision=first)
    assert not absent.succeeded and absent.current is None
    assert await store.get("nothing") is None


async def test_delete_if_mod_revision_equals(store: Store) -> None:
    first = await store.put("lock", b"me")
    second = await store.put("lock", b"me again")
    stale = await store.delete_if("lock", mod_revision=first)
    assert not stale.succeeded and stale.current is not None
    assert stale.current.mod_revision == second
    won = await store.delete_if("lock", mod_revision=second)
    assert won.succeeded and won.revision > second
    assert await store.get("lock") is None
    gone = await store.delete_if("lock", mod_revision=second)
    assert not gone.succeeded and gone.current is None


async def test_concurrent_writers_lose_no_update(store: Store) -> None:
    conflicts = 0

    async def increment() -> int:
        nonlocal conflicts
        current = await store.get("counter")
        while True:
            await asyncio.sleep(0)  # let the other writers read the same revision
            if current is None:
                result = await store.create("counter", b"1")
            else:
                count = int(current.value) + 1
                result = await store.put_if(
                    "counter", str(count).encode(), mod_revision=current.mod_revision
                )
            if result.succeeded:
                return result.revision
            conflicts += 1
            current = result.current  # the loser learns the new state without a read

    async def writer() -> list[int]:
        return [await increment() for _ in range(10)]

    revisions = await asyncio.gather(*(writer() for _ in range(8)))
    counter = await store.get("counter")
    assert counter is not None and counter.value == b"80"
    assert len({r for per_writer in revisions for r in per_writer}) == 80
    assert conflicts > 0, "the writers never raced: the test proves nothing"


# -- leases ------------------------------------------------------------------------------------


async def test_lease_expiry_deletes_its_keys_and_watchers_see_it(
    store: Store, backend: Backend
) -> None:
    lease = await store.grant(1)
    assert lease.ttl == 1
    await store.put("inst/a", b"1", lease=lease.id)
    await store.put("inst/b", b"2", lease=lease.id)
    await store.put("inst/c", b"no lease")
    assert (await store.get("inst/a")).lease == lease.id  # type: ignore[union-attr]
    async with store.watch("inst/") as changes:
        await backend.let_time_pass(2)
        events = await next_batch(changes)
    assert sorted((e.type, e.key) for e in events) == [(DELETE, "inst/a"), (DELETE, "inst/b")]
    assert len({e.mod_revision for e in events}) == 1, "one lease, one revision"
    assert [kv.key for kv in (await store.range("inst/")).kvs] == ["inst/c"]
    with pytest.raises(StoreError) as info:
        await store.refresh(lease.id)
    assert reason(info) is StoreErrorReason.LEASE_NOT_FOUND
    with pytest.raises(StoreError) as info:
        await store.put("inst/d", b"late", lease=lease.id)
    assert reason(info) is StoreErrorReason.LEASE_NOT_FOUND


async def test_refresh_keeps_a_lease_alive(store: Store, backend: Backend) -> None:
    # On etcd's real clock a refresh may come late on a busy machine: a 3 s TTL refreshed every
    # 0.5 s survives a 2.5 s stall (a 1 s TTL refreshed every 0.4 s, only 0.6 s).
    ttl, step, steps = (1, 0.4, 6) if backend.clock is not None else (3, 0.5, 13)
    assert step * steps > 2 * ttl, "refreshed for more than twice the TTL"
    lease = await store.grant(ttl)
    await store.put("alive", b"yes", lease=lease.id)
    for _ in range(steps):
        await backend.let_time_pass(step)
        assert (await store.refresh(lease.id)).ttl == ttl
        assert await store.get("alive") is not None


async def test_revoke_deletes_keys_at_once(store: Store) -> None:
    lease = await store.grant(60)
    await store.put("r/a", b"1", lease=lease.id)
    await store.put("r/b", b"2", lease=lease.id)
    await store.put("r/b", b"detached")  # a put without the lease detaches the key from it
    async with store.watch("r/") as changes:
        await store.revoke(lease.id)
        assert [(e.type, e.key) for e in await next_batch(changes)] == [(DELETE, "r/a")]
    assert [kv.key for kv in (await store.range("r/")).kvs] == ["r/b"]
    await store.revoke(lease.id)  # gone already: not an error
    with pytest.raises(StoreError) as info:
        await store.refresh(lease.id)
    assert reason(info) is StoreErrorReason.LEASE_NOT_FOUND


async def test_unknown_lease_is_refused(store: Store) -> None:
    for write in (
        lambda: store.put("k", b"x", lease=12345),
        lambda: store.create("k", b"x", lease=12345),
    ):
        with pytest.raises(StoreError) as info:
            await write()
        assert reason(info) is StoreErrorReason.LEASE_NOT_FOUND
    assert await store.get("k") is None


# -- watches -----------------------------------------------------------------------------------


async def test_watch_from_now_sees_later_changes_only(store: Store) -> None:
    await store.put("w/before", b"0")
    async with store.watch("w/") as changes:
        put = await store.put("w/a", b"1")
        await store.put("elsewhere", b"x")
        deleted = await store.delete("w/a")
        assert await next_batch(changes) == (Event(PUT, "w/a", b"1", put),)
        assert await next_batch(changes) == (Event(DELETE, "w/a", b"", deleted),)  # type: ignore[arg-type]


async def test_watch_from_an_old_revision_replays_then_follows(store: Store) -> None:
    await store.put("h/a", b"1")
    second = await store.put("h/a", b"2")
    deleted = await store.delete("h/a")
    other = await store.put("h/b", b"x")
    assert deleted is not None
    async with store.watch("h/", start_revision=second) as changes:
        assert [await next_batch(changes) for _ in range(3)] == [
            (Event(PUT, "h/a", b"2", second),),
            (Event(DELETE, "h/a", b"", deleted),),
            (Event(PUT, "h/b", b"x", other),),
        ]
        live = await store.put("h/c", b"live")
        assert await next_batch(changes) == (Event(PUT, "h/c", b"live", live),)


async def test_watch_from_a_future_revision_waits_for_it(store: Store) -> None:
    now = await store.revision()
    async with store.watch("f/", start_revision=now + 2) as changes:
        await store.put("f/early", b"")
        later = await store.put("f/later", b"")
        assert later == now + 2
        assert await next_batch(changes) == (Event(PUT, "f/later", b"", later),)


async def test_a_resumed_watch_misses_nothing(store: Store) -> None:
    async with store.watch("q/") as changes:
        await store.put("q/1", b"")
        seen = (await next_batch(changes))[-1].mod_revision
    missed = [await store.put(f"q/{n}", b"") for n in range(2, 5)]  # while nobody watched
    async with store.watch("q/", start_revision=seen + 1) as changes:
        assert [(await next_batch(changes))[0].mod_revision for _ in missed] == missed


async def test_watch_from_a_compacted_revision_says_so(store: Store) -> None:
    first = await store.put("c/a", b"1")
    await store.put("c/a", b"2")
    third = await store.put("c/a", b"3")
    await store.compact(third)
    with pytest.raises(StoreError) as info:
        async with store.watch("c/", start_revision=first) as changes:
            await next_batch(changes)
    assert reason(info) is StoreErrorReason.COMPACTED
    assert info.value.compact_revision == third
    async with store.watch("c/", start_revision=third) as changes:
        assert await next_batch(changes) == (Event(PUT, "c/a", b"3", third),)
    await store.compact(first)  # older than what is already compacted: nothing to do


async def test_closing_the_store_ends_its_watches(store: Store) -> None:
    async with store.watch("") as changes:
        waiting = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0.05)
        await store.aclose()
        with pytest.raises(StoreError) as info:
            await asyncio.wait_for(waiting, WAIT)
        assert reason(info) is StoreErrorReason.UNAVAILABLE
    with pytest.raises(StoreError) as info:
        await store.get("a")
    assert reason(info) is StoreErrorReason.UNAVAILABLE


# -- SQLite only: restarts, the file, bounded history, slow watchers -----------------------------


async def test_sqlite_survives_a_restart(tmp_path: Path) -> None:
    clock, path = ManualClock(), tmp_path / "catalog.db"
    async with await SqliteStore.open(path, clock=clock) as store:
        first = await store.put("a", b"1")
        lease = await store.grant(60)
        await store.put("b", b"2", lease=lease.id)
        revision = await store.revision()
    async with await SqliteStore.open(path, clock=clock) as store:
        assert await store.revision() == revision
        assert await store.get("a") == KeyValue("a", b"1", first, first, 1, None)
        assert (await store.get("b")).lease == lease.id  # type: ignore[union-attr]
        assert (await store.refresh(lease.id)).ttl == 60
        assert await store.put("c", b"3") == revision + 1
        async with store.watch("", start_revision=first) as changes:
            assert [(await next_batch(changes))[0].key for _ in range(3)] == ["a", "b", "c"]
    clock.advance(61)  # the lease runs out while the store is closed
    async with await SqliteStore.open(path, clock=clock) as store:
        assert await store.get("b") is None
        async with store.watch("", start_revision=revision + 2) as changes:
            assert await next_batch(changes) == (Event(DELETE, "b", b"", revision + 2),)


async def test_sqlite_file_is_owner_only_and_for_one_process(tmp_path: Path) -> None:
    path = tmp_path / "state" / "catalog.db"
    async with await SqliteStore.open(path) as store:
        await store.put("a", b"1")
        for name in ["catalog.db", "catalog.db-wal"]:
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
        with pytest.raises(StoreError, match="open in another process") as info:
            await SqliteStore.open(path)
        assert reason(info) is StoreErrorReason.UNAVAILABLE


async def test_sqlite_refuses_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="cannot use") as info:
        await SqliteStore.open(path)
    assert reason(info) is StoreErrorReason.UNAVAILABLE
    assert path.read_bytes() == b"not a database" * 100


async def test_sqlite_history_is_bounded(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "c.db", history=10) as store:
        revisions = [await store.put("k", str(n).encode()) for n in range(50)]
        with pytest.raises(StoreError) as info:
            async with store.watch("", start_revision=revisions[0]):
                pass
        assert reason(info) is StoreErrorReason.COMPACTED
        async with store.watch("", start_revision=revisions[-10]) as changes:
            replay = [(await next_batch(changes))[0].mod_revision for _ in range(10)]
        assert replay == revisions[-10:]


async def test_sqlite_slow_watcher_catches_up_from_history(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "c.db") as store:
        async with store.watch("") as changes:
            written = [await store.put(f"k{n % 7}", b"") for n in range(MAX_PENDING + 100)]
            seen = [(await next_batch(changes))[0].mod_revision for _ in written]
        assert seen == written


async def test_sqlite_slow_watcher_buffers_at_most_max_pending(tmp_path: Path) -> None:
    """Past MAX_PENDING it rereads history, so a history compacted meanwhile is COMPACTED."""
    async with await SqliteStore.open(tmp_path / "c.db", history=10) as store:
        async with store.watch("") as changes:
            written = [await store.put("k", b"") for _ in range(MAX_PENDING + 20)]
            seen = [(await next_batch(changes))[0].mod_revision for _ in range(MAX_PENDING)]
            assert seen == written[:MAX_PENDING]
            with pytest.raises(StoreError) as info:
                await next_batch(changes)
        assert reason(info) is StoreErrorReason.COMPACTED
        assert info.value.compact_revision is not None
        assert info.value.compact_revision > written[MAX_PENDING]


# -- etcd only: the namespace and the endpoints ---------------------------------------------------


@pytest.mark.etcd
async def test_etcd_keys_live_under_the_cluster_prefix(etcd_server: EtcdServer) -> None:
    cluster = f"c-{uuid.uuid4().hex[:8]}"
    async with (
        await EtcdStore.open(etcd_server.url, prefix=cluster_prefix(cluster)) as mine,
        await EtcdStore.open(etcd_server.url, prefix=cluster_prefix(cluster + "x")) as theirs,
    ):
        await mine.put("k", b"mine")
        await theirs.put("k", b"theirs")
        assert [kv.value for kv in (await mine.range()).kvs] == [b"mine"]
        assert [kv.value for kv in (await theirs.range()).kvs] == [b"theirs"]
    async with httpx.AsyncClient(trust_env=False) as http:
        raw = await http.post(
            f"{etcd_server.url}/v3/kv/range",
            json={"key": base64.b64encode(f"/teemesh/{cluster}/k".encode()).decode()},
        )
    assert raw.json()["count"] == "1"
    with pytest.raises(StoreError) as info:
        cluster_prefix("Not/A/Name")
    assert reason(info) is StoreErrorReason.INVALID_ARGUMENT


@pytest.mark.etcd
async def test_etcd_fails_over_to_a_live_endpoint(etcd_server: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    async with await EtcdStore.open([dead, etcd_server.url], prefix="/teemesh/failover/") as store:
        assert await store.put("k", b"v") > 0
    with pytest.raises(StoreError, match="no etcd endpoint answered") as info:
        await EtcdStore.open(dead, prefix="/teemesh/failover/")
    assert reason(info) is StoreErrorReason.UNAVAILABLE


@pytest.mark.etcd
async def test_etcd_watch_recreated_when_idle_misses_nothing(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    streams = 0
    send = EtcdStore._send

    async def send_with_a_write_in_the_gap(
        self: EtcdStore, path: str, *args: Any, **kw: Any
    ) -> httpx.Response:
        nonlocal streams
        if path == "/v3/watch":
            streams += 1
            if streams > 1:  # the old stream is closed and the new one not yet created
                written.append(await self.put(f"gap{streams}", b""))
        return await send(self, path, *args, **kw)

    monkeypatch.setattr(EtcdStore, "_send", send_with_a_write_in_the_gap)
    prefix = f"/teemesh/idle-{uuid.uuid4().hex[:8]}/"
    async with await EtcdStore.open(etcd_server.url, prefix=prefix, watch_idle=0.1) as store:
        seen: list[int] = []

        async def consume() -> None:
            async with store.watch("") as changes:
                async for events in changes:
                    seen.extend(e.mod_revision for e in events)

        consumer = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        for n in range(3):
            written.append(await store.put(f"k{n}", b""))
            await asyncio.sleep(0.25)  # longer than watch_idle: the stream is re-created
        deadline = time.monotonic() + WAIT
        while len(seen) < len(written) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        consumer.cancel()
        await asyncio.wait({consumer})
        # asyncio.wait hands back the task without raising: a consumer that failed says so here
        assert consumer.cancelled() or consumer.exception() is None, consumer.exception()
    assert streams > 2, "the watch was never re-created: the test proves nothing"
    assert seen == sorted(written)


@pytest.mark.etcd
async def test_etcd_watch_notices_a_paused_etcd(etcd_server: EtcdServer) -> None:
    prefix = f"/teemesh/paused-{uuid.uuid4().hex[:8]}/"
    async with (
        await EtcdStore.open(etcd_server.url, prefix=prefix, timeout=0.5, watch_idle=0.3) as store,
        store.watch("") as changes,
    ):
        os.kill(etcd_server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreError) as info:
                await asyncio.wait_for(anext(changes), WAIT)
        finally:
            os.kill(etcd_server.process.pid, signal.SIGCONT)
    assert reason(info) is StoreErrorReason.UNAVAILABLE
