"""Who a mesh certificate names, read without the X.509 library (the data plane's view).

An SVID carries exactly one URI SAN ``spiffe://<cluster>/<group>/<peer_id>`` and the attested
app id; the coordinator's own certificate and other CA-issued non-SVIDs name no peer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from teemesh.errors import InputError, PeerError
from teemesh.identity.der import CertFields, octet_string, read_cert

ARC = "1.3.6.1.4.1.62397.1"
"""teemesh's and dstack's OID arc for attestation extensions."""
APP_ID_OID = f"{ARC}.3"


@functools.lru_cache(maxsize=1024)
def _read(der: bytes) -> tuple[CertFields, bytes | None]:
    """Parsed once per certificate: a sidecar sees the same few peers' certificates again and
    again (resumed sessions), and the pure-Python parse costs ~50 us."""
    fields = read_cert(der)
    raw_app_id = fields.extensions.get(APP_ID_OID)
    return fields, None if raw_app_id is None else octet_string(raw_app_id, field="app id")


def spiffe_id(cluster: str, group: str, peer_id: str) -> str:
    return f"spiffe://{cluster}/{group}/{peer_id}"


@dataclass(frozen=True)
class SvidIdentity:
    """Who a verified SVID names: its place in the mesh, the certificate's serial and expiry."""

    cluster: str
    group: str
    peer_id: str
    serial: int
    app_id: bytes | None
    not_after: int = 0
    """Unix time the certificate expires (a resumed TLS session may outlive it)."""

    @property
    def peer(self) -> str:
        return f"{self.group}/{self.peer_id}"


def read_svid(der: bytes, cluster: str) -> SvidIdentity:
    """The identity in a DER certificate already verified as issued by the mesh CA."""
    try:
        fields, app_id = _read(der)
    except InputError as exc:
        raise PeerError(f"the certificate is unreadable: {exc}") from exc
    uris = fields.uris
    parts = uris[0].removeprefix("spiffe://").split("/") if len(uris) == 1 else []
    if not uris or not uris[0].startswith("spiffe://") or len(parts) != 3:
        raise PeerError("the client certificate is not an SVID (spiffe://cluster/group/peer)")
    if parts[0] != cluster:
        raise PeerError(f"the client certificate is for cluster {parts[0]!r}, not {cluster!r}")
    return SvidIdentity(parts[0], parts[1], parts[2], fields.serial, app_id, fields.not_after)
