"""The embedded store, the default: one SQLite file, watchers notified inside this process.

Why it is built this way:

- Every SQLite call runs on the event loop's thread as one short transaction (WAL, and
  ``synchronous=NORMAL`` unless ``fsync=True``: tens of microseconds). Writes, history reads and
  watcher registration are therefore atomic with respect to each other without any lock, which
  is what makes "replay history, then follow live changes" gap-free.
- The file is opened in EXCLUSIVE locking mode: a second process opening it gets UNAVAILABLE
  instead of writing changes that this process's watchers would never see. (The WAL index then
  lives in memory: there is no ``-shm`` file.) The file and its WAL are owner-only.
- Lease expiry times are wall-clock times from the injected clock, so leases survive a restart
  with their expiry; leases that ran out while the process was down expire when it opens.
- History is a table of (revision, key, value) holding at least the last ``history``
  revisions; older ones are compacted away, and a watch asking for them gets COMPACTED.
- A watcher that falls more than ``MAX_PENDING`` revisions behind stops buffering and rereads
  the history table when it catches up, so a stuck consumer costs no memory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from teemesh.catalog.store import (
    MAX_INT64,
    CasResult,
    Event,
    EventType,
    KeyValue,
    Lease,
    Snapshot,
    Store,
    StoreError,
    StoreErrorReason,
    Watch,
    by_revision,
    lease_not_found,
    prefix_end,
    unavailable,
)
from teemesh.clock import Clock, SystemClock

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_HISTORY = 10_000
MAX_PENDING = 1024
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL,"
    " create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL,"
    " version INTEGER NOT NULL, lease INTEGER)",
    "CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS lease (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL,"
    " expires_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS lease_by_expiry ON lease (expires_at)",
    "CREATE TABLE IF NOT EXISTS history (revision INTEGER NOT NULL, key BLOB NOT NULL,"
    " deleted INTEGER NOT NULL, value BLOB NOT NULL, PRIMARY KEY (revision, key))",
)
_KV_COLUMNS = "key, value, create_revision, mod_revision, version, lease"
_REFRESH = "UPDATE lease SET expires_at = ? WHERE id = ?"


class SqliteStore(Store):
    """The store in one SQLite file; open it with ``await SqliteStore.open(path)``."""

    def __init__(self, db: sqlite3.Connection, path: Path, clock: Clock, history: int) -> None:
        self._db: sqlite3.Connection | None = db
        self.path = path
        self._clock = clock
        self._history = history
        self._head = _meta(db, "revision")
        self._compact_revision = _meta(db, "compact_revision")
        self._watchers: set[_SqliteWatch] = set()
        self._next_expiry = math.inf
        self._sleeper: asyncio.Future[None] | None = None
        self._reaper: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        clock: Clock | None = None,
        history: int = DEFAULT_HISTORY,
        fsync: bool = False,
    ) -> SqliteStore:
        """Open (or create) the store; ``fsync`` makes each commit durable across power loss."""
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise StoreError(StoreErrorReason.INVALID_ARGUMENT, "must be >= 1", field="history")
        store = cls(_connect(Path(path), fsync), Path(path), clock or SystemClock(), history)
        try:
            store._expire_due()  # leases that ran out while the store was closed
        except BaseException:
            await store.aclose()
            raise
        store._reaper = asyncio.get_running_loop().create_task(
            store._reap(), name=f"teemesh lease reaper for {path}"
        )
        return store

    async def aclose(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        for watch in list(self._watchers):
            await watch._end(unavailable("the store was closed"))
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.wait({self._reaper})
        db.close()

    # -- reads --------------------------------------------------------------------------------

    async def _get(self, key: str) -> KeyValue | None:
        return self._read(key)

    async def _range(self, prefix: str) -> Snapshot:
        where, args = _prefix_clause(prefix.encode())
        rows = self._conn().execute(
            f"SELECT {_KV_COLUMNS} FROM kv WHERE {where} ORDER BY key",  # noqa: S608 (fixed text)
            args,
        )
        return Snapshot(tuple(_key_value(row) for row in rows), self._head)

    async def _revision(self) -> int:
        self._conn()
        return self._head

    # -- writes -------------------------------------------------------------------------------

    async def _put(self, key: str, value: bytes, lease: int | None) -> int:
        with self._transaction() as txn:
            self._write(txn, key, value, lease)
        return txn.revision

    async def _delete(self, key: str) -> int | None:
        with self._transaction() as txn:
            found = self._conn().execute("SELECT 1 FROM kv WHERE key = ?", (key.encode(),))
            if found.fetchone() is None:  # no need to read a value of up to 1 MiB
                return None
            self._erase(txn, key)
        return txn.revision

    async def _put_if(
        self, key: str, value: bytes, lease: int | None, mod_revision: int
    ) -> CasResult:
        with self._transaction() as txn:
            current = self._read(key)
            if (current.mod_revision if current else 0) != mod_revision:
                return CasResult(False, self._head, current)
            self._write(txn, key, value, lease)
        return CasResult(True, txn.revision, None)

    async def _delete_if(self, key: str, mod_revision: int) -> CasResult:
        with self._transaction() as txn:
            current = self._read(key)
            if current is None or current.mod_revision != mod_revision:
                return CasResult(False, self._head, current)
            self._erase(txn, key)
        return CasResult(True, txn.revision, None)

    async def _compact(self, revision: int) -> None:
        if revision > self._head:
            raise StoreError(
                StoreErrorReason.INVALID_ARGUMENT,
                f"{revision} is after the current revision {self._head}",
                field="revision",
            )
        with self._transaction() as txn:
            txn.compact_to = max(revision, self._compact_revision)

    # -- leases -------------------------------------------------------------------------------

    async def _grant(self, ttl: int) -> Lease:
        expires_at = self._clock.now() + ttl
        with self._transaction():
            db = self._conn()
            lease_id = secrets.randbelow(MAX_INT64) + 1
            while db.execute("SELECT 1 FROM lease WHERE id = ?", (lease_id,)).fetchone():
                lease_id = secrets.randbelow(MAX_INT64) + 1
            db.execute("INSERT INTO lease VALUES (?, ?, ?)", (lease_id, ttl, expires_at))
        if expires_at < self._next_expiry and self._sleeper is not None:
            self._sleeper.cancel()  # the reaper sleeps past this lease's expiry: wake it
        return Lease(lease_id, ttl)

    async def _refresh(self, lease_id: int) -> Lease:
        with self._transaction() as txn:
            db = self._conn()
            row = db.execute("SELECT ttl, expires_at FROM lease WHERE id = ?", (lease_id,))
            found = row.fetchone()
            if found is not None:
                ttl, expires_at = found
                now = self._clock.now()
                if expires_at > now:
                    db.execute(_REFRESH, (now + ttl, lease_id))
                    return Lease(lease_id, ttl)
                self._end_lease(txn, lease_id)  # ran out, and the reaper has not got to it yet
        raise lease_not_found(lease_id)

    async def _revoke(self, lease_id: int) -> None:
        with self._transaction() as txn:
            self._end_lease(txn, lease_id)

    def _expire_due(self) -> None:
        """End every lease whose time is up, each in its own revision (as etcd does)."""
        db = self._conn()
        due = db.execute(
            "SELECT id FROM lease WHERE expires_at <= ? ORDER BY expires_at", (self._clock.now(),)
        ).fetchall()
        for (lease_id,) in due:
            with self._transaction() as txn:
                self._end_lease(txn, lease_id)

    async def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        while self._db is not None:
            try:
                self._expire_due()
                (earliest,) = self._conn().execute("SELECT MIN(expires_at) FROM lease").fetchone()
            except Exception:
                if self._db is None:
                    return
                log.exception("expiring leases in %s failed; trying again in a second", self.path)
                earliest = self._clock.now() + 1.0
            self._next_expiry = math.inf if earliest is None else earliest
            self._sleeper = (
                loop.create_future()
                if earliest is None
                else asyncio.ensure_future(self._clock.sleep(earliest - self._clock.now()))
            )
            try:
                await asyncio.wait({self._sleeper})  # ends early when _grant cancels it
            finally:
                self._sleeper.cancel()

    # -- watches ------------------------------------------------------------------------------

    def _watch(self, prefix: str, start_revision: int | None) -> Watch:
        return _SqliteWatch(self, prefix, start_revision)

    def _replay(self, prefix: str, start: int) -> list[tuple[Event, ...]]:
        """History under ``prefix`` from revision ``start`` on, one tuple per revision."""
        db = self._conn()
        if start < self._compact_revision:
            raise StoreError(
                StoreErrorReason.COMPACTED,
                f"history before revision {self._compact_revision} is gone (asked from {start})",
                field="start_revision",
                compact_revision=self._compact_revision,
            )
        where, args = _prefix_clause(prefix.encode())
        rows = db.execute(
            "SELECT revision, key, deleted, value FROM history"  # noqa: S608 (fixed text)
            f" WHERE revision >= ? AND {where} ORDER BY revision, key",
            (start, *args),
        )
        return by_revision(
            Event(EventType.DELETE if deleted else EventType.PUT, key.decode(), value, revision)
            for revision, key, deleted, value in rows
        )

    # -- internals ----------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise unavailable(f"the store {self.path} is closed")
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[_Transaction]:
        """One SQLite transaction; its events take the next revision and reach the watchers."""
        db = self._conn()
        txn = _Transaction(self._head + 1)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield txn
                self._log(db, txn)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise unavailable(f"SQLite {self.path}: {exc}") from exc
        self._compact_revision = max(self._compact_revision, txn.compact_to)
        if txn.events:  # grants, refreshes and lost compare-and-sets change nothing to watch
            self._head = txn.revision
            for watch in list(self._watchers):
                watch.offer(txn.events)

    def _log(self, db: sqlite3.Connection, txn: _Transaction) -> None:
        if txn.events:
            db.executemany(
                "INSERT INTO history VALUES (?, ?, ?, ?)",
                [
                    (e.mod_revision, e.key.encode(), e.type is EventType.DELETE, e.value)
                    for e in txn.events
                ],
            )
            _set_meta(db, "revision", txn.revision)
            if txn.revision - self._compact_revision > self._history + self._history // 8:
                txn.compact_to = txn.revision - self._history + 1
        if txn.compact_to > self._compact_revision:
            db.execute("DELETE FROM history WHERE revision < ?", (txn.compact_to,))
            _set_meta(db, "compact_revision", txn.compact_to)

    def _read(self, key: str) -> KeyValue | None:
        row = (
            self._conn()
            .execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE key = ?", (key.encode(),))  # noqa: S608
            .fetchone()
        )
        return None if row is None else _key_value(row)

    def _write(self, txn: _Transaction, key: str, value: bytes, lease: int | None) -> None:
        db = self._conn()
        if lease is not None:
            row = db.execute("SELECT expires_at FROM lease WHERE id = ?", (lease,)).fetchone()
            if row is None or row[0] <= self._clock.now():
                raise lease_not_found(lease)
        db.execute(
            "INSERT INTO kv VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (key) DO UPDATE SET"
            " value = excluded.value, mod_revision = excluded.mod_revision,"
            " version = version + 1, lease = excluded.lease",
            (key.encode(), value, txn.revision, txn.revision, lease),
        )
        txn.events.append(Event(EventType.PUT, key, value, txn.revision))

    def _erase(self, txn: _Transaction, key: str) -> None:
        self._conn().execute("DELETE FROM kv WHERE key = ?", (key.encode(),))
        txn.events.append(Event(EventType.DELETE, key, b"", txn.revision))

    def _end_lease(self, txn: _Transaction, lease_id: int) -> None:
        db = self._conn()
        keys = db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease_id,)).fetchall()
        db.execute("DELETE FROM kv WHERE lease = ?", (lease_id,))
        db.execute("DELETE FROM lease WHERE id = ?", (lease_id,))
        txn.events.extend(Event(EventType.DELETE, k.decode(), b"", txn.revision) for (k,) in keys)


class _Transaction:
    """What one transaction did: its events (all at ``revision``) and any compaction."""

    def __init__(self, revision: int) -> None:
        self.revision = revision
        self.events: list[Event] = []
        self.compact_to = 0


class _SqliteWatch(Watch):
    """Fed by the store after each commit; past MAX_PENDING queued batches it rereads history."""

    def __init__(self, store: SqliteStore, prefix: str, start_revision: int | None) -> None:
        super().__init__(prefix, start_revision)
        self._store = store
        self._floor = 0  # the first revision this watch may hand out
        self._lagging = False
        self._wakeup: asyncio.Future[None] | None = None

    async def _open(self) -> None:
        store = self._store
        store._conn()
        self._next = self._floor = self._start or store._head + 1
        self._queue(store._replay(self._prefix, self._next))
        store._watchers.add(self)

    def offer(self, events: list[Event]) -> None:
        """Called after each commit (no await in between): queue the matching events."""
        batch = tuple(e for e in events if e.key.startswith(self._prefix))
        if not batch or self._lagging or batch[0].mod_revision < self._floor:
            return  # (a start revision in the future waits for it, as on etcd)
        if len(self._pending) >= MAX_PENDING:
            self._lagging = True  # reread history once the queue is drained
        else:
            self._queue((batch,))
        self._wake()

    async def _receive(self) -> None:
        if self._lagging:
            self._lagging = False
            try:
                self._queue(self._store._replay(self._prefix, self._next))
            except StoreError as exc:
                await self._end(exc)
            return
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def _release(self) -> None:
        self._store._watchers.discard(self)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)


def _connect(path: Path, fsync: bool) -> sqlite3.Connection:
    """Open the file owner-only, take it for this process alone, and create or check the schema."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives its WAL this mode
        os.chmod(path, 0o600)
    except OSError as exc:
        raise _unusable(path, exc.strerror or str(exc)) from exc
    db = sqlite3.connect(path, isolation_level=None, timeout=0.5)
    try:
        db.execute("PRAGMA locking_mode = EXCLUSIVE")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
        db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock, held until close
        for statement in _SCHEMA:
            db.execute(statement)
        rows = dict(db.execute("SELECT name, value FROM meta").fetchall())
        if not rows:
            db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("schema", SCHEMA_VERSION), ("revision", 1), ("compact_revision", 1)],
            )
        elif rows.get("schema") != SCHEMA_VERSION:
            raise _unusable(path, f"schema version {rows.get('schema')}, expected {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        db.close()
        if "locked" in str(exc):
            raise _unusable(path, "it is open in another process") from exc
        raise _unusable(path, str(exc)) from exc
    except sqlite3.Error as exc:
        db.close()
        raise _unusable(path, str(exc)) from exc
    except StoreError:
        db.close()
        raise
    return db


def _meta(db: sqlite3.Connection, name: str) -> int:
    (value,) = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return int(value)


def _set_meta(db: sqlite3.Connection, name: str, value: int) -> None:
    db.execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))


def _prefix_clause(prefix: bytes) -> tuple[str, tuple[bytes, ...]]:
    end = prefix_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)


def _key_value(row: tuple[bytes, bytes, int, int, int, int | None]) -> KeyValue:
    key, value, create_revision, mod_revision, version, lease = row
    return KeyValue(key.decode(), value, create_revision, mod_revision, version, lease)


def _unusable(path: Path, why: str) -> StoreError:
    return unavailable(f"cannot use {path} as a store: {why}")
