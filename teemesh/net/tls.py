"""The one TLS-context factory: every context teemesh makes in process comes from here.

Two kinds of peers: attested servers checked by their evidence after the handshake
(``verify=None``: the ssl module checks nothing, the caller's server check does), and mesh peers
whose chain must lead to the mesh CA (``verify=ca``), checked by OpenSSL during the handshake.
TLS 1.3 only between mesh peers: one round trip, and its close_notify is a half-close.

Certificates and keys come as PEM text, so the data plane needs no X.509 library.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from teemesh.errors import InputError

PemPair = tuple[str, str]
"""A certificate (chain) and its private key, PEM."""
MAX_REPLY = 1024 * 1024
"""The largest JSON reply the attested HTTPS clients read."""
DerCheck = Callable[[bytes], None]
"""Raises unless a server's DER certificate is one the caller trusts (run after the handshake)."""


def tls_context(
    *,
    server: bool,
    identity: PemPair | None = None,
    verify: str | None = None,
) -> ssl.SSLContext:
    """A context presenting ``identity`` and, with ``verify`` (a CA, PEM), requiring a chain
    to that CA.

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
        context.load_verify_locations(cadata=verify)
    if identity is not None:
        load_identity(context, identity)
    return context


def load_identity(context: ssl.SSLContext, identity: PemPair) -> None:
    """Present ``identity`` on the context's next handshakes; open connections keep theirs."""
    # ssl only loads key pairs from files: a private temporary folder, removed at once
    cert, key = identity
    with tempfile.TemporaryDirectory(prefix="teemesh-tls-") as folder:
        cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_path.write_text(cert)
        key_path.touch(mode=0o600)
        key_path.write_text(key)
        context.load_cert_chain(cert_path, key_path)


def https_target(url: str) -> tuple[str, str, int]:
    """``https://HOST[:PORT]`` as (the URL without a trailing slash, host, port)."""
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError:
        parts, port = None, 0
    if parts is None or parts.scheme != "https" or not parts.hostname:
        raise InputError(f"expected https://HOST[:PORT], got {url!r}", field="url")
    return url.rstrip("/"), parts.hostname, port
