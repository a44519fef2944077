"""A client for a dstack guest agent: ours locally, dstack's own inside a real CVM.

Services that run in a CVM (the KMS, the coordinator, the sidecar) reach the TEE only through
this API, so the code path is the same on a laptop and on dstack. The endpoint is what dstack's
SDKs take: a Unix socket path, or an ``http://`` URL (``DSTACK_SIMULATOR_ENDPOINT``).

The transport is the standard library's ``http.client`` (one connection per call), so that a
long-lived process such as the sidecar does not load an HTTP client library for a few calls.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any
from urllib.parse import urlsplit

from teemesh.encoding import parse_hex
from teemesh.errors import InputError, PeerError

DEFAULT_ENDPOINT = "/var/run/dstack.sock"
ENDPOINT_VARIABLE = "DSTACK_SIMULATOR_ENDPOINT"
UNIX_HOST = "dstack"
"""The Host header sent over a Unix socket, as dstack's SDKs send it."""


def default_endpoint() -> str:
    return os.environ.get(ENDPOINT_VARIABLE) or DEFAULT_ENDPOINT


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix stream socket; ``timeout`` bounds the connect and every read."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(UNIX_HOST, timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    """Synchronous calls to the DstackGuest API; every failure is a ``PeerError``."""

    def __init__(self, endpoint: str | None = None, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint or default_endpoint()
        self._timeout = timeout
        self._closed = False

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> tuple[http.client.HTTPConnection, str]:
        """A new connection to the agent, and the path prefix that method names go under."""
        if not self.endpoint.startswith(("http://", "https://")):
            return UnixHTTPConnection(self.endpoint, self._timeout), ""
        url = urlsplit(self.endpoint)
        if not url.hostname:
            raise http.client.InvalidURL(f"no host in {self.endpoint!r}")
        try:
            port = url.port
        except ValueError as exc:
            raise http.client.InvalidURL(str(exc)) from exc
        kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        return kind(url.hostname, port, timeout=self._timeout), url.path.rstrip("/")

    def _post(self, method: str, body: bytes) -> tuple[int, bytes]:
        connection, prefix = self._connection()
        try:
            connection.request(
                "POST",
                f"{prefix}/{method}",
                body=body,
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        if self._closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        where = f"guest agent {self.endpoint} {method}"
        body = json.dumps(
            args or {}, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()
        try:
            status, content = self._post(method, body)
        except (OSError, http.client.HTTPException) as exc:
            raise PeerError(f"{where}: {str(exc) or type(exc).__name__}") from exc
        try:
            doc = json.loads(content)
        except ValueError as exc:
            raise PeerError(f"{where}: HTTP {status}, not JSON") from exc
        if status != 200:
            detail = doc.get("error") if isinstance(doc, dict) else None
            raise PeerError(f"{where}: HTTP {status}: {detail or doc!r:.200}")
        return doc

    def attest(self, report_data: bytes) -> bytes:
        """A dstack ``VersionedAttestation`` binding ``report_data`` (at most 64 bytes)."""
        reply = self.call("Attest", {"report_data": report_data.hex()})
        return self._hex(reply, "attestation", "Attest")

    def get_key(self, path: str, purpose: str = "") -> bytes:
        """The app's deterministic secp256k1 key for ``path``: the same in every replica."""
        reply = self.call("GetKey", {"path": path, "purpose": purpose})
        return self._hex(reply, "key", "GetKey")

    def info(self) -> dict[str, Any]:
        reply = self.call("Info")
        if not isinstance(reply, dict):
            raise PeerError(f"guest agent {self.endpoint} Info: expected a JSON object")
        return reply

    def _hex(self, reply: Any, name: str, method: str) -> bytes:
        value = reply.get(name) if isinstance(reply, dict) else None
        if not isinstance(value, str):
            raise PeerError(f"guest agent {self.endpoint} {method}: reply has no {name}")
        try:
            return parse_hex(value, field=f"{method}.{name}")
        except InputError as exc:
            raise PeerError(f"guest agent {self.endpoint} {method}: {exc}") from exc
