"""Async HTTPS to an attested peer, for long-running roles (sidecars): requests and event streams.

Same rule as ``attested_https``: the server's certificate is checked right after the handshake,
before a request byte is sent. HTTP/1.1 is spoken with h11 over asyncio streams, one connection
per request (catalog calls are rare; the watch stream holds its own connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any

import h11

from teemesh.encoding import load_json
from teemesh.errors import InputError, MeshError, PeerError
from teemesh.net.tls import MAX_REPLY, DerCheck, PemPair, https_target, tls_context

READ_CHUNK = 64 * 1024
CLOSE_TIMEOUT = 1.0


class AsyncAttestedHttps:
    def __init__(
        self,
        url: str,
        server_check: DerCheck,
        *,
        client_cert: PemPair | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url, self.host, self.port = https_target(url)
        self.server_check = server_check
        self.timeout = timeout
        self.context = tls_context(server=False, identity=client_cert)

    def use_client_cert(self, client_cert: PemPair) -> None:
        """Present a renewed certificate on the next connections; open ones keep theirs."""
        self.context = tls_context(server=False, identity=client_cert)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.context, limit=READ_CHUNK),
            self.timeout,
        )
        try:
            ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True)
            if der is None:
                raise PeerError("the server sent no certificate")
            self.server_check(der)
        except BaseException:
            await close(writer)
            raise
        return reader, writer

    async def request(
        self, method: str, path: str, body: Any = None, headers: Sequence[tuple[str, str]] = ()
    ) -> tuple[int, Any]:
        """One request; returns the status and the JSON reply. Failures are PeerErrors."""
        payload = b"" if body is None else json.dumps(body).encode()
        json_type = [] if body is None else [("Content-Type", "application/json")]
        status, _, data = await self.exchange(method, path, payload, [*headers, *json_type])
        try:
            return status, load_json(data, field=path)
        except InputError as exc:
            raise PeerError(f"{self.url}{path}: HTTP {status}: {exc}") from exc

    async def exchange(
        self, method: str, path: str, payload: bytes = b"", headers: Sequence[tuple[str, str]] = ()
    ) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
        """One request with a body of bytes: the reply's status, headers and body (at most
        MAX_REPLY bytes). Failures are PeerErrors; NotSent when no byte of the request left
        (no connection, or the server's certificate refused), so it may go to another server."""
        where = f"{self.url}{path}"
        try:
            reader, writer = await self._connect()
        except (OSError, TimeoutError, ssl.SSLError, MeshError) as exc:
            raise NotSent(f"{where}: {exc or type(exc).__name__}") from exc
        try:
            async with asyncio.timeout(self.timeout):
                response, chunks = await self._send(reader, writer, method, path, payload, headers)
                data = bytearray()
                try:
                    async for chunk in chunks:
                        data += chunk
                        if len(data) > MAX_REPLY:
                            raise PeerError(f"reply over {MAX_REPLY} bytes")
                finally:
                    await chunks.aclose()  # type: ignore[attr-defined]
        except (OSError, TimeoutError, ValueError, h11.ProtocolError, ssl.SSLError) as exc:
            raise PeerError(f"{where}: {exc or type(exc).__name__}") from exc
        except MeshError as exc:
            raise PeerError(f"{where}: {exc}") from exc
        fields = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers)
        return response.status_code, fields, bytes(data)

    async def stream(
        self, path: str, headers: Sequence[tuple[str, str]] = ()
    ) -> tuple[int, AsyncIterator[bytes]]:
        """GET a streaming body: the status, then its chunks as they come (no overall timeout).

        A body cut off midway (the server died) raises PeerError from the chunks.
        """
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self._connect()
                response, chunks = await self._send(reader, writer, "GET", path, b"", headers)
                return response.status_code, chunks
        except (OSError, TimeoutError, ValueError, h11.ProtocolError, ssl.SSLError) as exc:
            raise PeerError(f"{self.url}{path}: {exc or type(exc).__name__}") from exc
        except MeshError as exc:
            raise PeerError(f"{self.url}{path}: {exc}") from exc

    async def _send(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        payload: bytes,
        headers: Sequence[tuple[str, str]],
    ) -> tuple[h11.Response, AsyncIterator[bytes]]:
        """Send the request on a checked connection; the response head, then its body's chunks
        (which close the connection when done)."""
        try:
            conn = h11.Connection(h11.CLIENT)
            fields = [("Host", f"{self.host}:{self.port}"), ("Connection", "close"), *headers,
                      ("Content-Length", str(len(payload)))]  # fmt: skip
            writer.write(conn.send(h11.Request(method=method, target=path, headers=fields)))
            writer.write(conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
            await writer.drain()
            response = await _next_event(conn, reader)
            if not isinstance(response, h11.Response):
                raise PeerError(f"{self.url}{path}: expected an HTTP response")
        except BaseException:
            await close(writer)
            raise
        return response, _body(conn, reader, writer)


class NotSent(PeerError):
    """No byte of the request reached the server: safe to send again elsewhere."""


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(READ_CHUNK))


async def _body(
    conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> AsyncIterator[bytes]:
    try:
        while True:
            try:
                event = await _next_event(conn, reader)
            except (OSError, h11.ProtocolError) as exc:  # cut off mid-body: a server that died
                raise PeerError(f"the reply broke off: {exc or type(exc).__name__}") from exc
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return
    finally:
        await close(writer)


async def close(writer: asyncio.StreamWriter) -> None:
    """Close and wait: a TLS transport's socket is released only after its shutdown runs."""
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
