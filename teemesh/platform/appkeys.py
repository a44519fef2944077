"""An app's key material inside its CVM, in dstack's ``appkeys.json`` shape.

In KMS mode the keys come from the KMS; without one (dstack's key_provider ``none``) they are
derived from a random seed the way dstack-util's ``gen_app_keys_from_seed`` does, and the app CA
is self-signed.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.attest.dstack import KeyProvider
from teemesh.encoding import load_json, parse_hex, string_field
from teemesh.errors import InputError
from teemesh.identity.certs import (
    CertSpec,
    issue,
    load_cert_pem,
    load_key_pem,
)
from teemesh.identity.ratls import spki_der
from teemesh.platform import keys


@dataclass(frozen=True)
class AgentKeys:
    k256_key: bytes
    k256_signature: bytes
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    disk_crypt_key: bytes
    env_crypt_key: bytes
    gateway_app_id: str
    provider: KeyProvider
    kms_ca_cert: x509.Certificate | None = None
    """KMS mode: the KMS root CA above ``ca_cert``, so leaf chains run up to it."""


def keys_from_seed(seed: bytes | None = None, *, now: dt.datetime | None = None) -> AgentKeys:
    """Keys for a CVM with no KMS; a fresh seed every boot, like dstack's ``none`` provider."""
    seed = seed or secrets.token_bytes(32)
    ca_key = keys.derive_p256_from_seed(seed, [b"app-key"])
    disk = keys.pkcs8_digest(keys.derive_p256_from_seed(seed, [b"app-disk-key"]))
    start = now or dt.datetime.now(dt.UTC)
    spec = CertSpec(
        "App Root Cert", start, start + dt.timedelta(days=3650), "Dstack", ca_path_len=0
    )
    ca_cert = issue(spec, ca_key.public_key(), ca_key)
    return AgentKeys(
        k256_key=keys.derive_key(seed, [b"app-k256-key"]),
        k256_signature=b"",
        ca_key=ca_key,
        ca_cert=ca_cert,
        disk_crypt_key=disk,
        env_crypt_key=b"",
        gateway_app_id="",
        provider=KeyProvider("none", ""),
    )


def load_appkeys(text: str | bytes) -> AgentKeys:
    """Read dstack's appkeys.json (as the upstream simulator does)."""
    doc = load_json(text, field="appkeys")
    if not isinstance(doc, dict):
        raise InputError("expected a JSON object", field="appkeys")
    provider = doc.get("key_provider")
    if not (isinstance(provider, dict) and len(provider) == 1):
        raise InputError(
            'expected {"None"|"Kms"|"Local": {"key": PEM}}', field="appkeys.key_provider"
        )
    ((variant, body),) = provider.items()
    if not (isinstance(body, dict) and isinstance(body.get("key"), str)):
        raise InputError(
            "expected a PEM private key in key", field=f"appkeys.key_provider.{variant}"
        )
    ca_key = load_key_pem(body["key"], field="appkeys.key_provider")
    ca_cert = load_cert_pem(str(doc.get("ca_cert", "")), field="appkeys.ca_cert")

    def hexfield(name: str) -> bytes:
        return parse_hex(doc.get(name, ""), field=f"appkeys.{name}")

    kms = variant.lower() == "kms"
    return AgentKeys(
        k256_key=hexfield("k256_key"),
        k256_signature=hexfield("k256_signature"),
        ca_key=ca_key,
        ca_cert=ca_cert,
        disk_crypt_key=hexfield("disk_crypt_key"),
        env_crypt_key=hexfield("env_crypt_key"),
        gateway_app_id=str(doc.get("gateway_app_id", "")),
        provider=KeyProvider("kms", spki_der(ca_cert.public_key()).hex())
        if kms
        else KeyProvider(variant.lower(), ""),
    )


def keys_from_kms(reply: Any, root_ca: x509.Certificate) -> AgentKeys:
    """The keys in a KMS ``GetAppKey`` reply; the key provider measured is that KMS's root CA."""
    if not isinstance(reply, dict):
        raise InputError("expected a JSON object", field="GetAppKey")

    def text(name: str) -> str:
        return string_field(reply, name, field="GetAppKey")

    def hexfield(name: str, size: int) -> bytes:
        return parse_hex(text(name), field=f"GetAppKey.{name}", size=size)

    return AgentKeys(
        k256_key=hexfield("k256_key", 32),
        k256_signature=hexfield("k256_signature", 65),
        ca_key=load_key_pem(text("app_ca_key"), field="GetAppKey.app_ca_key"),
        ca_cert=load_cert_pem(text("app_ca_cert"), field="GetAppKey.app_ca_cert"),
        disk_crypt_key=hexfield("disk_crypt_key", 32),
        env_crypt_key=hexfield("env_crypt_key", 32),
        gateway_app_id=text("gateway_app_id"),
        provider=KeyProvider("kms", spki_der(root_ca.public_key()).hex()),
        kms_ca_cert=root_ca,
    )
