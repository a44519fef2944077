"""dstack-vpc's auth service: nginx's ``auth_request`` asks it who a client certificate names.

    GET /auth     x-client-verify: SUCCESS, x-client-cert: <URL-escaped PEM>
                  (nginx's $ssl_client_verify and $ssl_client_escaped_cert)
                  -> 200 with x-dstack-app-id, x-teemesh-group, x-teemesh-peer; 401; 403
    GET /health   200, no certificate needed

nginx then sets ``X-Dstack-App-Id`` from the answer (``auth_request_set``), overwriting whatever
the client sent, so the backend can trust it. Unlike dstack-vpc's service, this one does not take
nginx's ``SUCCESS`` for it: the certificate must chain to the mesh CA this sidecar trusts now,
be in date, not be revoked, name this cluster and carry an app id; and when ``callers`` is set,
only those groups pass (403 for the others, as nginx expects of a refusal).

The decision (:func:`decide`) is pure; the sidecar serves it with the current CA and revocations.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from teemesh.errors import MeshError
from teemesh.identity.svid import SvidIdentity, read_svid

MAX_CERT = 16 * 1024
"""An escaped PEM longer than this is not a mesh SVID."""


@dataclass(frozen=True)
class Trust:
    """What a client certificate is judged against: the sidecar's view at one moment."""

    cluster: str
    ca_pem: bytes
    """The mesh CA bundle the sidecar trusts (more than one during a rotation)."""
    now: float
    revoked: frozenset[int] = frozenset()
    callers: frozenset[str] | None = None
    """Groups allowed through; None: every group of the cluster."""


@dataclass(frozen=True)
class Decision:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = field(default=())


def decide(method: str, path: str, headers: Mapping[str, str], trust: Trust) -> Decision:
    """The answer to one request; ``headers`` with lowercase names."""
    path = path.partition("?")[0]
    if path == "/health":
        return Decision(200, "ok")
    if path != "/auth":
        return Decision(404, f"no such path {path}: /auth or /health")
    if method not in ("GET", "HEAD"):
        return Decision(405, "/auth takes GET")
    return authenticate(headers, trust)


def authenticate(headers: Mapping[str, str], trust: Trust) -> Decision:
    """200 with the client's app id, group and peer id; 401 or 403 with the reason."""
    if headers.get("x-client-verify") != "SUCCESS":
        return Decision(401, "nginx did not verify a client certificate (x-client-verify)")
    escaped = headers.get("x-client-cert", "")
    if not escaped or len(escaped) > MAX_CERT:
        return Decision(401, "no client certificate (x-client-cert)")
    try:
        peer = verified_peer(unquote(escaped).encode(), trust)
    except (MeshError, ValueError, VerificationError) as exc:
        return Decision(401, f"client certificate refused: {exc}")
    if peer.app_id is None:
        return Decision(401, "the client certificate carries no app id")
    if trust.callers is not None and peer.group not in trust.callers:
        return Decision(403, f"group {peer.group} is not allowed here")
    return Decision(200, f"{peer.group}/{peer.peer_id}", (
        ("x-dstack-app-id", peer.app_id.hex()),
        ("x-teemesh-group", peer.group),
        ("x-teemesh-peer", peer.peer_id),
    ))  # fmt: skip


@functools.lru_cache(maxsize=4)
def _store(ca_pem: bytes) -> Store:
    """The trust store of a CA bundle, parsed once per bundle (not per request)."""
    return Store(x509.load_pem_x509_certificates(ca_pem))


def verified_peer(pem: bytes, trust: Trust) -> SvidIdentity:
    """The mesh peer a PEM certificate names, once it chains to the mesh CA at ``trust.now``."""
    leaf = x509.load_pem_x509_certificate(pem)
    when = dt.datetime.fromtimestamp(trust.now, dt.UTC)
    verifier = PolicyBuilder().store(_store(trust.ca_pem)).time(when).build_client_verifier()
    verifier.verify(leaf, [])
    peer = read_svid(leaf.public_bytes(Encoding.DER), trust.cluster)
    if peer.serial in trust.revoked:
        raise ValueError(f"certificate {peer.serial:x} was revoked")
    return peer
