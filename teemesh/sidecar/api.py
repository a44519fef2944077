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
from typing import Any

import h11

from teemesh.encoding import load_json
from teemesh.errors import InputError

MAX_BODY = 64 * 1024
READ_TIMEOUT = 10.0

Reply = tuple[int, str, bytes]
Handler = Callable[[str, str, Any], Awaitable[Reply]]


def json_reply(status: int, doc: Any) -> Reply:
    return status, "application/json", json.dumps(doc, indent=1).encode() + b"\n"


async def serve_api(host: str, port: int, handler: Handler) -> asyncio.Server:
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
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler
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
                status, kind, payload = json_reply(413, {"error": "body too large"})
                break
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            assert request is not None
            status, kind, payload = await _dispatch(request, bytes(body), handler)
            break
    headers = [("Content-Type", kind), ("Content-Length", str(len(payload))),
               ("Connection", "close")]  # fmt: skip
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    writer.write(conn.send(h11.Data(data=payload)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


async def _dispatch(request: h11.Request, body: bytes, handler: Handler) -> Reply:
    method, path = request.method.decode(), request.target.decode("ascii", "replace")
    try:
        doc = load_json(body, field="body") if body else None
        return await handler(method, path, doc)
    except InputError as exc:
        return json_reply(400, {"error": str(exc)})
