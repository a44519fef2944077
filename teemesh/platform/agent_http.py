"""HTTP edge of the guest agent: dstack's pRPC conventions on Unix sockets and TCP.

``/<Method>`` is the DstackGuest service and ``/prpc/[Tappd.]<Method>`` the legacy Tappd one.
Arguments come from the query string for GET, else from a JSON body (JSON content type or
``?json``); replies are JSON, ``null`` for Empty, and HTTP 400 ``{"error": ...}`` on failure.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from teemesh.encoding import load_json
from teemesh.errors import InputError
from teemesh.platform.agent import GuestAgent

MAX_BODY = 1024 * 1024


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _arguments(request: Request) -> dict[str, Any]:
    if request.method == "GET":
        return dict(request.query_params)
    body = await request.body()
    if len(body) > MAX_BODY:
        raise InputError(f"request body over {MAX_BODY} bytes", field="body")
    is_json = "json" in request.query_params or "json" in request.headers.get("content-type", "")
    if not body.strip():
        return {}
    if not is_json:
        raise InputError(
            "protobuf bodies are not supported: send JSON (application/json, or ?json)",
            field="body",
        )
    doc = load_json(body, field="body")
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError("expected a JSON object", field="body")
    return doc


def create_app(agent: GuestAgent) -> FastAPI:
    app = FastAPI(title="teemesh guest agent", docs_url=None, redoc_url=None)

    async def dispatch(service: str, method: str, request: Request) -> Response:
        try:
            reply = agent.call(service, method, await _arguments(request))
        except InputError as exc:
            return _error(str(exc))
        return JSONResponse(reply)

    @app.api_route("/prpc/{method}", methods=["GET", "POST"])
    async def tappd(method: str, request: Request) -> Response:
        return await dispatch("tappd", method.removeprefix("Tappd."), request)

    @app.api_route("/{method}", methods=["GET", "POST"])
    async def dstack(method: str, request: Request) -> Response:
        return await dispatch("dstack", method, request)

    return app


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket only its owner can connect to (it hands out app keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    path.chmod(0o600)
    sock.listen(128)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    return socket.create_server((host, port))


async def serve(agent: GuestAgent, sockets: Sequence[socket.socket]) -> None:
    config = uvicorn.Config(
        create_app(agent), log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    await server.serve(sockets=list(sockets))


def run(agent: GuestAgent, sockets: Sequence[socket.socket]) -> None:
    """Serve until SIGINT or SIGTERM; either ends in a normal exit, so cleanup code runs.

    uvicorn re-raises the signal it caught after its graceful shutdown; with this handler in
    place that becomes ``SystemExit`` instead of death by signal.
    """
    signal.signal(signal.SIGTERM, _exit_on_signal)
    uvloop.run(serve(agent, sockets))


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
