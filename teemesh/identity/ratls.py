"""dstack's RA-TLS certificate extensions (private enterprise number 62397, Phala).

Each extension value is a DER OCTET STRING wrapping the raw bytes. A certificate proves it was
made inside a TEE when its attestation's report_data is ``sha512("ratls-cert:" || SPKI)``: the
certificate's own public key is bound into the quote, so the evidence cannot be lifted onto
another key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from teemesh.attest.dcap import CollateralStore
from teemesh.attest.evidence import Evidence, load_evidence
from teemesh.attest.policy import Policy
from teemesh.attest.verify import Verdict, verify_evidence
from teemesh.errors import EvidenceError, InputError, PeerError
from teemesh.identity.certs import CertSpec, issue, new_p256_key
from teemesh.identity.der import octet_string
from teemesh.identity.svid import APP_ID_OID, ARC

_ARC = ARC
OID_TDX_QUOTE = x509.ObjectIdentifier(f"{_ARC}.1")
OID_EVENT_LOG = x509.ObjectIdentifier(f"{_ARC}.2")
OID_APP_ID = x509.ObjectIdentifier(APP_ID_OID)
OID_CERT_USAGE = x509.ObjectIdentifier(f"{_ARC}.4")
OID_ATTESTATION = x509.ObjectIdentifier(f"{_ARC}.8")
OID_APP_INFO = x509.ObjectIdentifier(f"{_ARC}.9")
RATLS_PREFIX = b"ratls-cert:"


def spki_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ratls_report_data(public_key: PublicKeyTypes) -> bytes:
    """The 64-byte report_data that binds a certificate key into a quote."""
    return hashlib.sha512(RATLS_PREFIX + spki_der(public_key)).digest()


def der_octet_string(raw: bytes) -> bytes:
    size = len(raw)
    if size < 0x80:
        length = bytes([size])
    else:
        body = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(body)]) + body
    return b"\x04" + length + raw


def read_der_octet_string(der: bytes, *, field: str) -> bytes:
    try:
        return octet_string(der, field=field)
    except InputError as exc:
        raise EvidenceError(exc.problem, field=field) from exc


def extension(oid: x509.ObjectIdentifier, raw: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(oid, der_octet_string(raw))


def extension_bytes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise EvidenceError("unexpected extension type", field=oid.dotted_string)
    return read_der_octet_string(value.value, field=oid.dotted_string)


def cert_evidence(cert: x509.Certificate) -> Evidence:
    """The evidence in a certificate: .1.8 (attestation) first, then legacy .1.1 + .1.2."""
    attestation = extension_bytes(cert, OID_ATTESTATION)
    if attestation is not None:
        return load_evidence(attestation)
    quote = extension_bytes(cert, OID_TDX_QUOTE)
    if quote is None:
        raise EvidenceError("the certificate carries no attestation", field="certificate")
    log = extension_bytes(cert, OID_EVENT_LOG)
    doc = {"quote": quote.hex(), "event_log": "" if log is None else log.decode(errors="replace")}
    return load_evidence(json.dumps(doc).encode())


def verify_ratls_cert(
    cert: x509.Certificate,
    policy: Policy,
    *,
    collateral: CollateralStore | None = None,
    now: int,
) -> Verdict:
    """Verify a certificate's evidence, requiring report_data to bind the certificate's key."""
    bound = policy.model_copy(update={"report_data": ratls_report_data(cert.public_key()).hex()})
    return verify_evidence(cert_evidence(cert), bound, collateral=collateral, now=now)


@dataclass(frozen=True)
class RatlsVerifier:
    """A policy and what checking it needs (collateral, a clock), for RA-TLS certificates."""

    policy: Policy
    collateral: CollateralStore | None = None
    clock: Callable[[], float] = time.time

    def verify(self, cert: x509.Certificate, policy: Policy | None = None) -> Verdict:
        """``policy`` overrides the configured one for this call (the same quote checks)."""
        now = int(self.clock())
        chosen = policy or self.policy
        return verify_ratls_cert(cert, chosen, collateral=self.collateral, now=now)


class PinnedPeer(RatlsVerifier):
    """A check for TLS clients: the server's evidence must satisfy the pinned policy.

    Sidecars use it on coordinators and agents on the KMS; it raises ``PeerError`` naming every
    reason, so the caller can refuse the connection before sending a byte.
    """

    def __call__(self, cert: x509.Certificate) -> None:
        name = cert.subject.rfc4514_string()
        try:
            verdict = self.verify(cert)
        except InputError as exc:
            raise PeerError(f"the evidence in {name}'s certificate is unreadable: {exc}") from exc
        if not verdict.ok:
            reasons = "; ".join(f"{r.code}: {r.message}" for r in verdict.reasons)
            raise PeerError(f"{name} failed its attestation policy: {reasons}")


def issue_ratls_server_cert(
    attest: Callable[[bytes], bytes],
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate,
    *,
    names: Sequence[str],
    usage: bytes,
    organization: str,
    now: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh TLS key whose certificate carries a quote binding it (``attest``: our TEE)."""
    now = now or dt.datetime.now(dt.UTC)
    key = new_p256_key()
    attestation = attest(ratls_report_data(key.public_key()))
    spec = CertSpec(
        common_name=names[0] if names else organization,
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=365),
        organization=organization,
        alt_names=tuple(names),
        server_auth=True,
        extensions=(extension(OID_CERT_USAGE, usage), extension(OID_ATTESTATION, attestation)),
    )
    return issue(spec, key.public_key(), issuer_key, issuer_cert), key
