"""dstack's key derivations and signatures for the guest agent and the KMS. Pure: no I/O.

Keys derived here must equal those of a real dstack KMS and agent byte for byte, so that apps,
SDKs and on-chain verifiers can't tell them apart. The vectors in shared/vectors/dstack pin that.

coincurve (secp256k1) and pycryptodome (Keccak) are imported by the functions that use them, so
that processes that only derive P-256 keys here (the mesh CA) do not load them.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teemesh.attest.dstack import APP_ID_LEN
from teemesh.encoding import load_json
from teemesh.errors import InputError

if TYPE_CHECKING:
    import coincurve

_SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
KEY_ALGORITHMS: Final = ("secp256k1", "ed25519")
SIGN_ALGORITHMS: Final = ("ed25519", "secp256k1", "secp256k1_prehashed")
_ENV_HEADER: Final = 32 + 12  # ephemeral X25519 public key, then the AES-GCM nonce
REPORT_HASH_ALGORITHMS: Final = (
    *(f"{family}{bits}" for family in ("sha", "sha3-", "keccak") for bits in (256, 384, 512)),
    "raw",
)


def keccak(data: bytes, bits: int = 256) -> bytes:
    """Ethereum's Keccak (the pre-SHA-3 padding): what dstack hashes every signed message with."""
    from Crypto.Hash import keccak as _keccak  # noqa: PLC0415

    return _keccak.new(digest_bits=bits, data=data).digest()


def keccak256(data: bytes) -> bytes:
    return keccak(data, 256)


def _need(data: bytes, size: int, field: str) -> bytes:
    if len(data) != size:
        raise InputError(f"expected {size} bytes, got {len(data)}", field=field)
    return data


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def derive_key(ikm: bytes, context_parts: Iterable[bytes], length: int = 32) -> bytes:
    """HKDF-SHA256, salt ``RATLS``. ring joins the info parts with no separator, and so do we."""
    if not 0 < length <= 255 * 32:
        raise InputError(f"HKDF-SHA256 yields 1 to 8160 bytes, not {length}", field="length")
    return HKDF(hashes.SHA256(), length, b"RATLS", b"".join(context_parts)).derive(ikm)


def _k256(secret: bytes, field: str) -> coincurve.PrivateKey:
    import coincurve  # noqa: PLC0415

    try:
        return coincurve.PrivateKey(_need(secret, 32, field))
    except ValueError as exc:
        raise InputError("not a secp256k1 private key (zero or not below n)", field=field) from exc


def _rs(signature: bytes, field: str) -> tuple[int, int]:
    """r and s must lie in [1, n-1], as k256's ``Signature::from_slice`` demands."""
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")
    if not (0 < r < _SECP256K1_N and 0 < s < _SECP256K1_N):
        raise InputError("r or s is out of range for secp256k1", field=field)
    return r, s


def k256_public_key(secret: bytes) -> bytes:
    """The compressed SEC1 key (33 bytes): the form dstack signs over and returns."""
    return _k256(secret, "key").public_key.format(compressed=True)


def sign_recoverable(secret: bytes, digest: bytes) -> bytes:
    """65-byte r‖s‖v with v∈{0,1}, low s, RFC 6979: k256's ``sign_digest_recoverable``."""
    return _k256(secret, "key").sign_recoverable(_need(digest, 32, "digest"), hasher=None)


def recover_signer(signature: bytes, digest: bytes) -> bytes:
    """The compressed key behind a recoverable signature; high s is refused, as k256 does."""
    _, s = _rs(_need(signature, 65, "signature"), "signature")
    if s > _SECP256K1_N // 2 or signature[64] > 3:
        raise InputError("s is not low or v is not 0..3", field="signature")
    import coincurve  # noqa: PLC0415

    try:
        public = coincurve.PublicKey.from_signature_and_message(
            signature, _need(digest, 32, "digest"), hasher=None
        )
    except ValueError as exc:
        raise InputError("no public key recovers from this signature", field="signature") from exc
    return public.format(compressed=True)


@dataclass(frozen=True)
class DerivedKey:
    """A GetKey answer; the chain ties ``public_key`` to the app key, then to the KMS root."""

    key: bytes
    public_key: bytes
    signature_chain: tuple[bytes, bytes]


@dataclass(frozen=True)
class Signed:
    """A Sign answer; the chain is [signature, GetKey chain[0], the app's k256_signature]."""

    signature: bytes
    public_key: bytes
    signature_chain: tuple[bytes, bytes, bytes]


def _algorithm(algorithm: str, allowed: tuple[str, ...]) -> str:
    name = "secp256k1" if algorithm == "k256" else algorithm
    if name not in allowed:
        raise InputError(f"unsupported {algorithm!r}; use one of {allowed}", field="algorithm")
    return name


def get_key(
    app_k256_key: bytes,
    k256_signature: bytes,
    path: str,
    purpose: str = "",
    algorithm: str = "secp256k1",
) -> DerivedKey:
    """One secret per path for both curves: the algorithm does not enter the derivation."""
    app = _k256(app_k256_key, "k256_key")
    name = _algorithm(algorithm or "secp256k1", KEY_ALGORITHMS)
    key = derive_key(app_k256_key, [path.encode()])
    if name == "ed25519":
        public = ed25519.Ed25519PrivateKey.from_private_bytes(key).public_key().public_bytes_raw()
    else:
        public = k256_public_key(key)
    digest = keccak256(f"{purpose}:{public.hex()}".encode())
    return DerivedKey(key, public, (app.sign_recoverable(digest, hasher=None), k256_signature))


def sign(app_k256_key: bytes, k256_signature: bytes, algorithm: str, data: bytes) -> Signed:
    """Sign with GetKey("vms", "signing"); secp256k1 is plain ECDSA-SHA256, 64-byte r‖s."""
    name = _algorithm(algorithm, SIGN_ALGORITHMS)
    curve = "ed25519" if name == "ed25519" else "secp256k1"
    derived = get_key(app_k256_key, k256_signature, "vms", "signing", curve)
    if name == "ed25519":
        signature = ed25519.Ed25519PrivateKey.from_private_bytes(derived.key).sign(data)
    else:
        digest = _need(data, 32, "data") if name.endswith("prehashed") else _sha256(data)
        signature = sign_recoverable(derived.key, digest)[:64]
    return Signed(signature, derived.public_key, (signature, *derived.signature_chain))


def verify(algorithm: str, data: bytes, signature: bytes, public_key: bytes) -> bool:
    """False for a well-formed signature that does not verify; malformed input raises."""
    name = _algorithm(algorithm, SIGN_ALGORITHMS)
    if name == "ed25519":
        ed_key = ed25519.Ed25519PublicKey.from_public_bytes(_need(public_key, 32, "public_key"))
        try:
            ed_key.verify(_need(signature, 64, "signature"), data)
        except InvalidSignature:
            return False
        return True
    r, s = _rs(_need(signature, 64, "signature"), "signature")
    digest = _need(data, 32, "data") if name.endswith("prehashed") else _sha256(data)
    import coincurve  # noqa: PLC0415

    try:
        key = coincurve.PublicKey(public_key)
    except (ValueError, TypeError) as exc:
        raise InputError("not a SEC1 secp256k1 public key", field="public_key") from exc
    return key.verify(encode_dss_signature(r, s), digest, hasher=None)  # refuses high s, as k256


def tappd_report_data(content: bytes, hash_algorithm: str = "", prefix: str = "") -> bytes:
    """Legacy Tappd.TdxQuote: hash(tag ":" content) zero-padded to 64; a prefix replaces the tag."""
    name = hash_algorithm or "sha512"
    if name == "raw":
        return _need(content, 64, "report_data")
    if name not in REPORT_HASH_ALGORITHMS:
        raise InputError(f"unknown; use one of {REPORT_HASH_ALGORITHMS}", field="hash_algorithm")
    message = (prefix or "app-data").encode() + b":" + content
    if name.startswith("keccak"):
        return keccak(message, int(name[6:])).ljust(64, b"\0")
    return hashlib.new(name.replace("-", "_"), message).digest().ljust(64, b"\0")


@dataclass(frozen=True)
class AppKeys:
    """What GetAppKey hands an app, without the certificates."""

    ca_key: ec.EllipticCurvePrivateKey
    disk_crypt_key: bytes
    env_crypt_key: bytes
    k256_key: bytes
    k256_signature: bytes


def derive_p256_from_seed(
    seed: bytes, context_parts: Iterable[bytes]
) -> ec.EllipticCurvePrivateKey:
    """The HKDF output is the scalar itself (ra_tls ``derive_p256_key_pair_from_bytes``)."""
    scalar = int.from_bytes(derive_key(seed, context_parts), "big")
    try:
        return ec.derive_private_key(scalar, ec.SECP256R1())
    except ValueError as exc:  # probability about 2**-32; upstream fails the same way
        raise InputError("derived scalar is not a P-256 key", field="context_parts") from exc


def derive_p256(
    root_ca_key: ec.EllipticCurvePrivateKey, context_parts: Iterable[bytes]
) -> ec.EllipticCurvePrivateKey:
    if not isinstance(root_ca_key.curve, ec.SECP256R1):
        raise InputError("expected a P-256 private key", field="root_ca_key")
    seed = root_ca_key.private_numbers().private_value.to_bytes(32, "big")
    return derive_p256_from_seed(seed, context_parts)


def derive_dh_secret(
    root_ca_key: ec.EllipticCurvePrivateKey, context_parts: Iterable[bytes]
) -> bytes:
    """sha256 of the derived key's 138-byte PKCS#8 DER (public key included), as rcgen has it."""
    return pkcs8_digest(derive_p256(root_ca_key, context_parts))


def pkcs8_digest(key: ec.EllipticCurvePrivateKey) -> bytes:
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return _sha256(der)


def _app_id(app_id: bytes) -> bytes:
    return _need(app_id, APP_ID_LEN, "app_id")


def app_ca_key(
    root_ca_key: ec.EllipticCurvePrivateKey, app_id: bytes
) -> ec.EllipticCurvePrivateKey:
    return derive_p256(root_ca_key, [_app_id(app_id), b"app-ca"])


def app_disk_key(
    root_ca_key: ec.EllipticCurvePrivateKey, app_id: bytes, instance_id: bytes
) -> bytes:
    """Per instance, so replicas of one app cannot open each other's disks."""
    return derive_dh_secret(root_ca_key, [_app_id(app_id), instance_id, b"app-disk-crypt-key"])


def app_env_key(root_ca_key: ec.EllipticCurvePrivateKey, app_id: bytes) -> bytes:
    """Per app, not per instance: the deployer encrypts env before any instance exists."""
    return derive_dh_secret(root_ca_key, [_app_id(app_id), b"env-encrypt-key"])


def x25519_public_key(secret: bytes) -> bytes:
    """X25519 clamps the raw secret on use, as x25519-dalek's StaticSecret does."""
    key = x25519.X25519PrivateKey.from_private_bytes(_need(secret, 32, "env_crypt_key"))
    return key.public_key().public_bytes_raw()


def kms_digest(prefix: bytes, app_id: bytes, *parts: bytes) -> bytes:
    """keccak256(prefix ":" app_id ‖ parts): every message the KMS root k256 key signs."""
    return keccak256(b"".join((prefix, b":", _app_id(app_id), *parts)))


def app_k256_key(root_k256_key: bytes, app_id: bytes) -> tuple[bytes, bytes]:
    """The app's k256 key and the root's recoverable signature over its compressed pubkey."""
    _k256(root_k256_key, "root_k256_key")
    key = derive_key(root_k256_key, [_app_id(app_id), b"app-key"])
    digest = kms_digest(b"dstack-kms-issued", app_id, k256_public_key(key))
    return key, sign_recoverable(root_k256_key, digest)


def env_pubkey_digest(app_id: bytes, public_key: bytes, timestamp: int | None = None) -> bytes:
    """Legacy form without ``timestamp``; v1 inserts it as a big-endian u64 before the key."""
    if timestamp is None:
        return kms_digest(b"dstack-env-encrypt-pubkey", app_id, public_key)
    if not 0 <= timestamp < 2**64:
        raise InputError("must fit an unsigned 64-bit integer", field="timestamp")
    stamp = timestamp.to_bytes(8, "big")
    return kms_digest(b"dstack-env-encrypt-pubkey", app_id, stamp, public_key)


def sign_env_pubkey(
    root_k256_key: bytes, app_id: bytes, public_key: bytes, timestamp: int | None = None
) -> bytes:
    return sign_recoverable(root_k256_key, env_pubkey_digest(app_id, public_key, timestamp))


def derive_app_keys(
    root_ca_key: ec.EllipticCurvePrivateKey, root_k256_key: bytes, app_id: bytes, instance_id: bytes
) -> AppKeys:
    k256_key, k256_signature = app_k256_key(root_k256_key, app_id)
    return AppKeys(
        ca_key=app_ca_key(root_ca_key, app_id),
        disk_crypt_key=app_disk_key(root_ca_key, app_id, instance_id),
        env_crypt_key=app_env_key(root_ca_key, app_id),
        k256_key=k256_key,
        k256_signature=k256_signature,
    )


def _shared_key(private: x25519.X25519PrivateKey, public_key: bytes, field: str) -> AESGCM:
    """The raw X25519 output is the AES-256 key: dstack applies no KDF."""
    peer = x25519.X25519PublicKey.from_public_bytes(_need(public_key, 32, field))
    try:
        return AESGCM(private.exchange(peer))
    except ValueError as exc:  # a low-order point gives the all-zero secret
        raise InputError("X25519 gives no shared secret with this key", field=field) from exc


def encrypt_env(
    env: Mapping[str, str],
    public_key: bytes,
    *,
    ephemeral: x25519.X25519PrivateKey | None = None,
    iv: bytes | None = None,
) -> bytes:
    """What a deployer uploads (dstack SDK ``encrypt_env_vars``); fix ephemeral/iv only in tests."""
    ephemeral = ephemeral or x25519.X25519PrivateKey.generate()
    iv = _need(iv, 12, "iv") if iv is not None else secrets.token_bytes(12)
    plaintext = json.dumps({"env": [{"key": k, "value": v} for k, v in env.items()]})
    sealed = _shared_key(ephemeral, public_key, "public_key").encrypt(iv, plaintext.encode(), None)
    return ephemeral.public_key().public_bytes_raw() + iv + sealed


def open_env(blob: bytes, env_crypt_key: bytes) -> bytes:
    """The plaintext of ``.encrypted-env``: eph_pub(32) ‖ iv(12) ‖ AES-256-GCM, no AAD."""
    if len(blob) < _ENV_HEADER + 16:
        raise InputError(f"too short ({len(blob)} bytes) to be sealed", field="encrypted_env")
    private = x25519.X25519PrivateKey.from_private_bytes(_need(env_crypt_key, 32, "env_crypt_key"))
    cipher = _shared_key(private, blob[:32], "encrypted_env")
    try:
        return cipher.decrypt(blob[32:_ENV_HEADER], blob[_ENV_HEADER:], None)
    except InvalidTag as exc:
        raise InputError("wrong key, or tampered with", field="encrypted_env") from exc


def parse_env(plaintext: bytes) -> tuple[tuple[str, str], ...]:
    """Accept ``{"env": [...]}`` and the older bare list; keep order and duplicates."""
    doc = load_json(plaintext, field="env")
    items = doc.get("env") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise InputError('expected {"env": [...]} or a list', field="env")
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(items):  # dstack's EnvVar {key, value}
        if not (
            isinstance(item, dict) and all(isinstance(item.get(f), str) for f in ("key", "value"))
        ):
            raise InputError('expected {"key": str, "value": str}', field=f"env[{i}]")
        pairs.append((item["key"], item["value"]))
    return tuple(pairs)


def decrypt_env(blob: bytes, env_crypt_key: bytes) -> tuple[tuple[str, str], ...]:
    return parse_env(open_env(blob, env_crypt_key))
