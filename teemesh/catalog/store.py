"""The catalog's store contract: keys with revisions, compare-and-set, leases and watches.

It is etcd's v3 data model cut down to what a catalog needs (Patroni's embedded raft backend
shows that KV + lease/TTL + compare-and-set + watch is enough), so the etcd backend is a thin
translation and the embedded one has a reference to match. Services, instances and admissions
are built on top of it in shared code, never inside a backend.

What every backend guarantees:

- **Revisions.** One store-wide counter; every write (put, delete, a won compare-and-set, the
  deletions of an expired or revoked lease) is atomic and takes the next revision. A key's
  ``mod_revision`` is the revision of its last write. Reads never change it, and neither do
  lease grants and refreshes, or deleting a key that does not exist.
- **Compare-and-set is linearizable.** Of two writers racing on one ``mod_revision``, exactly one
  wins; the loser learns what the key holds now, without a second read.
- **Leases.** A key put with a lease is deleted when the lease is revoked or expires (not
  refreshed within its TTL; expiry may lag by about a second). Those deletions are ordinary
  delete events; all keys of one lease go in one revision.
- **Watches.** Every change to the prefix after ``start_revision`` is delivered exactly once, in
  revision order, with all events of one revision in one batch, so a client that resumes from
  the last batch's revision + 1 never misses or repeats a change. A start revision older than the
  retained history raises ``StoreError`` with reason ``COMPACTED``: list again (``range``) and
  watch from the listing's revision + 1.

Every public method checks its arguments here, once for all backends, then calls the backend's
underscore primitive (Patroni's template methods).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import groupby
from operator import attrgetter
from types import TracebackType
from typing import Self, TypeGuard

from teemesh.errors import MeshError

MAX_KEY_BYTES = 1024
"""Longest key, in UTF-8 bytes (etcd's prefix not counted)."""
MAX_VALUE_BYTES = 1024 * 1024
"""Largest value: 1 MiB, below etcd's default request limit of 1.5 MiB."""
MAX_LEASE_TTL = 365 * 86_400
"""Longest lease, in seconds; leases are for liveness, and both backends accept this much."""
MAX_INT64 = 2**63 - 1


class StoreErrorReason(StrEnum):
    """What went wrong, which is what the caller can do about it."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # the call is wrong: fix the caller
    LEASE_NOT_FOUND = "LEASE_NOT_FOUND"  # expired or revoked: grant a new one, write again
    COMPACTED = "COMPACTED"  # history is gone: list again, watch from the listing
    UNAVAILABLE = "UNAVAILABLE"  # unreachable, closed or unusable: retry, maybe elsewhere


class StoreError(MeshError):
    """The one error a store raises on purpose; ``reason`` says what the caller can do."""

    def __init__(
        self,
        reason: StoreErrorReason,
        message: str,
        *,
        field: str | None = None,
        compact_revision: int | None = None,
    ) -> None:
        self.reason = reason
        self.field = field
        self.compact_revision = compact_revision
        where = f"{field}: " if field else ""
        super().__init__(f"{reason.value}: {where}{message}")


class EventType(StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int  # writes since the key was created: 1 after creation
    lease: int | None


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    key: str
    value: bytes  # empty for a delete
    mod_revision: int  # the revision of this change


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int  # seconds it lives from a grant or refresh (etcd may round up to its minimum)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The keys under a prefix as of ``revision``: watch from ``revision + 1`` to follow them."""

    kvs: tuple[KeyValue, ...]
    revision: int


@dataclass(frozen=True, slots=True)
class CasResult:
    """A compare-and-set outcome.

    Won: ``revision`` is the write's revision and ``current`` is None. Lost: ``revision`` is the
    store's revision and ``current`` what the key holds now (None when it does not exist).
    """

    succeeded: bool
    revision: int
    current: KeyValue | None


class Watch(ABC):
    """Changes under a prefix as batches of events, one batch per revision.

    Use it as ``async with store.watch(prefix) as changes: async for events in changes: ...``;
    entering it registers the watch, so no change after that (or after ``start_revision``) is
    missed. It raises ``StoreError`` when it cannot go on: ``COMPACTED`` (on entering, or while
    iterating once it fell behind the retained history) or ``UNAVAILABLE`` (backend lost or
    store closed); resume from the last batch's revision + 1.

    The queue, closing and ending are here; a backend only says how batches arrive
    (``_open``, ``_receive``) and what to let go of when the watch stops (``_release``).
    """

    def __init__(self, prefix: str, start_revision: int | None) -> None:
        self._prefix = prefix
        self._start = start_revision
        self._next = start_revision or 0  # where to resume after what is queued; 0: from now
        self._pending: deque[tuple[Event, ...]] = deque()
        self._opened = False
        self._closed = False
        self._error: StoreError | None = None

    async def __aenter__(self) -> Self:
        await self._open()
        self._opened = True
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[Event, ...]:
        if not self._opened:
            raise invalid("watch", "enter the watch with 'async with'")
        while not self._pending:
            ending = self._ending()
            if ending is not None:
                raise ending
            await self._receive()
        return self._pending.popleft()

    async def aclose(self) -> None:
        """Stop watching; iteration then ends. Safe to call twice."""
        self._closed = True
        await self._release()

    async def _end(self, error: StoreError) -> None:
        """Stop watching because of ``error``, which iteration then raises."""
        self._error = error
        await self._release()

    def _queue(self, batches: Sequence[tuple[Event, ...]]) -> None:
        """Hold batches for iteration; the backend resumes from ``_next`` after them."""
        if batches:
            self._pending.extend(batches)
            self._next = batches[-1][0].mod_revision + 1

    def _ending(self) -> BaseException | None:
        """What iteration raises once queued batches are out: closed, or the ending error."""
        return StopAsyncIteration() if self._closed else self._error

    @abstractmethod
    async def _open(self) -> None:
        """Register the watch with the backend, queueing any history it starts from."""

    @abstractmethod
    async def _receive(self) -> None:
        """Wait for more batches and queue them; returning with none only means another call."""

    @abstractmethod
    async def _release(self) -> None:
        """Unregister the watch and wake or stop whatever waits for batches."""


class Store(ABC):
    """The contract; see the module docstring for what each backend guarantees."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def get(self, key: str) -> KeyValue | None:
        return await self._get(check_key(key))

    async def range(self, prefix: str = "") -> Snapshot:
        """Every key starting with ``prefix``, in key order, and the revision they are as of."""
        return await self._range(check_key(prefix, field="prefix", empty=True))

    async def revision(self) -> int:
        """The store's current revision."""
        return await self._revision()

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Write ``key``; returns the write's revision. LEASE_NOT_FOUND if ``lease`` is gone."""
        return await self._put(check_key(key), check_value(value), _check_lease_id(lease))

    async def delete(self, key: str) -> int | None:
        """Delete ``key``; returns the deletion's revision, or None if there was no such key."""
        return await self._delete(check_key(key))

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> CasResult:
        """Put ``key`` only if it does not exist."""
        return await self._put_if(check_key(key), check_value(value), _check_lease_id(lease), 0)

    async def replace(
        self, key: str, value: bytes, held: KeyValue | None, *, lease: int | None = None
    ) -> CasResult:
        """Put ``key`` only if it still is ``held`` as read (None: only if it does not exist)."""
        mod_revision = held.mod_revision if held is not None else 0
        return await self._put_if(
            check_key(key), check_value(value), _check_lease_id(lease), mod_revision
        )

    async def put_if(
        self, key: str, value: bytes, *, mod_revision: int, lease: int | None = None
    ) -> CasResult:
        """Put ``key`` only if its ``mod_revision`` is still the one given (it must exist)."""
        return await self._put_if(
            check_key(key),
            check_value(value),
            _check_lease_id(lease),
            check_revision(mod_revision, "mod_revision"),
        )

    async def delete_if(self, key: str, *, mod_revision: int) -> CasResult:
        """Delete ``key`` only if its ``mod_revision`` is still the one given."""
        return await self._delete_if(check_key(key), check_revision(mod_revision, "mod_revision"))

    async def grant(self, ttl: int) -> Lease:
        """A new lease that lives ``ttl`` seconds unless refreshed."""
        if not _is_int(ttl) or not 1 <= ttl <= MAX_LEASE_TTL:
            raise invalid("ttl", f"must be whole seconds from 1 to {MAX_LEASE_TTL}")
        return await self._grant(ttl)

    async def refresh(self, lease_id: int) -> Lease:
        """Keep a lease alive for another TTL; LEASE_NOT_FOUND once it expired or was revoked."""
        return await self._refresh(_require_lease_id(lease_id))

    async def revoke(self, lease_id: int) -> None:
        """End a lease now, deleting its keys; a lease already gone is not an error."""
        await self._revoke(_require_lease_id(lease_id))

    def watch(self, prefix: str = "", *, start_revision: int | None = None) -> Watch:
        """Changes under ``prefix`` from ``start_revision`` (default: from now on)."""
        prefix = check_key(prefix, field="prefix", empty=True)
        if start_revision is not None:
            check_revision(start_revision, "start_revision")
        return self._watch(prefix, start_revision)

    async def compact(self, revision: int) -> None:
        """Forget history before ``revision``; watches cannot start earlier afterwards."""
        await self._compact(check_revision(revision, "revision"))

    @abstractmethod
    async def aclose(self) -> None:
        """Release the store; its watches end with UNAVAILABLE. Safe to call twice."""

    @abstractmethod
    async def _get(self, key: str) -> KeyValue | None: ...

    @abstractmethod
    async def _range(self, prefix: str) -> Snapshot: ...

    @abstractmethod
    async def _revision(self) -> int: ...

    @abstractmethod
    async def _put(self, key: str, value: bytes, lease: int | None) -> int: ...

    @abstractmethod
    async def _delete(self, key: str) -> int | None: ...

    @abstractmethod
    async def _put_if(
        self, key: str, value: bytes, lease: int | None, mod_revision: int
    ) -> CasResult:
        """Put if the key's mod_revision equals ``mod_revision``; 0 means "does not exist"."""

    @abstractmethod
    async def _delete_if(self, key: str, mod_revision: int) -> CasResult: ...

    @abstractmethod
    async def _grant(self, ttl: int) -> Lease: ...

    @abstractmethod
    async def _refresh(self, lease_id: int) -> Lease: ...

    @abstractmethod
    async def _revoke(self, lease_id: int) -> None: ...

    @abstractmethod
    def _watch(self, prefix: str, start_revision: int | None) -> Watch: ...

    @abstractmethod
    async def _compact(self, revision: int) -> None: ...


def lease_not_found(lease_id: int) -> StoreError:
    """What every backend raises for a lease that expired or was revoked."""
    return StoreError(
        StoreErrorReason.LEASE_NOT_FOUND,
        f"lease {lease_id} does not exist (expired or revoked)",
        field="lease",
    )


def check_key(key: object, *, field: str = "key", empty: bool = False) -> str:
    """A key (or, with ``empty``, a prefix): a str of at most MAX_KEY_BYTES UTF-8 bytes."""
    if not isinstance(key, str):
        raise invalid(field, f"must be a str, not {type(key).__name__}")
    if not key and not empty:
        raise invalid(field, "must not be empty")
    try:
        size = len(key.encode())
    except UnicodeEncodeError as exc:
        raise invalid(field, "is not valid Unicode (lone surrogate)") from exc
    if size > MAX_KEY_BYTES:
        raise invalid(field, f"is {size} bytes long; the limit is {MAX_KEY_BYTES}")
    return key


def check_value(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise invalid("value", f"must be bytes, not {type(value).__name__}")
    if len(value) > MAX_VALUE_BYTES:
        raise invalid("value", f"is {len(value)} bytes long; the limit is {MAX_VALUE_BYTES}")
    return value


def check_revision(revision: object, field: str) -> int:
    if not _is_int(revision) or not 1 <= revision <= MAX_INT64:
        raise invalid(field, "must be a positive revision")
    return revision


def by_revision(events: Iterable[Event]) -> list[tuple[Event, ...]]:
    """Events in revision order as watch batches: one tuple per revision."""
    return [tuple(batch) for _, batch in groupby(events, key=attrgetter("mod_revision"))]


def prefix_end(prefix: bytes) -> bytes | None:
    """The first byte string after every key that starts with ``prefix`` (None: no end)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _check_lease_id(lease: object) -> int | None:
    return None if lease is None else _require_lease_id(lease)


def _require_lease_id(lease: object) -> int:
    if not _is_int(lease) or not 1 <= lease <= MAX_INT64:
        raise invalid("lease", "must be a lease id (a positive integer)")
    return lease


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def invalid(field: str, message: str) -> StoreError:
    return StoreError(StoreErrorReason.INVALID_ARGUMENT, message, field=field)


def unavailable(message: str) -> StoreError:
    return StoreError(StoreErrorReason.UNAVAILABLE, message)
