"""Admission, the pure part: what a request says, what its quote must bind, and the verdict.

A sidecar proves three things at once with one quote: it runs approved code (the event log and
the group policy), it answers this coordinator's fresh challenge (the nonce), and the key in its
CSR was made inside that CVM (the CSR key's hash). All of them, with the names it asks for, are
bound into the 64-byte report_data, length-prefixed so no field can bleed into another.
Nonces and the peer-id binding need the store; ``service`` adds them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.attest.dcap import CollateralStore
from teemesh.attest.dstack import DstackIdentity
from teemesh.attest.evidence import Evidence, load_evidence
from teemesh.attest.policy import Reason, Refusal
from teemesh.attest.verify import verify_evidence
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.coordinator.records import check_peer
from teemesh.encoding import DNS_LABEL, parse_hex
from teemesh.errors import InputError
from teemesh.identity.ratls import spki_der

REPORT_DATA_DOMAIN = b"teemesh-admission-v1"
NONCE_LEN = 32
MAX_CSR_LEN = 16 * 1024


def admission_report_data(
    cluster: str, group: str, peer_id: str, nonce: bytes, public_key: ec.EllipticCurvePublicKey
) -> bytes:
    """sha512 over the domain, names, nonce and sha256(CSR SPKI), each length-prefixed."""
    digest = hashlib.sha512()
    key_hash = hashlib.sha256(spki_der(public_key)).digest()
    for part in (
        REPORT_DATA_DOMAIN,
        cluster.encode(),
        group.encode(),
        peer_id.encode(),
        nonce,
        key_hash,
    ):
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.digest()


@dataclass(frozen=True)
class AdmissionRequest:
    group: str
    peer_id: str
    nonce: bytes
    csr: x509.CertificateSigningRequest
    public_key: ec.EllipticCurvePublicKey
    evidence: Evidence

    @classmethod
    def from_json(cls, doc: Any) -> AdmissionRequest:
        """Every malformed field is an InputError naming it (HTTP 400)."""
        if not isinstance(doc, dict):
            raise InputError("expected a JSON object", field="body")
        group, peer_id = _name(doc, "group"), _name(doc, "peer_id")
        nonce = parse_hex(doc.get("nonce"), field="nonce", size=NONCE_LEN)
        csr, public_key = _csr(doc.get("csr"))
        return cls(group, peer_id, nonce, csr, public_key, _evidence(doc))


def _name(doc: dict[str, Any], field: str) -> str:
    value = doc.get(field)
    if not (isinstance(value, str) and DNS_LABEL.fullmatch(value)):
        raise InputError("expected a DNS label (a-z, 0-9 and '-', at most 63)", field=field)
    return value


def _csr(value: object) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
    if not isinstance(value, str) or len(value) > MAX_CSR_LEN:
        raise InputError(f"expected a PEM CSR of at most {MAX_CSR_LEN} bytes", field="csr")
    try:
        csr = x509.load_pem_x509_csr(value.encode())
        public_key = csr.public_key()
        valid = csr.is_signature_valid
    except (
        ValueError,
        UnsupportedAlgorithm,
        x509.InvalidVersion,
    ) as exc:  # unknown key, curve or version
        raise InputError(f"not a PEM certificate signing request: {exc}", field="csr") from exc
    if not (
        isinstance(public_key, ec.EllipticCurvePublicKey)
        and isinstance(public_key.curve, ec.SECP256R1)
    ):
        raise InputError("the CSR key must be P-256", field="csr")
    if not valid:
        raise InputError("the CSR signature is invalid", field="csr")
    return csr, public_key


def _evidence(doc: dict[str, Any]) -> Evidence:
    """A dstack attestation (hex), or GetQuote's quote + event_log + vm_config."""
    if "attestation" in doc:
        blob = parse_hex(doc["attestation"], field="attestation", max_size=1024 * 1024)
        return load_evidence(blob)
    if "quote" not in doc:
        raise InputError("expected quote (with event_log, vm_config) or attestation", field="quote")
    reply = {k: doc[k] for k in ("quote", "event_log", "vm_config") if k in doc}
    return load_evidence(json.dumps(reply).encode())


@dataclass(frozen=True)
class Admitted:
    """What the verified evidence established about the peer."""

    identity: DstackIdentity
    tee: str
    tcb_status: str
    advisory_ids: tuple[str, ...]
    mr_system: bytes


def check_admission(
    request: AdmissionRequest,
    policy: ClusterPolicy,
    *,
    collateral: CollateralStore | None,
    now: int,
) -> Admitted | tuple[Refusal, ...]:
    """Group and peer rules, then the quote with report_data bound to this very request."""
    refusal = check_peer(policy, request.group, request.peer_id)
    if refusal is not None:
        return (refusal,)
    bound = admission_report_data(
        policy.cluster, request.group, request.peer_id, request.nonce, request.public_key
    )
    attest = policy.attest_policy(request.group).model_copy(update={"report_data": bound.hex()})
    verdict = verify_evidence(request.evidence, attest, collateral=collateral, now=now)
    if not verdict.ok:
        return verdict.reasons
    identity = verdict.analysis.identity
    if identity.app_id is None or identity.instance_id is None:
        return (Refusal(Reason.QUOTE_INVALID, "the event log measures no app id or instance id"),)
    return Admitted(
        identity,
        verdict.tee,
        verdict.tcb_status or "",
        verdict.advisory_ids,
        verdict.analysis.measurements.mr_system,
    )
