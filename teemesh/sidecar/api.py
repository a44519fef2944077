"""The sidecar's local API, on the CVM's loopback: status, metrics, and workload-owned tags.

    GET  /health                  200 once admitted and serving, else 503
    GET  /v1/status               who we are, admission, routes, backends, open tunnels
    GET  /metrics                 Prometheus text
    POST /v1/backends/<service>   {"role": "master" | null, "tags": {...}, "health": "..."}
    POST /v1/admission/renew      renew the SVID now (202; watch /v1/status for the new serial)

HTTP/1.1 with h11, one request per connection; small bodies only. Whoever can reach the CVM's
loopback is inside the CVM, the same trust as the workload itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11

from teemesh.encoding import load_json
from teemesh.errors import InputError

MAX_BODY = 64 * 1024
READ_TIMEOUT = 10.0

Reply = tuple[int, str, bytes]
Handler = Callable[[str, str, Any], Awaitable[Reply]]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    """Lowercase names; a repeated header keeps its last value."""
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    kind: str
    payload: bytes
    headers: tuple[tuple[str, str], ...] = ()


RawHandler = Callable[[Request], Awaitable[Response]]


def json_reply(status: int, doc: Any) -> Reply:
    return status, "application/json", json.dumps(doc, indent=1).encode() + b"\n"


async def serve_api(host: str, port: int, handler: Handler) -> asyncio.Server:
    """JSON in and out: ``handler(method, path, body as JSON or None)``."""

    async def json_handler(request: Request) -> Response:
        return Response(*await _dispatch(request, handler))

    return await serve_http(host, port, json_handler)


async def serve_http(host: str, port: int, handler: RawHandler) -> asyncio.Server:
    """One request per connection, headers in and out (the auth service's contract)."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(_one_request(reader, writer, handler), READ_TIMEOUT)
        except (OSError, TimeoutError, h11.ProtocolError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(connection, host, port)


async def _one_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: RawHandler
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    body = bytearray()
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body.extend(event.data)
            if len(body) > MAX_BODY:
                response = Response(*json_reply(413, {"error": "body too large"}))
                break
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            assert request is not None
            response = await handler(Request(
                request.method.decode(), request.target.decode("ascii", "replace"),
                {k.decode().lower(): v.decode("latin-1") for k, v in request.headers},
                bytes(body),
            ))  # fmt: skip
            break
    headers = [*response.headers, ("Content-Type", response.kind),
               ("Content-Length", str(len(response.payload))), ("Connection", "close")]  # fmt: skip
    writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
    writer.write(conn.send(h11.Data(data=response.payload)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


async def _dispatch(request: Request, handler: Handler) -> Reply:
    try:
        doc = load_json(request.body, field="body") if request.body else None
        return await handler(request.method, request.path, doc)
    except InputError as exc:
        return json_reply(400, {"error": str(exc)})
