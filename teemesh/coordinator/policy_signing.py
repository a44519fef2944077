"""Signed cluster policies: the policy decides who gets a mesh identity, so on dstack, where it
reaches the coordinators through their environment (which the host can replace: dstack's
encrypted env is encrypted to the app, not signed by its owner), only a policy signed by the
operator's key is loaded. The key's public half is in the coordinators' measured compose (their
command line), so the compose hash the sidecars pin also pins who may write the policy.

Ed25519 over the policy's canonical JSON (sorted keys, compact, UTF-8). The signed document is
one line of JSON, ``{"policy": {...}, "signature": "<hex>"}``, as an env file wants it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from teemesh.config import ConfigError
from teemesh.encoding import load_json
from teemesh.errors import InputError

SIGNER_LEN = 32
"""An Ed25519 public key, raw: what a spec's ``coordinators.policy_signer`` holds (hex)."""


def policy_bytes(policy: dict[str, Any]) -> bytes:
    """The bytes a signature covers: one encoding per document, whatever the file's layout."""
    return json.dumps(policy, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_policy(policy: dict[str, Any], key: Ed25519PrivateKey) -> str:
    """The signed document, on one line."""
    signature = key.sign(policy_bytes(policy)).hex()
    return json.dumps({"policy": policy, "signature": signature}, separators=(",", ":"))


def signer_hex(key: Ed25519PrivateKey) -> str:
    """The public half, raw, in hex: what the spec names as ``coordinators.policy_signer``."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def verified_policy(text: str, signer: str, source: str) -> dict[str, Any]:
    """The policy in a signed document, once its signature by ``signer`` (hex) checks out.

    JSON only, as ``sign_policy`` writes it: what YAML would add (dates, binary, aliases) could
    not have been signed, and must not reach the signature check as anything but an error."""
    try:
        doc = load_json(text, field="document")
    except InputError as exc:
        raise ConfigError(source, [str(exc)]) from exc
    if not isinstance(doc, dict) or set(doc) != {"policy", "signature"}:
        raise ConfigError(source, ['expected a signed policy: {"policy": {...}, "signature": '
                                   '"<hex>"} (teemesh policy sign writes it)'])  # fmt: skip
    policy, signature = doc["policy"], doc["signature"]
    if not isinstance(policy, dict):
        raise ConfigError(source, ["policy: expected the cluster policy (a mapping)"])
    try:
        public = Ed25519PublicKey.from_public_bytes(_hex(signer, SIGNER_LEN, "policy signer"))
        public.verify(_hex(signature, 64, "signature"), policy_bytes(policy))
    except (TypeError, ValueError):  # what no canonical JSON holds: no signer wrote that
        raise ConfigError(
            source, ["policy: not a JSON document a signer could have signed"]
        ) from None
    except InvalidSignature:
        raise ConfigError(source, ["signature: not made by the policy signer this coordinator "
                                   f"was measured with ({signer})"]) from None  # fmt: skip
    except InputError as exc:
        raise ConfigError(source, [str(exc)]) from exc
    return policy


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key (PKCS#8 PEM, as ``teemesh policy keygen`` writes it)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise InputError(f"cannot read it: {exc.strerror or exc}", field=str(path)) from exc
    except (ValueError, TypeError) as exc:
        raise InputError(f"not a PEM private key without a password: {exc}",
                         field=str(path)) from exc  # fmt: skip
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError("not an Ed25519 key (teemesh policy keygen makes one)", field=str(path))
    return key


def new_signing_key() -> tuple[Ed25519PrivateKey, bytes]:
    """A new key and its PKCS#8 PEM."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key, pem


def _hex(value: Any, size: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise InputError(f"expected {size} bytes in hex", field=what)
    return raw
