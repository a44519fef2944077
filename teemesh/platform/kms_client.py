"""Talking to a KMS as dstack's guests do: check its RA-TLS certificate, then present our own.

1. Connect and check the server: its certificate's evidence must pass the caller's KMS policy
   and carry usage ``kms:rpc`` (before a single request byte is sent).
2. ``GetTempCaCert``; the server certificate must also chain to the CA it returns.
3. Make a P-256 key, get an attestation binding it (``sha512("ratls-cert:" || SPKI)``), and
   issue a client certificate with the temp CA; then call ``GetAppKey`` or ``GetKmsKey`` over
   mutual TLS.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import ssl
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.attest.simulated import SimulatedCvm
from teemesh.encoding import load_json
from teemesh.errors import InputError, MeshError, PeerError, Refused
from teemesh.identity.certs import (
    CertSpec,
    cert_pem,
    issue,
    key_pem,
    load_cert_pem,
    load_key_pem,
    new_p256_key,
)
from teemesh.identity.ratls import (
    OID_ATTESTATION,
    OID_CERT_USAGE,
    RatlsVerifier,
    extension,
    extension_bytes,
    ratls_report_data,
)
from teemesh.platform.appkeys import AgentKeys, keys_from_kms
from teemesh.platform.kms import KMS_RPC_USAGE

MAX_REPLY = 1024 * 1024
Attest = Callable[[bytes], bytes]
"""report_data -> dstack VersionedAttestation, from the caller's own TEE."""
ServerCheck = Callable[[x509.Certificate], None]
"""Raises unless the KMS's certificate proves what the caller requires of it."""


class KmsPolicy(RatlsVerifier):
    """What a KMS must prove before we trust the keys it hands us."""

    def __call__(self, cert: x509.Certificate) -> None:
        try:
            verdict = self.verify(cert)
        except InputError as exc:
            raise PeerError(f"the KMS certificate's evidence is unreadable: {exc}") from exc
        if not verdict.ok:
            reasons = "; ".join(f"{r.code}: {r.message}" for r in verdict.reasons)
            raise PeerError(f"the KMS failed its attestation policy: {reasons}")


class KmsClient:
    """One KMS URL; each call opens a fresh connection and checks the server again."""

    def __init__(
        self,
        url: str,
        server_check: ServerCheck,
        *,
        client_cert: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
        timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise InputError(f"expected https://HOST[:PORT], got {url!r}", field="kms_url")
        self.url = url
        self.host, self.port = parts.hostname, parts.port or 443
        self.server_check = server_check
        self.timeout = timeout
        self.context = ssl.create_default_context()
        # The server is authenticated by its attestation (checked after the handshake, before
        # any request), not by a web PKI name.
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE
        if client_cert is not None:
            _load_client_cert(self.context, *client_cert)
        self.server_cert: x509.Certificate | None = None

    def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        where = f"KMS {self.url} {method}"
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout, context=self.context
        )
        try:
            conn.connect()
            assert isinstance(conn.sock, ssl.SSLSocket)
            der = conn.sock.getpeercert(binary_form=True)
            if der is None:
                raise PeerError(f"{where}: the server sent no certificate")
            cert = x509.load_der_x509_certificate(der)
            if extension_bytes(cert, OID_CERT_USAGE) != KMS_RPC_USAGE:
                raise PeerError("the server certificate lacks usage kms:rpc")
            self.server_check(cert)
            self.server_cert = cert
            body = json.dumps(args or {})
            conn.request("POST", f"/prpc/{method}", body, {"Content-Type": "application/json"})
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
            doc = load_json(data, field=method)
        except InputError as exc:
            raise PeerError(f"{where}: HTTP {response.status}: {exc}") from exc
        if response.status == 403:
            raise Refused(str(doc.get("error") if isinstance(doc, dict) else doc))
        if response.status != 200:
            detail = doc.get("error") if isinstance(doc, dict) else doc
            raise PeerError(f"{where}: HTTP {response.status}: {detail!s:.300}")
        return doc


def _load_client_cert(
    context: ssl.SSLContext, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    """ssl only loads key pairs from files: use a private temporary folder, removed at once."""
    with tempfile.TemporaryDirectory(prefix="teemesh-kms-") as folder:
        cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_path.write_text(cert_pem(cert))
        key_path.touch(mode=0o600)
        key_path.write_text(key_pem(key))
        context.load_cert_chain(cert_path, key_path)


def attested_client_cert(
    temp_ca: dict[str, Any], attest: Attest, now: dt.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A short-lived client certificate from the temp CA, carrying our bound attestation."""
    ca_cert = load_cert_pem(str(temp_ca.get("temp_ca_cert", "")), field="temp_ca_cert")
    ca_key = load_key_pem(str(temp_ca.get("temp_ca_key", "")), field="temp_ca_key")
    now = now or dt.datetime.now(dt.UTC)
    key = new_p256_key()
    spec = CertSpec(
        "teemesh-kms-client",
        now - dt.timedelta(minutes=5),
        now + dt.timedelta(hours=1),
        client_auth=True,
        extensions=(extension(OID_ATTESTATION, attest(ratls_report_data(key.public_key()))),),
    )
    return issue(spec, key.public_key(), ca_key, ca_cert), key


def request_with_attestation(
    url: str, server_check: ServerCheck, attest: Attest, method: str, args: dict[str, Any]
) -> tuple[Any, x509.Certificate]:
    """Run dstack's client flow for ``method``; returns the reply and the KMS root CA cert."""
    plain = KmsClient(url, server_check)
    temp_ca = plain.call("GetTempCaCert")
    if not isinstance(temp_ca, dict):
        raise PeerError(f"KMS {url} GetTempCaCert: expected a JSON object")
    try:
        root_ca = load_cert_pem(str(temp_ca.get("ca_cert", "")), field="GetTempCaCert.ca_cert")
    except InputError as exc:
        raise PeerError(f"KMS {url}: {exc}") from exc
    mutual = KmsClient(url, server_check, client_cert=attested_client_cert(temp_ca, attest))
    reply = mutual.call(method, args)
    assert mutual.server_cert is not None
    try:
        mutual.server_cert.verify_directly_issued_by(root_ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PeerError(f"KMS {url}: its certificate is not issued by its own root CA") from exc
    return reply, root_ca


def fetch_app_keys(
    urls: Sequence[str], server_check: ServerCheck, cvm: SimulatedCvm
) -> tuple[AgentKeys, str]:
    """GetAppKey from the first KMS that answers (dstack fails over across ``kms_urls``).

    A refusal is final: every replica applies the same authorization.
    """
    failures = []
    for url in urls:
        args = {"api_version": 1, "vm_config": json.dumps(cvm.vm_config())}
        try:
            reply, root_ca = request_with_attestation(
                url, server_check, cvm.attestation, "GetAppKey", args
            )
            return keys_from_kms(reply, root_ca), url
        except PeerError as exc:
            failures.append(str(exc))
    raise PeerError("no KMS gave app keys: " + "; ".join(failures))
