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
import json
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.attest.simulated import SimulatedCvm
from teemesh.errors import InputError, PeerError, Refused
from teemesh.identity.certs import (
    CertSpec,
    issue,
    load_cert_pem,
    load_key_pem,
    new_p256_key,
)
from teemesh.identity.ratls import (
    OID_ATTESTATION,
    PinnedPeer,
    extension,
    ratls_report_data,
)
from teemesh.net.attested_https import AttestedHttpsClient, ServerCheck
from teemesh.platform.appkeys import AgentKeys, keys_from_kms
from teemesh.platform.kms import KMS_RPC_USAGE

Attest = Callable[[bytes], bytes]
"""report_data -> dstack VersionedAttestation, from the caller's own TEE."""


KmsPolicy = PinnedPeer
"""What a KMS must prove before we trust the keys it hands us."""


class KmsClient(AttestedHttpsClient):
    """One KMS URL: dstack's pRPC calls, with the server checked before each one."""

    def __init__(
        self,
        url: str,
        server_check: ServerCheck,
        *,
        client_cert: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(
            url, server_check, usage=KMS_RPC_USAGE, client_cert=client_cert, timeout=timeout
        )

    def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        status, doc = self.post(f"/prpc/{method}", args or {})
        if status == 403:
            raise Refused(str(doc.get("error") if isinstance(doc, dict) else doc))
        if status != 200:
            detail = doc.get("error") if isinstance(doc, dict) else doc
            raise PeerError(f"KMS {self.url} {method}: HTTP {status}: {detail!s:.300}")
        return doc


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
    args = {"api_version": 1, "vm_config": json.dumps(cvm.vm_config())}
    for url in urls:
        try:
            reply, root_ca = request_with_attestation(
                url, server_check, cvm.attestation, "GetAppKey", args
            )
            return keys_from_kms(reply, root_ca), url
        except PeerError as exc:
            failures.append(str(exc))
    raise PeerError("no KMS gave app keys: " + "; ".join(failures))
