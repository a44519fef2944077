"""The mesh CA: derived from a secret every coordinator replica gets alike, never stored.

On dstack all coordinator replicas are one app, so the guest agent's ``GetKey`` gives each the
same secret; locally the simulated agent does the same. The CA certificate is a function of the
key and the cluster name (fixed serial and validity), so every replica presents the same CA.
Workload certificates (SVIDs) are short-lived and carry the SPIFFE id and the attested app id.
"""

from __future__ import annotations

import datetime as dt
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.identity.certs import CertSpec, issue
from teemesh.identity.ratls import OID_APP_ID, extension, spki_der

COORDINATOR_USAGE = b"teemesh:coordinator"
"""The RA-TLS usage of a coordinator's server certificate; the mesh CA gives it to no SVID."""
GET_KEY_PATH = "teemesh/mesh-ca/v1"
"""The GetKey path coordinators derive the mesh CA secret from."""
CA_NOT_BEFORE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
CA_NOT_AFTER = dt.datetime(2045, 1, 1, tzinfo=dt.UTC)
CLOCK_SKEW = dt.timedelta(minutes=5)


def mesh_ca_key(secret: bytes) -> ec.EllipticCurvePrivateKey:
    # Only coordinators derive the CA key; the sidecar, which reads SVIDs, needn't load this.
    from teemesh.platform.keys import derive_p256_from_seed  # noqa: PLC0415

    return derive_p256_from_seed(secret, [b"teemesh-mesh-ca"])


def mesh_ca_cert(key: ec.EllipticCurvePrivateKey, cluster: str) -> x509.Certificate:
    return derived_ca_cert(key, f"teemesh mesh CA {cluster}", uris=(f"spiffe://{cluster}",))


def derived_ca_cert(
    key: ec.EllipticCurvePrivateKey, common_name: str, *, uris: tuple[str, ...] = ()
) -> x509.Certificate:
    """A self-signed CA that depends only on its key and names (serial and validity fixed), so
    every replica that derives the key presents the same CA: only the ECDSA signature differs,
    and verifiers trust a CA by its subject and key."""
    serial = int.from_bytes(hashlib.sha256(spki_der(key.public_key())).digest()[:16], "big") >> 1
    spec = CertSpec(
        common_name,
        CA_NOT_BEFORE,
        CA_NOT_AFTER,
        organization="teemesh",
        uris=uris,
        ca_path_len=0,
        serial=serial or 1,
    )
    return issue(spec, key.public_key(), key)


def issue_svid(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    *,
    spiffe: str,
    peer_id: str,
    app_id: bytes,
    now: dt.datetime,
    ttl: dt.timedelta,
) -> x509.Certificate:
    """A workload certificate for both TLS roles; valid from a little before ``now``."""
    spec = CertSpec(
        peer_id,
        now - CLOCK_SKEW,
        now + ttl,
        uris=(spiffe,),
        server_auth=True,
        client_auth=True,
        extensions=(extension(OID_APP_ID, app_id),),
    )
    return issue(spec, public_key, ca_key, ca_cert)
