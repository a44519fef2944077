"""A client for a dstack guest agent: ours locally, dstack's own inside a real CVM.

Services that run in a CVM (the KMS, the coordinator, the sidecar) reach the TEE only through
this API, so the code path is the same on a laptop and on dstack. The endpoint is what dstack's
SDKs take: a Unix socket path, or an ``http://`` URL (``DSTACK_SIMULATOR_ENDPOINT``).
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from teemesh.encoding import parse_hex
from teemesh.errors import InputError, PeerError

DEFAULT_ENDPOINT = "/var/run/dstack.sock"
ENDPOINT_VARIABLE = "DSTACK_SIMULATOR_ENDPOINT"


def default_endpoint() -> str:
    return os.environ.get(ENDPOINT_VARIABLE) or DEFAULT_ENDPOINT


class AgentClient:
    """Synchronous calls to the DstackGuest API; every failure is a ``PeerError``."""

    def __init__(self, endpoint: str | None = None, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint or default_endpoint()
        if self.endpoint.startswith(("http://", "https://")):
            self._client = httpx.Client(base_url=self.endpoint, timeout=timeout)
        else:
            transport = httpx.HTTPTransport(uds=self.endpoint)
            self._client = httpx.Client(
                transport=transport, base_url="http://dstack", timeout=timeout
            )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        where = f"guest agent {self.endpoint} {method}"
        try:
            response = self._client.post(f"/{method}", json=args or {})
        except httpx.HTTPError as exc:
            raise PeerError(f"{where}: {exc}") from exc
        try:
            doc = response.json()
        except ValueError as exc:
            raise PeerError(f"{where}: HTTP {response.status_code}, not JSON") from exc
        if response.status_code != 200:
            detail = doc.get("error") if isinstance(doc, dict) else None
            raise PeerError(f"{where}: HTTP {response.status_code}: {detail or doc!r:.200}")
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
