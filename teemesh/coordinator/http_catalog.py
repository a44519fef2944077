"""The catalog API for sidecars: register, heartbeat, tags and health, read, and a watch stream.

The watch is server-sent events. Without a start revision it opens with a ``snapshot`` event
(the listing and its revision), then ``change`` events, one per store revision, each with the
revision as its SSE ``id``, so a client that reconnects with ``Last-Event-ID`` (or
``?revision=``) resumes exactly where it stopped, on this coordinator or another one. An
``error`` event ends the stream (``COMPACTED``: list again). A comment line every
``WATCH_KEEPALIVE`` seconds keeps idle connections honest; the caller's certificate is checked again
then, so a revoked peer's stream ends within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from teemesh.catalog.store import Event, EventType, StoreError
from teemesh.coordinator.catalog import Caller, Catalog, check_readable
from teemesh.coordinator.http_util import Log, catalog_of, json_body
from teemesh.coordinator.records import (
    WATCH_KEEPALIVE,
    InstanceUpdate,
    Registration,
    parse_request,
)
from teemesh.errors import InputError, MeshError
from teemesh.platform.prpc import PEER_CERT

WATCH_BUFFER = 256
"""Batches a watch stream holds for a slow client before the store gives up on it."""


async def _caller(request: Request) -> Caller:
    return await catalog_of(request).authenticate(getattr(request.state, PEER_CERT, None))


def sse(event: str, data: Any, revision: int | None = None) -> bytes:
    head = f"id: {revision}\n" if revision is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def event_json(event: Event) -> dict[str, Any]:
    value = json.loads(event.value) if event.type is EventType.PUT else None
    return {"type": event.type.value, "key": event.key, "value": value}


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
    catalog: Catalog, der: bytes | None, prefix: str, start: int | None
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
        except MeshError as exc:
            await batches.put(exc)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(batches.get(), WATCH_KEEPALIVE)
            except TimeoutError:
                await catalog.authenticate(der)  # revoked meanwhile: the stream ends
                yield b": keepalive\n\n"
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                reason = item.reason.value if isinstance(item, StoreError) else "UNAVAILABLE"
                yield sse("error", {"error": str(item), "reason": reason})
                return
            revision = item[0].mod_revision
            doc = {"revision": revision, "events": [event_json(e) for e in item]}
            yield sse("change", doc, revision)
    except MeshError as exc:
        yield sse("error", {"error": str(exc), "reason": "UNAUTHORIZED"})
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def add_catalog_routes(app: FastAPI, log: Log) -> None:
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
        stream = watch_stream(catalog_of(request), der, prefix, start)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
