"""The sidecar's side of admission: prove this CVM to an attested coordinator, get an SVID.

The coordinator is trusted only through ``coordinator_check`` (a ``PinnedPeer`` with the
coordinator policy from the sidecar's configuration): its evidence is checked on every
connection before the request is sent, and the CA it returns is the one the sidecar then pins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teemesh.attest.policy import Reason, Refusal
from teemesh.coordinator.admission import admission_report_data
from teemesh.coordinator.errors import AdmissionRefused
from teemesh.errors import InputError, PeerError
from teemesh.identity.certs import load_cert_pem, new_p256_key
from teemesh.identity.meshca import COORDINATOR_USAGE
from teemesh.identity.svid import read_svid, spiffe_id
from teemesh.net.attested_https import AttestedHttpsClient, ServerCheck
from teemesh.platform.agent_client import AgentClient


@dataclass(frozen=True)
class Svid:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    ca_certificate: x509.Certificate
    spiffe_id: str
    expires_at: int
    renew_after: int


@dataclass(frozen=True)
class PreparedAdmission:
    """An attest request ready to send: ``body`` is its JSON, ``key`` the CSR's private key."""

    body: dict[str, Any]
    key: ec.EllipticCurvePrivateKey
    spiffe_id: str


class AdmissionClient:
    def __init__(
        self, url: str, coordinator_check: ServerCheck, agent: AgentClient, *, timeout: float = 10
    ) -> None:
        self.https = AttestedHttpsClient(
            url, coordinator_check, usage=COORDINATOR_USAGE, timeout=timeout
        )
        self.agent = agent

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, doc = self.https.post(path, body)
        refusals = _refusals(doc) if status == 403 else ()
        if refusals:
            raise AdmissionRefused(refusals)
        if status != 200 or not isinstance(doc, dict):
            detail = doc.get("error") if isinstance(doc, dict) else doc
            raise PeerError(f"coordinator {self.https.url}{path}: HTTP {status}: {detail!s:.300}")
        return doc

    def admit(self, cluster: str, group: str, peer_id: str) -> Svid:
        return self.attest(self.prepare(cluster, group, peer_id, self.challenge()))

    def challenge(self) -> bytes:
        """A fresh nonce: single-use, and accepted by any coordinator of the cluster."""
        nonce = self._post("/v1/admission/challenge", {}).get("nonce")
        if not isinstance(nonce, str):
            raise PeerError("the coordinator's challenge has no nonce")
        try:
            return bytes.fromhex(nonce)
        except ValueError as exc:
            raise PeerError("the coordinator's nonce is not hex") from exc

    def prepare(self, cluster: str, group: str, peer_id: str, nonce: bytes) -> PreparedAdmission:
        """A new key and its CSR, and a quote binding them to ``nonce`` (no coordinator call)."""
        key = new_p256_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        report_data = admission_report_data(cluster, group, peer_id, nonce, key.public_key())
        quote = self.agent.call("GetQuote", {"report_data": report_data.hex()})
        body = {
            "group": group,
            "peer_id": peer_id,
            "nonce": nonce.hex(),
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            **{k: quote.get(k) for k in ("quote", "event_log", "vm_config")},
        }
        return PreparedAdmission(body, key, spiffe_id(cluster, group, peer_id))

    def attest(self, prepared: PreparedAdmission) -> Svid:
        """Send a prepared request to this client's coordinator; the SVID it issued, checked."""
        reply = self._post("/v1/admission/attest", prepared.body)
        return _svid(reply, prepared.key, prepared.spiffe_id)


def _refusals(doc: Any) -> tuple[Refusal, ...]:
    """The reasons of a 403; codes we do not know make it a plain peer error instead."""
    reasons = doc.get("reasons") if isinstance(doc, dict) else None
    if not isinstance(reasons, list):
        return ()
    known = [r for r in reasons if isinstance(r, dict) and r.get("code") in Reason.__members__]
    if len(known) != len(reasons):
        return ()
    return tuple(Refusal(Reason(r["code"]), str(r.get("message", ""))) for r in known)


def _svid(reply: dict[str, Any], key: ec.EllipticCurvePrivateKey, expected: str) -> Svid:
    """Check what came back before using it: our key, our name, signed by the returned CA."""
    try:
        cert = load_cert_pem(str(reply.get("certificate", "")), field="certificate")
        ca = load_cert_pem(str(reply.get("ca_certificate", "")), field="ca_certificate")
        cert.verify_directly_issued_by(ca)
    except (InputError, ValueError, TypeError, InvalidSignature) as exc:
        raise PeerError(f"the coordinator returned an unusable certificate: {exc}") from exc
    if cert.public_key() != key.public_key():
        raise PeerError("the coordinator certified another key")
    cluster = expected.removeprefix("spiffe://").split("/")[0]
    # PeerError if it names no peer of this cluster
    named = read_svid(cert.public_bytes(serialization.Encoding.DER), cluster)
    if spiffe_id(named.cluster, named.group, named.peer_id) != expected:
        raise PeerError(f"the coordinator certified another identity than {expected}")
    expires_at, renew_after = reply.get("expires_at"), reply.get("renew_after")
    if not (isinstance(expires_at, int) and isinstance(renew_after, int)):
        raise PeerError("the coordinator's reply lacks expires_at and renew_after (integers)")
    return Svid(key, cert, ca, expected, expires_at, renew_after)
