"""The KMS service without sockets: root keys, boot info, authorization, derivations."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from teemesh.attest.dstack import KeyProvider, compose_hash, mr_aggregated
from teemesh.attest.evidence import analyze, load_evidence
from teemesh.attest.policy import Policy
from teemesh.attest.simulated import OsImage, PlatformKey, SimulatedCvm
from teemesh.errors import InputError, Refused
from teemesh.identity.certs import load_key_pem
from teemesh.identity.ratls import spki_der
from teemesh.platform import keys
from teemesh.platform.appkeys import keys_from_kms
from teemesh.platform.bootauth import BootDecision, BootInfo, ConfigAuth, DevAuth
from teemesh.platform.kms import (
    ROOT_KEYS_FILE,
    KmsService,
    RootKeys,
    Verifier,
    bootstrap_root_keys,
    load_root_keys,
    root_keys_from_kms_key_reply,
    rpc_cert,
    save_root_keys,
)
from teemesh.platform.kms_client import attested_client_cert

COMPOSE = b'{"name":"app","kms_enabled":true}'
KMS_COMPOSE = b'{"name":"kms","no_instance_id":true}'


@pytest.fixture(scope="module")
def platform() -> PlatformKey:
    return PlatformKey.generate()


@pytest.fixture(scope="module")
def root() -> RootKeys:
    return bootstrap_root_keys()


def _cvm(platform: PlatformKey, compose: bytes = COMPOSE, **kw) -> SimulatedCvm:
    return SimulatedCvm(platform, OsImage("os"), compose, awaiting_keys=True, **kw)


def _service(platform: PlatformKey, root: RootKeys, authorizer=None, **kw) -> KmsService:
    policy = Policy(tee="simulated", platform_key=platform.public_pem().decode())
    return KmsService(root, authorizer or DevAuth("gw"), Verifier(policy), **kw)


def _client_cert(service: KmsService, cvm: SimulatedCvm):
    cert, _ = attested_client_cert(service.get_temp_ca_cert(), cvm.attestation)
    return cert


def test_root_keys_round_trip_owner_only(tmp_path: Path, root: RootKeys) -> None:
    path = tmp_path / "kms" / ROOT_KEYS_FILE
    assert load_root_keys(path) is None
    save_root_keys(path, root)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_root_keys(path)
    assert loaded is not None and loaded.to_json() == root.to_json()


def test_a_damaged_root_file_is_an_error_never_a_reset(tmp_path: Path, root: RootKeys) -> None:
    path = tmp_path / ROOT_KEYS_FILE
    save_root_keys(path, root)
    doc = json.loads(path.read_text())
    for name, value, message in (
        ("k256_key", "00" * 32, "k256"),
        ("k256_key", "abc", "odd number"),
        ("ca_key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "ca_key"),
        ("temp_ca_cert", 7, "temp_ca_cert"),
    ):
        path.write_text(json.dumps({**doc, name: value}))
        with pytest.raises(InputError, match=message):
            load_root_keys(path)
    path.write_text('{"ca_key": ')
    with pytest.raises(InputError, match="line 1"):
        load_root_keys(path)


def test_a_crash_mid_write_keeps_the_old_roots(tmp_path: Path, root: RootKeys, monkeypatch) -> None:
    path = tmp_path / ROOT_KEYS_FILE
    save_root_keys(path, root)
    before = path.read_bytes()

    def crash(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        save_root_keys(path, bootstrap_root_keys())
    assert path.read_bytes() == before


def test_app_keys_follow_dstack_derivations(platform: PlatformKey, root: RootKeys) -> None:
    service = _service(platform, root)
    cvm = _cvm(platform)
    reply = service.get_app_key(_client_cert(service, cvm))
    assert cvm.app_id is not None and cvm.instance_id is not None
    expected = keys.derive_app_keys(root.ca_key, root.k256_key, cvm.app_id, cvm.instance_id)
    assert reply["k256_key"] == expected.k256_key.hex()
    assert reply["k256_signature"] == expected.k256_signature.hex()
    assert reply["disk_crypt_key"] == expected.disk_crypt_key.hex()
    assert reply["env_crypt_key"] == expected.env_crypt_key.hex()
    assert reply["gateway_app_id"] == reply["tproxy_app_id"] == "gw"
    assert reply["os_image_hash"] == OsImage("os").os_image_hash.hex()
    agent_keys = keys_from_kms(reply, root.ca_cert)
    # the measured key provider is the KMS root CA itself (its SubjectPublicKeyInfo, in hex)
    assert agent_keys.provider == KeyProvider("kms", spki_der(root.ca_cert.public_key()).hex())
    agent_keys.ca_cert.verify_directly_issued_by(root.ca_cert)
    env = service.get_app_env_encrypt_pub_key({"app_id": cvm.app_id.hex()})
    assert env["public_key"] == keys.x25519_public_key(expected.env_crypt_key).hex()


class Recorder:
    def __init__(self, allow: bool = True, reason: str = "") -> None:
        self.calls: list[tuple[BootInfo, str]] = []
        self.allow, self.reason = allow, reason

    def authorize(self, info: BootInfo, kind: str) -> BootDecision:
        self.calls.append((info, kind))
        return BootDecision(self.allow, self.reason, "gw")

    def info(self):
        return DevAuth("gw").info()


def test_boot_info_is_the_boot_time_view(platform: PlatformKey, root: RootKeys) -> None:
    recorder = Recorder()
    service = _service(platform, root, recorder)
    cvm = _cvm(platform)
    service.get_app_key(_client_cert(service, cvm))
    ((info, kind),) = recorder.calls
    assert kind == "app"
    assert info.app_id == cvm.app_id and info.instance_id == cvm.instance_id
    assert info.compose_hash == compose_hash(COMPOSE)
    assert info.os_image_hash == OsImage("os").os_image_hash  # checked against MRTD/RTMR0-2
    assert info.key_provider_info == b"" and info.tcb_status == "UpToDate"
    report = cvm.report(b"")
    assert info.mr_aggregated == mr_aggregated(report, report.rtmr3)


def test_a_vm_config_claiming_another_image_gets_no_os_image_hash(
    platform: PlatformKey, root: RootKeys
) -> None:
    recorder = Recorder()
    service = _service(platform, root, recorder)
    cvm = _cvm(platform)
    original = cvm.vm_config
    cvm.vm_config = lambda: {**original(), "os_image_hash": OsImage("other").os_image_hash.hex()}  # type: ignore[method-assign]
    service.get_app_key(_client_cert(service, cvm))
    assert recorder.calls[0][0].os_image_hash == b""


def test_refusals(platform: PlatformKey, root: RootKeys) -> None:
    service = _service(platform, root, Recorder(allow=False, reason="compose hash not allowed"))
    cvm = _cvm(platform)
    with pytest.raises(Refused, match="boot not authorized: compose hash not allowed"):
        service.get_app_key(_client_cert(service, cvm))
    with pytest.raises(Refused, match="needs a client certificate"):
        service.get_app_key(None)
    other_platform = _cvm(PlatformKey.generate())
    with pytest.raises(Refused, match="QUOTE_INVALID"):
        _service(platform, root).get_app_key(_client_cert(service, other_platform))
    tdx = KmsService(root, DevAuth("gw"), Verifier(Policy(tee="tdx")))
    with pytest.raises(Refused, match="simulated quote is never accepted"):
        tdx.get_app_key(_client_cert(tdx, cvm))
    debug = _cvm(platform, debug=True)
    with pytest.raises(Refused, match="DEBUG_TD"):
        _service(platform, root).get_app_key(_client_cert(service, debug))


def test_the_kms_must_itself_be_authorized(
    tmp_path: Path, platform: PlatformKey, root: RootKeys
) -> None:
    kms_cvm = SimulatedCvm(platform, OsImage("os"), KMS_COMPOSE, instance_id=b"")
    self_cert, _ = rpc_cert(root, kms_cvm.attestation, ("kms",))
    app = _cvm(platform)
    config = tmp_path / "auth.json"
    assert app.app_id is not None
    rules = {
        "osImages": [OsImage("os").os_image_hash.hex()],
        "apps": {app.app_id.hex(): {"composeHashes": [compose_hash(COMPOSE).hex()]}},
        "kms": {"mrAggregated": []},
    }
    config.write_text(json.dumps(rules))
    service = _service(platform, root, ConfigAuth(config), self_cert=self_cert)
    with pytest.raises(Refused, match="this KMS is not authorized to serve keys"):
        service.get_app_key(_client_cert(service, app))
    with pytest.raises(Refused, match="boot not authorized: aggregated MR not allowed"):
        service.get_kms_key(_client_cert(service, kms_cvm))
    report = kms_cvm.report(b"")
    boot_mr = analyze(load_evidence(kms_cvm.attestation(b""))).measurements.mr_aggregated_boottime
    assert boot_mr is not None and boot_mr != mr_aggregated(report, report.rtmr3)
    rules["kms"] = {"mrAggregated": [boot_mr.hex()]}
    config.write_text(json.dumps(rules))
    assert app.instance_id is not None
    want = keys.derive_app_keys(root.ca_key, root.k256_key, app.app_id, app.instance_id)
    assert service.get_app_key(_client_cert(service, app))["k256_key"] == want.k256_key.hex()
    handed = root_keys_from_kms_key_reply(service.get_kms_key(_client_cert(service, kms_cvm)))
    assert handed.to_json() == root.to_json()


def test_kms_key_reply_must_hold_one_key_set(root: RootKeys) -> None:
    with pytest.raises(InputError, match="exactly one key set"):
        root_keys_from_kms_key_reply({"keys": []})
    with pytest.raises(InputError, match="GetKmsKey"):
        root_keys_from_kms_key_reply([])
    pem = root.to_json()
    assert load_key_pem(pem["ca_key"], field="x").private_numbers() == root.ca_key.private_numbers()
