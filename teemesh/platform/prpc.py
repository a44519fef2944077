"""dstack's pRPC conventions over HTTP, shared by the guest agent and the KMS.

A method is ``/<Method>`` or ``/prpc/[Service.]<Method>``; arguments come from the query string
for GET, else from a JSON body (JSON content type or ``?json``); replies are JSON, ``null`` for
protobuf ``Empty``, and failures are ``{"error": ...}`` with HTTP 400 (malformed) or 403
(refused). Serving runs uvicorn on sockets the caller bound, so binding errors surface before
start-up output and Unix-socket permissions are set by us.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Request
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from teemesh.encoding import load_json
from teemesh.errors import InputError, MeshError, Refused
from teemesh.fsutil import write_private
from teemesh.identity.certs import cert_pem, key_pem

MAX_BODY = 1024 * 1024
PEER_CERT = "peer_cert"
"""Key in ``request.state`` for the DER client certificate of a TLS connection (or None)."""


def error_response(exc: MeshError | str, status: int = 400) -> JSONResponse:
    if isinstance(exc, Refused):
        status = 403
    return JSONResponse({"error": str(exc)}, status_code=status)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refused as soon as it passes ``limit`` rather than after reading it all."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise InputError(f"request body over {limit} bytes", field="body")
    return bytes(body)


async def request_arguments(request: Request) -> dict[str, Any]:
    if request.method == "GET":
        return dict(request.query_params)
    body = await read_body(request)
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


class _PeerCertProtocol(H11Protocol):
    """uvicorn's HTTP protocol, plus the TLS client certificate in each request's state.

    ASGI has no standard place for it; the state dict is per connection once rebound here.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.app_state = {**self.app_state, PEER_CERT: der}


@dataclass(frozen=True)
class TlsFiles:
    """Server certificate chain and key; ``client_ca`` asks for (but does not demand) a client
    certificate issued by that CA, as dstack's KMS does with its temporary CA."""

    cert_chain: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def write(
        cls,
        folder: Path,
        chain: Sequence[x509.Certificate],
        key: ec.EllipticCurvePrivateKey,
        client_ca: x509.Certificate | None = None,
    ) -> TlsFiles:
        """This run's server identity as files (ssl loads only files), all owner-only."""
        ca_path = None
        if client_ca is not None:
            ca_path = folder / "client-ca.crt"
            write_private(ca_path, cert_pem(client_ca).encode())
        files = cls(folder / "rpc.crt", folder / "rpc.key", ca_path)
        write_private(files.cert_chain, "".join(cert_pem(c) for c in chain).encode())
        write_private(files.key, key_pem(key).encode())
        return files


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket only its owner can connect to (it hands out app keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    path.chmod(0o600)
    sock.listen(128)
    return sock


def bind_tcp(address: str, default_host: str = "127.0.0.1") -> socket.socket:
    """Bind ``HOST:PORT`` (or ``:PORT``); a bad address names itself."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise InputError(f"expected HOST:PORT, got {address!r}", field="listen")
    return socket.create_server((host.strip("[]") or default_host, int(port)))


def run_app(app: Any, sockets: Sequence[socket.socket], tls: TlsFiles | None = None) -> None:
    """Serve until SIGINT or SIGTERM; either ends in a normal exit, so cleanup code runs.

    uvicorn re-raises the signal it caught after its graceful shutdown; with this handler in
    place that becomes ``SystemExit`` instead of death by signal.
    """
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"ssl_certfile": str(tls.cert_chain), "ssl_keyfile": str(tls.key)}
        if tls.client_ca is not None:
            options |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_OPTIONAL}
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="auto",  # apps that need async set-up (a store) declare a lifespan
        http=_PeerCertProtocol,
        **options,
    )
    server = uvicorn.Server(config)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    uvloop.run(server.serve(sockets=list(sockets)))


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
