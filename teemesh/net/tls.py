"""The one TLS-context factory: every context teemesh makes in process comes from here.

Two kinds of peers: attested servers checked by their evidence after the handshake
(``verify=None``: the ssl module checks nothing, ``check_server`` does), and mesh peers whose
chain must lead to the mesh CA (``verify=ca``), checked by OpenSSL during the handshake. TLS 1.3
only between mesh peers: one round trip, and its close_notify is a half-close.
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.identity.certs import cert_pem, key_pem

KeyPair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def tls_context(
    *,
    server: bool,
    identity: KeyPair | None = None,
    verify: x509.Certificate | None = None,
) -> ssl.SSLContext:
    """A context presenting ``identity`` and, with ``verify``, requiring a chain to that CA.

    Hostnames are never checked: mesh peers are named by their SPIFFE id, which the caller
    reads from the verified certificate and compares itself.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if verify is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=cert_pem(verify))
    if identity is not None:
        load_identity(context, identity)
    return context


def load_identity(context: ssl.SSLContext, identity: KeyPair) -> None:
    """Present ``identity`` on the context's next handshakes; open connections keep theirs."""
    # ssl only loads key pairs from files: a private temporary folder, removed at once
    cert, key = identity
    with tempfile.TemporaryDirectory(prefix="teemesh-tls-") as folder:
        cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_path.write_text(cert_pem(cert))
        key_path.touch(mode=0o600)
        key_path.write_text(key_pem(key))
        context.load_cert_chain(cert_path, key_path)
