"""HTTPS to a peer that proves itself by attestation, not by a web PKI name.

The server's certificate is checked right after the handshake (its RA-TLS evidence against a
pinned policy, and an optional dstack usage), before a single request byte is sent. Each call
opens a fresh connection and checks the server again; replies are bounded JSON.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import ssl
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from teemesh.encoding import load_json
from teemesh.errors import InputError, MeshError, PeerError
from teemesh.identity.certs import KeyPair, pem_pair
from teemesh.identity.ratls import OID_CERT_USAGE, extension_bytes
from teemesh.net.tls import MAX_REPLY, DerCheck, https_target, tls_context

ServerCheck = Callable[[x509.Certificate], None]
"""Raises unless the server's certificate proves what the caller requires of it."""


class AttestedHttpsClient:
    def __init__(
        self,
        url: str,
        server_check: ServerCheck,
        *,
        usage: bytes | None = None,
        client_cert: KeyPair | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url, self.host, self.port = https_target(url)
        self.server_check = server_check
        self.usage = usage
        self.timeout = timeout
        self.context = client_context(client_cert)
        self.server_cert: x509.Certificate | None = None
        self.server_der: bytes | None = None
        """The certificate of the last server that passed the check."""

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST JSON; returns the HTTP status and the JSON reply. Failures are PeerErrors."""
        return self.request("POST", path, body)

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """One request with an optional JSON body; the status and the JSON reply."""
        where = f"{self.url}{path}"
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout, context=self.context
        )
        try:
            conn.connect()
            assert isinstance(conn.sock, ssl.SSLSocket)
            der = conn.sock.getpeercert(binary_form=True)
            self.server_cert = check_server(der, self.usage, self.server_check)
            self.server_der = der
            fields = {"Content-Type": "application/json"} if body is not None else {}
            payload = json.dumps(body) if body is not None else None
            conn.request(method, path, payload, fields | (headers or {}))
            response = conn.getresponse()
            data = response.read(MAX_REPLY + 1)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise PeerError(f"{where}: {exc}") from exc
        except MeshError as exc:
            raise PeerError(f"{where}: {exc}") from exc
        finally:
            conn.close()
        if len(data) > MAX_REPLY:
            raise PeerError(f"{where}: reply over {MAX_REPLY} bytes")
        try:
            return response.status, load_json(data, field=path)
        except InputError as exc:
            raise PeerError(f"{where}: HTTP {response.status}: {exc}") from exc


def check_server(
    der: bytes | None, usage: bytes | None, server_check: ServerCheck
) -> x509.Certificate:
    """The server's certificate, if it has ``usage`` and passes ``server_check``; else raises."""
    if der is None:
        raise PeerError("the server sent no certificate")
    cert = x509.load_der_x509_certificate(der)
    if usage is not None and extension_bytes(cert, OID_CERT_USAGE) != usage:
        raise PeerError(f"the server certificate lacks usage {usage.decode()}")
    server_check(cert)
    return cert


def client_context(client_cert: KeyPair | None) -> ssl.SSLContext:
    """A client TLS context whose server check is ours (``check_server``), not the web PKI's."""
    return tls_context(server=False, identity=pem_pair(*client_cert) if client_cert else None)


def der_check(server_check: ServerCheck, usage: bytes | None = None) -> DerCheck:
    """``server_check`` (and ``usage``) as a check of DER bytes, for the X.509-free clients."""

    def check(der: bytes) -> None:
        check_server(der, usage, server_check)

    return check


def issued_by(ca: x509.Certificate) -> ServerCheck:
    """A server check for tools that pin a CA rather than evidence: signed by ``ca``, in date.

    Pair it with a ``usage`` that only that CA's servers carry (the mesh CA signs SVIDs too).
    """

    def check(cert: x509.Certificate) -> None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise PeerError(
                f"the server certificate is not issued by {ca.subject.rfc4514_string()}"
            ) from exc
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise PeerError("the server certificate is not valid now")

    return check
