"""The catalog API for sidecars: register, heartbeat, tags and health, read, and a watch stream.

The watch is server-sent events. Without a start revision it opens with a ``snapshot`` event
(the listing and its revision), then ``change`` events, one per store revision, each with the
revision as its SSE ``id``, so a client that reconnects with ``Last-Event-ID`` (or
``?revision=``) resumes exactly where it stopped, on this coordinator or another one. An
``error`` event ends the stream (``COMPACTED``: list again). A comment line every
``WATCH_KEEPALIVE`` seconds keeps idle connections honest; the caller's certificate is checked again
every ``WATCH_KEEPALIVE`` seconds, busy or idle, so a revoked peer's stream ends within that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from teemesh.catalog.store import Event, EventType, StoreError
from teemesh.coordinator.catalog import Caller, Catalog, check_readable
from teemesh.coordinator.http_util import Log, catalog_of, json_body
from teemesh.coordinator.records import InstanceUpdate, Registration, parse_request
from teemesh.errors import InputError, MeshError, PeerError, Refused
from teemesh.net.sse import WATCH_KEEPALIVE
from teemesh.platform.prpc import PEER_CERT

WATCH_BUFFER = 256
"""Batches a watch stream holds for a slow client before the store gives up on it."""
ENCODED_CHANGES = 64
"""Recent change events kept encoded: every stream watching a revision sends the same bytes."""

_encoded: dict[tuple[Event, ...], bytes] = {}


async def _caller(request: Request) -> Caller:
    return await catalog_of(request).authenticate(getattr(request.state, PEER_CERT, None))


def sse(event: str, data: Any, revision: int | None = None) -> bytes:
    head = f"id: {revision}\n" if revision is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def event_json(event: Event) -> dict[str, Any]:
    value = json.loads(event.value) if event.type is EventType.PUT else None
    return {"type": event.type.value, "key": event.key, "value": value}


def change_event(batch: tuple[Event, ...]) -> bytes:
    """One revision's ``change`` event, encoded once for all the streams that send it.

    A pure function of the events, remembered by them (equal events, equal bytes), so a
    thousand watchers of one write cost one JSON round trip instead of a thousand.
    """
    data = _encoded.get(batch)
    if data is None:
        revision = batch[0].mod_revision
        doc = {"revision": revision, "events": [event_json(e) for e in batch]}
        data = sse("change", doc, revision)
        if len(_encoded) >= ENCODED_CHANGES:
            del _encoded[next(iter(_encoded))]  # the oldest: dicts keep insertion order
        _encoded[batch] = data
    return data


def start_revision(request: Request) -> int | None:
    """The first revision wanted: ``?revision=N``, or the one after ``Last-Event-ID``."""
    raw = request.query_params.get("revision")
    after = request.headers.get("last-event-id")
    try:
        if raw is not None:
            value = int(raw)
        elif after is not None:
            value = int(after) + 1
        else:
            return None
    except ValueError:
        value = 0
    if not 0 < value < 2**63:
        raise InputError("expected a positive integer revision", field="revision")
    return value


async def watch_stream(
    catalog: Catalog,
    der: bytes | None,
    prefix: str,
    start: int | None,
    keepalive: float = WATCH_KEEPALIVE,
) -> AsyncIterator[bytes]:
    store = catalog.coordinator.store
    if start is None:
        listing = await catalog.read(prefix)
        yield sse("snapshot", listing, listing["revision"])
        start = listing["revision"] + 1
    batches: asyncio.Queue[tuple[Event, ...] | BaseException | None] = asyncio.Queue(WATCH_BUFFER)

    async def pump() -> None:
        try:
            async with store.watch(prefix, start_revision=start) as changes:
                async for events in changes:
                    await batches.put(events)
            await batches.put(None)
        except Exception as exc:
            await batches.put(exc)

    task = asyncio.create_task(pump())
    checked = time.monotonic()
    try:
        while True:
            if time.monotonic() - checked >= keepalive:  # busy or idle alike
                if (refusal := await _still_allowed(catalog, der)) is not None:
                    yield refusal
                    return
                checked = time.monotonic()
            try:
                async with asyncio.timeout(keepalive):  # no task per wait, unlike wait_for
                    item = await batches.get()
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                reason = item.reason.value if isinstance(item, StoreError) else "UNAVAILABLE"
                yield sse("error", {"error": str(item), "reason": reason})
                return
            yield change_event(item)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _still_allowed(catalog: Catalog, der: bytes | None) -> bytes | None:
    """None while the caller's certificate is live; else the event that ends its stream."""
    try:
        await catalog.authenticate(der)
    except (Refused, PeerError) as exc:  # revoked, superseded: the client must not retry
        return sse("error", {"error": str(exc), "reason": "UNAUTHORIZED"})
    except MeshError as exc:  # the store is in trouble: the client retries elsewhere
        return sse("error", {"error": str(exc), "reason": "UNAVAILABLE"})
    return None


def add_catalog_routes(app: FastAPI, log: Log, keepalive: float = WATCH_KEEPALIVE) -> None:
    @app.post("/v1/catalog/register")
    async def register(request: Request) -> dict[str, Any]:
        caller = await _caller(request)
        reg = parse_request(Registration, await json_body(request))
        reply = await catalog_of(request).register(caller, reg)
        log(f"{caller.svid.peer} registered {reg.service} at {reg.address}:{reg.port}")
        return reply

    @app.post("/v1/catalog/heartbeat")
    async def heartbeat(request: Request) -> dict[str, Any]:
        return await catalog_of(request).heartbeat(await _caller(request))

    @app.patch("/v1/catalog/instances/{service}")
    async def update(service: str, request: Request) -> dict[str, Any]:
        caller = await _caller(request)
        change = parse_request(InstanceUpdate, await json_body(request))
        return await catalog_of(request).update(caller, service, change)

    @app.delete("/v1/catalog/instances/{service}")
    async def deregister(service: str, request: Request) -> dict[str, Any]:
        caller = await _caller(request)
        reply = await catalog_of(request).deregister(caller, service)
        log(f"{caller.svid.peer} deregistered {service}")
        return reply

    @app.get("/v1/catalog")
    async def read(request: Request, prefix: str = "instances/") -> dict[str, Any]:
        await _caller(request)
        return await catalog_of(request).read(prefix)

    @app.get("/v1/catalog/watch")
    async def watch(request: Request, prefix: str = "instances/") -> StreamingResponse:
        await _caller(request)
        start = start_revision(request)
        check_readable(prefix)
        der = getattr(request.state, PEER_CERT, None)
        stream = watch_stream(catalog_of(request), der, prefix, start, keepalive)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
