"""The sidecar's side of the catalog: calls with its SVID, and a watch that never misses a change.

Every coordinator it is given is checked on each connection by ``coordinator_check`` (in the
sidecar: its certificate must be one the admission helper verified against the coordinator
policy). Calls and the watch fail over to the next coordinator when one is unreachable or
answers 503; the watch resumes from the last revision it delivered (``Last-Event-ID``), so the
caller sees every change exactly once, in order, across failovers. If the history it needs was
compacted meanwhile, the watch lists again and hands over a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from teemesh.coordinator.errors import NotRegistered
from teemesh.errors import InputError, PeerError, Refused
from teemesh.net.async_https import AsyncAttestedHttps, NotSent
from teemesh.net.sse import WATCH_KEEPALIVE, SseParser
from teemesh.net.tls import DerCheck, PemPair

RETRY_FIRST, RETRY_MAX = 0.2, 5.0


@dataclass(frozen=True)
class CatalogUpdate:
    """One step of a watch: a full listing (``snapshot``), or the changes of one revision."""

    revision: int
    snapshot: dict[str, Any] | None
    events: tuple[dict[str, Any], ...] = ()


class Unavailable(PeerError):
    """No coordinator answered."""


@dataclass(frozen=True)
class RawReply:
    """A coordinator's answer as it came (``CatalogClient.raw``)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    url: str
    """The coordinator that answered."""


REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""Methods ``raw`` sends to the next coordinator when an exchange broke off midway."""


class CatalogClient:
    def __init__(
        self,
        urls: Sequence[str],
        coordinator_check: DerCheck,
        svid: PemPair,
        *,
        timeout: float = 10.0,
    ) -> None:
        if not urls:
            raise InputError("at least one coordinator URL is needed", field="urls")
        self.coordinators = [
            AsyncAttestedHttps(u, coordinator_check, client_cert=svid, timeout=timeout)
            for u in urls
        ]
        self._next = itertools.cycle(range(len(self.coordinators)))
        self._current = next(self._next)

    def use_svid(self, svid: PemPair) -> None:
        for coordinator in self.coordinators:
            coordinator.use_client_cert(svid)

    def _rotate(self) -> None:
        self._current = next(self._next)

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One call, on the current coordinator or, failing that, each of the others in turn."""
        failures = []
        for _ in self.coordinators:
            https = self.coordinators[self._current]
            try:
                status, doc = await https.request(method, path, body)
            except PeerError as exc:
                failures.append(str(exc))
                self._rotate()
                continue
            if status == 503:
                failures.append(f"{https.url}: HTTP 503: {_detail(doc)}")
                self._rotate()
                continue
            return _reply(status, doc, f"{https.url}{path}")
        raise Unavailable("no coordinator answered: " + "; ".join(failures))

    async def raw(
        self, method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
    ) -> RawReply:
        """One request passed through as it is (the client proxy's VPC calls), with the same
        pinning and failover as ``call``: the next coordinator is tried when one is unreachable,
        fails its check or answers 503, and when an exchange broke off midway only for a
        ``REPLAYABLE`` method. All answering 503: the last 503. Else PeerError."""
        failures, busy = [], None
        for _ in self.coordinators:
            https = self.coordinators[self._current]
            try:
                reply = RawReply(*await https.exchange(method, path, body, headers), https.url)
            except PeerError as exc:
                if not isinstance(exc, NotSent) and method not in REPLAYABLE:
                    raise
                failures.append(str(exc))
                self._rotate()
                continue
            if reply.status == 503:
                failures.append(f"{https.url}: HTTP 503")
                busy = reply
                self._rotate()
                continue
            return reply
        if busy is not None:
            return busy
        raise Unavailable("no coordinator answered: " + "; ".join(failures))

    async def register(
        self,
        service: str,
        address: str,
        port: int,
        *,
        tags: dict[str, str] | None = None,
        health: str = "passing",
    ) -> dict[str, Any]:
        body = {"service": service, "address": address, "port": port, "tags": tags or {},
                "health": health}  # fmt: skip
        return await self.call("POST", "/v1/catalog/register", body)

    async def heartbeat(self) -> dict[str, Any]:
        return await self.call("POST", "/v1/catalog/heartbeat", {})

    async def update(
        self, service: str, *, tags: dict[str, str] | None = None, health: str | None = None
    ) -> dict[str, Any]:
        body = {k: v for k, v in (("tags", tags), ("health", health)) if v is not None}
        return await self.call("PATCH", f"/v1/catalog/instances/{quote(service)}", body)

    async def deregister(self, service: str) -> dict[str, Any]:
        return await self.call("DELETE", f"/v1/catalog/instances/{quote(service)}")

    async def read(self, prefix: str = "instances/") -> dict[str, Any]:
        return await self.call("GET", f"/v1/catalog?prefix={quote(prefix)}")

    async def watch(self, prefix: str = "instances/") -> AsyncIterator[CatalogUpdate]:
        """A snapshot first, then every change; across coordinator failures, forever."""
        last: int | None = None
        delay = RETRY_FIRST
        while True:
            https = self.coordinators[self._current]
            headers = [("Last-Event-ID", str(last))] if last is not None else []
            path = f"/v1/catalog/watch?prefix={quote(prefix)}"
            try:
                status, chunks = await https.stream(path, headers)
            except PeerError:
                status, chunks = 0, None
            if chunks is not None and status != 200:
                body = b"".join([c async for c in chunks])
                if status != 503:
                    _reply(status, _loads(body), f"{https.url}{path}")  # raises what it says
            elif chunks is not None:
                parser = SseParser()
                try:
                    while True:
                        chunk = await asyncio.wait_for(anext(chunks), 3 * WATCH_KEEPALIVE)
                        for event in parser.feed(chunk):
                            update, last = _update(event.event, event.data, last)
                            if update is not None:
                                delay = RETRY_FIRST
                                yield update
                except (StopAsyncIteration, TimeoutError, PeerError, OSError):
                    pass
                finally:
                    await chunks.aclose()  # type: ignore[attr-defined]
            self._rotate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)


def _update(kind: str, data: str, last: int | None) -> tuple[CatalogUpdate | None, int | None]:
    """Apply one SSE event; returns what to hand the caller and the revision to resume after."""
    doc = _loads(data.encode())
    if not isinstance(doc, dict):
        raise PeerError(f"malformed catalog event: {data[:200]!r}")
    if kind == "snapshot":
        items = {i["key"]: i["value"] for i in doc["items"]}
        return CatalogUpdate(doc["revision"], items), doc["revision"]
    if kind == "change":
        return CatalogUpdate(doc["revision"], None, tuple(doc["events"])), doc["revision"]
    if kind == "error" and doc.get("reason") == "COMPACTED":
        return None, None  # history gone: list again on reconnecting
    if kind == "error" and doc.get("reason") == "UNAUTHORIZED":
        raise Refused(str(doc.get("error")))
    return None, last


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")[:300]


def _detail(doc: Any) -> str:
    return str(doc.get("error") if isinstance(doc, dict) else doc)[:300]


def _reply(status: int, doc: Any, where: str) -> dict[str, Any]:
    if status == 200 and isinstance(doc, dict):
        return doc
    detail = _detail(doc)
    if status in (401, 403):
        raise Refused(f"{where}: {detail}")
    if status in (404, 410):
        raise NotRegistered(detail, status)
    raise PeerError(f"{where}: HTTP {status}: {detail}")
