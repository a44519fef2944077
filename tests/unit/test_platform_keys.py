from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from conftest import vector_path
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from teemesh.errors import InputError
from teemesh.platform import keys

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
GETKEY_PATHS = ["/test/path", "vms", ""]


@pytest.fixture(scope="module")
def appkeys() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(vector_path("dstack/simulator/appkeys.json").read_text())
    return doc


@pytest.fixture(scope="module")
def app_key(appkeys: dict[str, Any]) -> bytes:
    return bytes.fromhex(appkeys["k256_key"])


@pytest.fixture(scope="module")
def app_sig(appkeys: dict[str, Any]) -> bytes:
    return bytes.fromhex(appkeys["k256_signature"])


def simulator_app_id(expected: dict[str, Any]) -> bytes:
    events = expected["simulator/attestation.bin"]["runtime_events"]
    return bytes.fromhex(next(e["payload_hex"] for e in events if e["event"] == "app-id"))


def upstream(expected: dict[str, Any], name: str) -> dict[str, Any]:
    vector: dict[str, Any] = expected["upstream_test_vectors_without_files"][name]
    return vector


# ---- vectors from expected.json ----------------------------------------------------------------


@pytest.mark.parametrize("path", GETKEY_PATHS)
@pytest.mark.parametrize("algorithm", ["secp256k1", "ed25519"])
def test_getkey_vectors(
    expected: dict[str, Any], app_key: bytes, app_sig: bytes, path: str, algorithm: str
) -> None:
    want = expected["simulator/appkeys.json"]["derived"]["GetKey"][path]
    got = keys.get_key(app_key, app_sig, path, "test-purpose", algorithm)
    assert got.key.hex() == want["key"]
    assert got.public_key.hex() == want[f"{algorithm}_pubkey"]
    first, second = got.signature_chain
    assert len(first) == 65 and first[64] in (0, 1)
    assert int.from_bytes(first[32:64], "big") <= N // 2
    digest = keys.keccak256(f"test-purpose:{want[f'{algorithm}_pubkey']}".encode())
    app_pub = expected["simulator/appkeys.json"]["upstream_asserted"]["app_k256_pubkey_compressed"]
    assert keys.recover_signer(first, digest).hex() == app_pub
    assert second == app_sig


def test_app_k256_pubkey_is_upstream_asserted(expected: dict[str, Any], app_key: bytes) -> None:
    want = expected["simulator/appkeys.json"]["upstream_asserted"]["app_k256_pubkey_compressed"]
    assert keys.k256_public_key(app_key).hex() == want


def test_k256_signature_recovers_the_kms_root(
    expected: dict[str, Any], app_key: bytes, app_sig: bytes
) -> None:
    section = expected["simulator/appkeys.json"]
    app_id = simulator_app_id(expected)
    assert app_id.hex() in section["derived"]["k256_signature_recovers_kms_pubkey_with"]
    digest = keys.kms_digest(b"dstack-kms-issued", app_id, keys.k256_public_key(app_key))
    assert digest == keys.keccak256(b"dstack-kms-issued:" + app_id + keys.k256_public_key(app_key))
    want = section["upstream_asserted"]["kms_root_k256_pubkey_compressed"]
    assert want.startswith("0321529e")
    assert keys.recover_signer(app_sig, digest).hex() == want


def test_ra_tls_kdf_derive_dh_secret(expected: dict[str, Any]) -> None:
    vector = upstream(expected, "ra_tls_kdf_derive_dh_secret")
    der = bytes.fromhex(vector["root_key_pkcs8_der_hex"])
    root = serialization.load_der_private_key(der, password=None)
    assert isinstance(root, ec.EllipticCurvePrivateKey)
    parts = [c.encode() for c in vector["context"]]
    assert keys.derive_dh_secret(root, parts).hex() == vector["expected_secret"]
    derived_der = keys.derive_p256(root, parts).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert len(derived_der) == len(der) == 138


def test_env_decrypt_vector(expected: dict[str, Any]) -> None:
    vector = upstream(expected, "env_decrypt")
    blob, secret = bytes.fromhex(vector["ciphertext"]), bytes.fromhex(vector["x25519_secret"])
    assert keys.open_env(blob, secret) == vector["plaintext"].encode()
    assert keys.decrypt_env(blob, secret) == (("", ""),)


def test_env_pubkey_legacy_signature_vector(expected: dict[str, Any]) -> None:
    vector = upstream(expected, "env_pubkey_legacy_signature")
    app_id, public = bytes.fromhex(vector["app_id"]), bytes.fromhex(vector["public_key"])
    digest = keys.env_pubkey_digest(app_id, public)
    assert digest == keys.keccak256(b"dstack-env-encrypt-pubkey:" + app_id + public)
    signer = keys.recover_signer(bytes.fromhex(vector["signature"]), digest)
    assert signer.hex() == vector["expected_signer_compressed"]


def test_env_crypt_key_x25519_pubkey(expected: dict[str, Any], appkeys: dict[str, Any]) -> None:
    want = expected["simulator/appkeys.json"]["derived"]["env_crypt_key_x25519_pubkey"]
    assert keys.x25519_public_key(bytes.fromhex(appkeys["env_crypt_key"])).hex() == want


# ---- independent cross-checks ----------------------------------------------------------------


def test_keccak_is_ethereum_keccak_not_sha3() -> None:
    empty = "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert keys.keccak256(b"").hex() == empty
    assert keys.keccak256(b"") != hashlib.sha3_256(b"").digest()
    assert len(keys.keccak(b"", 384)) == 48 and len(keys.keccak(b"", 512)) == 64


def test_derive_key_is_rfc5869_with_concatenated_info() -> None:
    ikm, info = b"input key material", b"context one" + b"context two"
    prk = hmac.new(b"RATLS", ikm, "sha256").digest()
    okm = hmac.new(prk, info + b"\x01", "sha256").digest()
    assert keys.derive_key(ikm, [b"context one", b"context two"]) == okm
    assert keys.derive_key(ikm, [info]) == okm
    assert len(keys.derive_key(ikm, [b"context one"], 256)) == 256


@pytest.mark.parametrize("algorithm", ["secp256k1", "secp256k1_prehashed"])
def test_secp256k1_signatures_are_rfc6979_low_s(
    app_key: bytes, app_sig: bytes, algorithm: str
) -> None:
    data = hashlib.sha256(b"payload").digest()
    signed = keys.sign(app_key, app_sig, algorithm, data)
    derived = keys.get_key(app_key, app_sig, "vms", "signing", "secp256k1")
    private = ec.derive_private_key(int.from_bytes(derived.key, "big"), ec.SECP256K1())
    mode = Prehashed(hashes.SHA256()) if algorithm.endswith("prehashed") else hashes.SHA256()
    r, s = decode_dss_signature(private.sign(data, ec.ECDSA(mode, deterministic_signing=True)))
    s = min(s, N - s)
    assert signed.signature == r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_tappd_report_data_upstream_and_each_algorithm() -> None:
    # dstack-attest test_to_report_data_with_hash: sha512("app-data:test content")
    upstream_sha512 = (
        "7ea0b744ed5e9c0c83ff9f575668e1697652cd349f2027cdf26f918d4c53e8cd"
        "50b5ea9b449b4c3d50e20ae00ec29688d5a214e8daff8a10041f5d624dae8a01"
    )
    assert keys.tappd_report_data(b"test content").hex() == upstream_sha512
    assert keys.tappd_report_data(b"test content", "sha512").hex() == upstream_sha512
    message = b"app-data:test content"
    for name in keys.REPORT_HASH_ALGORITHMS[:-1]:
        got = keys.tappd_report_data(b"test content", name)
        if name.startswith("keccak"):
            digest = keys.keccak(message, int(name[6:]))
        else:
            digest = hashlib.new(name.replace("-", "_"), message).digest()
        assert got == digest + bytes(64 - len(digest)), name
    assert len(keys.REPORT_HASH_ALGORITHMS) == 10


def test_tappd_report_data_prefix_replaces_the_tag() -> None:
    got = keys.tappd_report_data(b"x", "sha256", prefix="app-data:")
    assert got == hashlib.sha256(b"app-data::x").digest() + bytes(32)
    got = keys.tappd_report_data(b"spki", "", prefix="ratls-cert")
    assert got == hashlib.sha512(b"ratls-cert:spki").digest()
    assert keys.tappd_report_data(bytes(range(64)), "raw") == bytes(range(64))


# ---- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ed25519", "secp256k1", "secp256k1_prehashed"])
def test_sign_then_verify(
    expected: dict[str, Any], app_key: bytes, app_sig: bytes, algorithm: str
) -> None:
    data = hashlib.sha256(b"hello").digest()
    signed = keys.sign(app_key, app_sig, algorithm, data)
    curve = "ed25519" if algorithm == "ed25519" else "secp256k1"
    vms = expected["simulator/appkeys.json"]["derived"]["GetKey"]["vms"]
    assert signed.public_key.hex() == vms[f"{curve}_pubkey"]
    getkey = keys.get_key(app_key, app_sig, "vms", "signing", curve)
    assert signed.signature_chain == (signed.signature, *getkey.signature_chain)
    assert len(signed.signature) == 64
    assert keys.verify(algorithm, data, signed.signature, signed.public_key)
    tampered = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    assert not keys.verify(algorithm, data, tampered, signed.public_key)
    assert not keys.verify(algorithm, bytes(32), signed.signature, signed.public_key)


def test_verify_refuses_high_s_like_k256(app_key: bytes, app_sig: bytes) -> None:
    signed = keys.sign(app_key, app_sig, "secp256k1", b"data")
    s = int.from_bytes(signed.signature[32:], "big")
    high = signed.signature[:32] + (N - s).to_bytes(32, "big")
    assert not keys.verify("secp256k1", b"data", high, signed.public_key)
    assert keys.verify("k256", b"data", signed.signature, signed.public_key)


def test_getkey_algorithm_and_purpose_do_not_change_the_key(app_key: bytes, app_sig: bytes) -> None:
    a = keys.get_key(app_key, app_sig, "p", "one", "secp256k1")
    b = keys.get_key(app_key, app_sig, "p", "two", "ed25519")
    assert a.key == b.key and a.signature_chain[0] != b.signature_chain[0]
    assert keys.get_key(app_key, app_sig, "p", "one", "") == a
    assert keys.get_key(app_key, app_sig, "p", "one", "k256") == a


def test_kms_derivations_round_trip() -> None:
    root_ca = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
    root_k256 = hashlib.sha256(b"root k256").digest()
    root_pub = keys.k256_public_key(root_k256)
    app_id, other = bytes(range(20)), bytes(range(1, 21))
    got = keys.derive_app_keys(root_ca, root_k256, app_id, b"instance-1")

    assert got.k256_key == keys.derive_key(root_k256, [app_id, b"app-key"])
    issued = keys.kms_digest(b"dstack-kms-issued", app_id, keys.k256_public_key(got.k256_key))
    assert keys.recover_signer(got.k256_signature, issued) == root_pub
    assert got.env_crypt_key == keys.derive_dh_secret(root_ca, [app_id, b"env-encrypt-key"])
    assert got.disk_crypt_key != keys.app_disk_key(root_ca, app_id, b"instance-2")
    assert got.disk_crypt_key == keys.app_disk_key(root_ca, app_id, b"instance-1")
    numbers = keys.app_ca_key(root_ca, app_id).private_numbers().private_value
    assert numbers == got.ca_key.private_numbers().private_value
    assert numbers != keys.app_ca_key(root_ca, other).private_numbers().private_value
    seed = keys.derive_key(root_ca.private_numbers().private_value.to_bytes(32, "big"), [b"x"])
    assert keys.derive_p256(root_ca, [b"x"]).private_numbers().private_value == int.from_bytes(
        seed, "big"
    )

    env_pub = keys.x25519_public_key(got.env_crypt_key)
    legacy = keys.sign_env_pubkey(root_k256, app_id, env_pub)
    v1 = keys.sign_env_pubkey(root_k256, app_id, env_pub, 1_700_000_000)
    assert keys.recover_signer(legacy, keys.env_pubkey_digest(app_id, env_pub)) == root_pub
    v1_digest = keys.keccak256(
        b"dstack-env-encrypt-pubkey:" + app_id + (1_700_000_000).to_bytes(8, "big") + env_pub
    )
    assert keys.env_pubkey_digest(app_id, env_pub, 1_700_000_000) == v1_digest
    assert keys.recover_signer(v1, v1_digest) == root_pub
    assert legacy != v1


def test_env_encrypt_then_decrypt() -> None:
    secret = hashlib.sha256(b"env key").digest()
    env = {"DATABASE_URL": "postgres://x", "TOKEN": "ü-secret"}
    blob = keys.encrypt_env(env, keys.x25519_public_key(secret))
    assert dict(keys.decrypt_env(blob, secret)) == env
    ephemeral = x25519.X25519PrivateKey.from_private_bytes(bytes(range(32)))
    one = keys.encrypt_env(env, keys.x25519_public_key(secret), ephemeral=ephemeral, iv=bytes(12))
    two = keys.encrypt_env(env, keys.x25519_public_key(secret), ephemeral=ephemeral, iv=bytes(12))
    assert one == two and one[:32] == ephemeral.public_key().public_bytes_raw()
    assert json.loads(keys.open_env(one, secret)) == {
        "env": [{"key": k, "value": v} for k, v in env.items()]
    }


def test_parse_env_accepts_both_forms_and_keeps_order() -> None:
    items = [{"key": "B", "value": "1"}, {"key": "A", "value": "2"}, {"key": "B", "value": "3"}]
    want = (("B", "1"), ("A", "2"), ("B", "3"))
    assert keys.parse_env(json.dumps(items).encode()) == want
    assert keys.parse_env(json.dumps({"env": items}).encode()) == want


# ---- bad input -------------------------------------------------------------------------------


def fails(field: str, call: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    assert info.value.field == field, str(info.value)


def test_bad_input_to_agent_functions(app_key: bytes, app_sig: bytes) -> None:
    fails("k256_key", keys.get_key, app_key[:31], app_sig, "p")
    fails("k256_key", keys.get_key, bytes(32), app_sig, "p")
    fails("k256_key", keys.get_key, b"\xff" * 32, app_sig, "p")
    fails("algorithm", keys.get_key, app_key, app_sig, "p", "", "rsa")
    fails("algorithm", keys.get_key, app_key, app_sig, "p", "", "secp256k1_prehashed")
    fails("algorithm", keys.sign, app_key, app_sig, "", b"x")
    fails("data", keys.sign, app_key, app_sig, "secp256k1_prehashed", bytes(31))
    fails("length", keys.derive_key, b"k", [], 0)
    fails("length", keys.derive_key, b"k", [], 255 * 32 + 1)
    fails("digest", keys.sign_recoverable, app_key, bytes(31))


def test_bad_input_to_verify_and_recover(app_key: bytes, app_sig: bytes) -> None:
    signed = keys.sign(app_key, app_sig, "secp256k1", b"m")
    fails("algorithm", keys.verify, "rsa", b"m", signed.signature, signed.public_key)
    fails("signature", keys.verify, "secp256k1", b"m", signed.signature[:63], signed.public_key)
    fails("signature", keys.verify, "secp256k1", b"m", bytes(64), signed.public_key)
    fails("signature", keys.verify, "secp256k1", b"m", b"\xff" * 64, signed.public_key)
    fails("public_key", keys.verify, "secp256k1", b"m", signed.signature, b"\x02" + b"\xff" * 32)
    fails("public_key", keys.verify, "secp256k1", b"m", signed.signature, b"")
    fails("data", keys.verify, "secp256k1_prehashed", b"m", signed.signature, signed.public_key)
    fails("public_key", keys.verify, "ed25519", b"m", bytes(64), bytes(31))
    fails("signature", keys.verify, "ed25519", b"m", bytes(63), bytes(32))

    digest = keys.keccak256(b"m")
    recoverable = keys.sign_recoverable(app_key, digest)
    assert keys.recover_signer(recoverable, digest) == keys.k256_public_key(app_key)
    s = int.from_bytes(recoverable[32:64], "big")
    high = recoverable[:32] + (N - s).to_bytes(32, "big") + bytes([recoverable[64] ^ 1])
    fails("signature", keys.recover_signer, high, digest)
    fails("signature", keys.recover_signer, recoverable[:64] + b"\x04", digest)
    fails("signature", keys.recover_signer, recoverable[:64], digest)
    fails("digest", keys.recover_signer, recoverable, digest[:31])


def test_bad_input_to_kms_functions() -> None:
    root_ca = ec.derive_private_key(7, ec.SECP256R1())
    root_k256 = hashlib.sha256(b"root").digest()
    fails("app_id", keys.app_ca_key, root_ca, bytes(19))
    fails("app_id", keys.app_env_key, root_ca, bytes(32))
    fails("app_id", keys.app_disk_key, root_ca, b"", b"instance")
    fails("app_id", keys.app_k256_key, root_k256, bytes(21))
    fails("root_k256_key", keys.app_k256_key, bytes(32), bytes(20))
    fails("timestamp", keys.env_pubkey_digest, bytes(20), bytes(32), -1)
    fails("timestamp", keys.env_pubkey_digest, bytes(20), bytes(32), 2**64)
    fails("root_ca_key", keys.derive_p256, ec.derive_private_key(7, ec.SECP384R1()), [b"x"])
    fails("env_crypt_key", keys.x25519_public_key, bytes(31))


def test_bad_input_to_env_functions() -> None:
    secret = hashlib.sha256(b"env key").digest()
    blob = keys.encrypt_env({"A": "1"}, keys.x25519_public_key(secret))
    fails("encrypted_env", keys.open_env, blob[:59], secret)
    fails("encrypted_env", keys.open_env, blob[:-1] + bytes([blob[-1] ^ 1]), secret)
    fails("encrypted_env", keys.open_env, blob, hashlib.sha256(b"other").digest())
    fails("encrypted_env", keys.open_env, bytes(32) + blob[32:], secret)  # low-order point
    fails("env_crypt_key", keys.open_env, blob, secret[:31])
    fails("public_key", keys.encrypt_env, {"A": "1"}, bytes(31))
    fails("iv", keys.encrypt_env, {"A": "1"}, keys.x25519_public_key(secret), iv=bytes(8))
    fails("env", keys.parse_env, b"{not json")
    fails("env", keys.parse_env, b'{"vars": []}')
    fails("env[1]", keys.parse_env, b'[{"key": "A", "value": "1"}, {"key": "B", "value": 2}]')
    fails("report_data", keys.tappd_report_data, bytes(65), "raw")
    fails("report_data", keys.tappd_report_data, bytes(63), "raw")
    fails("hash_algorithm", keys.tappd_report_data, b"x", "md5")
