"""The starter workload: a tiny HTTP app that says who it is and calls others by route name.

    GET /hello                  this instance: cluster, group, index, peer id (from TEEMESH_*)
    GET /worker                 calls http://worker:9090/hello through the mesh, returns the reply
    GET /all?route=worker&n=20  calls a route n times (a new connection each), counts responders

Only the standard library, so any Python that has teemesh runs it: ``python -m
teemesh.examples.starter --port 8080``. Route names resolve through the CVM's ``/etc/hosts``
to the sidecar's VIPs; ``--route NAME=HOST:PORT`` points a name elsewhere (tests, no mesh).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

DEFAULT_ROUTES = {"api": ("api", 8080), "worker": ("worker", 9090)}
"""The starter spec's routes: name -> where to dial (the name itself, resolved by the mesh)."""
MAX_CALLS = 1000
TIMEOUT = 5.0
MAX_HEAD = 16 * 1024
MAX_REPLY = 1024 * 1024


def identity() -> dict[str, Any]:
    """Who this instance is, as the platform told it."""
    return {
        "cluster": os.environ.get("TEEMESH_CLUSTER"),
        "group": os.environ.get("TEEMESH_GROUP"),
        "index": os.environ.get("TEEMESH_INDEX"),
        "peer_id": os.environ.get("TEEMESH_PEER_ID") or socket.gethostname(),
    }


class Starter:
    def __init__(self, routes: dict[str, tuple[str, int]]) -> None:
        self.routes = routes
        self.me = identity()

    async def handle(self, target: str) -> tuple[int, Any]:
        url = urlsplit(target)
        query = parse_qs(url.query)
        if url.path == "/hello":
            return 200, self.me
        if url.path == "/worker":
            try:
                reply = await self.call("worker")
            except OSError as exc:
                return 502, {"error": f"worker: {exc}"}
            return 200, {"from": self.me["peer_id"], "worker": reply}
        if url.path == "/all":
            return await self.call_all(query.get("route", ["worker"])[0], query.get("n", ["20"])[0])
        return 404, {"error": f"no such path {url.path}: try /hello, /worker, /all"}

    async def call_all(self, route: str, n_text: str) -> tuple[int, Any]:
        if route not in self.routes:
            return 400, {"error": f"unknown route {route!r}; known: {sorted(self.routes)}"}
        if not n_text.isdigit() or not 1 <= int(n_text) <= MAX_CALLS:
            return 400, {"error": f"n must be a whole number from 1 to {MAX_CALLS}"}
        counts: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for _ in range(int(n_text)):
            try:
                reply = await self.call(route)
                counts[str(reply.get("peer_id"))] += 1
            except (OSError, ValueError, AttributeError) as exc:
                errors[str(exc) or type(exc).__name__] += 1
        return 200, {"route": route, "calls": int(n_text), "counts": dict(sorted(counts.items())),
                     "errors": dict(errors)}  # fmt: skip

    async def handle_method(self, method: str, target: str) -> tuple[int, Any]:
        """Apps built on this one (``webdemo``) override this to take more than GET."""
        if method != "GET":
            return 405, {"error": "only GET"}
        return await self.handle(target)

    async def call(self, route: str) -> Any:
        """GET /hello of ``route`` on a new connection; its JSON reply."""
        host, port = self.routes[route]
        status, body = await asyncio.wait_for(http_get(host, port, "/hello"), TIMEOUT)
        if status != 200:
            raise OSError(f"{route} answered HTTP {status}")
        return json.loads(body)

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, doc = await self.handle_method(method, target)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, doc = 400, {"error": "bad request"}
        body = json.dumps(doc).encode() + b"\n"
        writer.write(
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(OSError):
            await writer.drain()
            writer.close()
            await writer.wait_closed()


AppFactory = Callable[[dict[str, tuple[str, int]]], Starter]
"""Makes the app from its routes: :class:`Starter`, or an app built on it (``webdemo``)."""


async def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """A one-shot HTTP/1.1 GET: (status, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        reply = b""
        while chunk := await reader.read(65536):
            reply += chunk
            if len(reply) > MAX_REPLY:
                raise OSError(f"{host}:{port} sent more than {MAX_REPLY} bytes")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, sep, body = reply.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"{host}:{port} sent no HTTP reply")
    return int(parts[1]), body


async def start(
    host: str, port: int, routes: dict[str, tuple[str, int]], factory: AppFactory = Starter
) -> asyncio.Server:
    app = factory(routes)
    return await asyncio.start_server(app.serve_client, host, port, limit=MAX_HEAD)


def parse_route(text: str) -> tuple[str, tuple[str, int]]:
    """``NAME=PORT`` (dial the name itself) or ``NAME=HOST:PORT``."""
    name, sep, where = text.partition("=")
    host, _, port = where.rpartition(":")
    if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected NAME=PORT or NAME=HOST:PORT, got {text!r}")
    return name, (host or name, int(port))


def argument_parser(prog: str) -> argparse.ArgumentParser:
    """The options every app built on this one takes: where to listen, where routes go."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--route",
        action="append",
        type=parse_route,
        default=[],
        help="NAME=PORT or NAME=HOST:PORT (default: api=8080, worker=9090)",
    )
    return parser


def serve(
    name: str,
    host: str,
    port: int,
    routes: dict[str, tuple[str, int]],
    factory: AppFactory = Starter,
) -> None:
    """Serve until interrupted."""

    async def run() -> None:
        server = await start(host, port, routes, factory)
        print(f"{name} {identity()['peer_id']} serving on {host}:{port}", file=sys.stderr)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    args = argument_parser("python -m teemesh.examples.starter").parse_args(argv)
    serve("starter", args.host, args.port, DEFAULT_ROUTES | dict(args.route))


if __name__ == "__main__":
    main()
