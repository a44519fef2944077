"""Certificate issuance: one function for every CA in the system (app CA, KMS CAs, mesh CA)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from teemesh.errors import InputError

# rcgen's default not_before, which dstack's agent keeps unless told otherwise.
DSTACK_NOT_BEFORE = dt.datetime(1975, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class CertSpec:
    """What a certificate should say; the issuer decides nothing else."""

    common_name: str
    not_before: dt.datetime
    not_after: dt.datetime
    organization: str | None = None
    alt_names: Sequence[str] = ()
    uris: Sequence[str] = ()
    server_auth: bool = False
    client_auth: bool = False
    ca_path_len: int | None = None
    """None for a leaf; 0 or more makes a CA with that path length."""
    extensions: Sequence[x509.ExtensionType] = field(default_factory=tuple)
    serial: int | None = None
    """None draws a random serial; a CA that replicas derive alike fixes it."""


def _name(spec: CertSpec) -> x509.Name:
    attrs = []
    if spec.organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, spec.organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name))
    return x509.Name(attrs)


def _general_names(spec: CertSpec) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for alt in spec.alt_names:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(alt)))
        except ValueError:
            names.append(x509.DNSName(alt))
    names.extend(x509.UniformResourceIdentifier(uri) for uri in spec.uris)
    return names


def issue(
    spec: CertSpec,
    public_key: CertificatePublicKeyTypes,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    issuer: x509.Certificate | None = None,
) -> x509.Certificate:
    """Sign ``public_key`` per ``spec``; without ``issuer`` the certificate is self-signed."""
    if not spec.common_name:
        raise InputError("a certificate needs a common name", field="subject")
    if spec.not_after <= spec.not_before:
        raise InputError("not_after must be later than not_before", field="not_after")
    subject = _name(spec)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(spec.serial or x509.random_serial_number())
        .not_valid_before(spec.not_before)
        .not_valid_after(spec.not_after)
        .add_extension(
            x509.BasicConstraints(ca=spec.ca_path_len is not None, path_length=spec.ca_path_len),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    is_ca = spec.ca_path_len is not None
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=is_ca, crl_sign=is_ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = builder.add_extension(usage, critical=True)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    purposes = [
        oid
        for wanted, oid in (
            (spec.server_auth, ExtendedKeyUsageOID.SERVER_AUTH),
            (spec.client_auth, ExtendedKeyUsageOID.CLIENT_AUTH),
        )
        if wanted
    ]
    if purposes:
        builder = builder.add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
    names = _general_names(spec)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for ext in spec.extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def new_p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


KeyPair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def pem_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    """A key pair as the TLS-context factory takes it."""
    return cert_pem(cert), key_pem(key)


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> str:
    """PKCS#8 PEM (``BEGIN PRIVATE KEY``), the form dstack's agent returns."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def load_cert_pem(pem: str | bytes, *, field: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise InputError(f"not a PEM certificate: {exc}", field=field) from exc


def load_key_pem(pem: str | bytes, *, field: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key (every key our CAs and leaves use); anything else names ``field``."""
    try:
        key = serialization.load_pem_private_key(
            pem.encode() if isinstance(pem, str) else pem, password=None
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InputError(f"not a PEM private key: {exc}", field=field) from exc
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)):
        raise InputError("expected a P-256 private key", field=field)
    return key


def local_web_pki(names: Sequence[str], *, days: int = 397) -> tuple[str, tuple[str, str]]:
    """A CA made on this machine and a server certificate it signed for ``names`` (DNS names,
    wildcards allowed): (CA PEM, (certificate PEM, key PEM)). The local platform's gateway
    serves the certificate; a client trusts the CA by file (``curl --cacert``), never the
    system store, so the CA key is dropped here."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=days)
    ca_key, key = new_p256_key(), new_p256_key()
    ca = issue(CertSpec(f"teemesh local CA {now:%Y-%m-%d %H:%M}", start, end, ca_path_len=0),
               ca_key.public_key(), ca_key)  # fmt: skip
    leaf = CertSpec(names[0], start, end, alt_names=names, server_auth=True)
    cert = issue(leaf, key.public_key(), ca_key, ca)
    return cert_pem(ca), (cert_pem(cert), key_pem(key))
