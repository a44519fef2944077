from __future__ import annotations

import datetime as dt
import json

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from teemesh.attest.dstack import KeyProvider
from teemesh.attest.policy import Policy, Reason
from teemesh.attest.simulated import OsImage, PlatformKey, SimulatedCvm
from teemesh.errors import EvidenceError, InputError
from teemesh.identity.certs import CertSpec, cert_pem, issue, load_cert_pem, new_p256_key
from teemesh.identity.ratls import (
    OID_APP_ID,
    OID_ATTESTATION,
    OID_EVENT_LOG,
    OID_TDX_QUOTE,
    cert_evidence,
    der_octet_string,
    extension,
    extension_bytes,
    ratls_report_data,
    read_der_octet_string,
    verify_ratls_cert,
)

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(days=1)


@pytest.fixture(scope="module")
def platform() -> PlatformKey:
    return PlatformKey.generate()


@pytest.fixture(scope="module")
def cvm(platform) -> SimulatedCvm:
    return SimulatedCvm(platform, OsImage("img"), b"{}", KeyProvider("none", ""))


def _policy(platform: PlatformKey) -> Policy:
    return Policy(tee="simulated", platform_key=platform.public_pem().decode())


def test_ca_and_leaf_chain() -> None:
    ca_key = new_p256_key()
    ca = issue(
        CertSpec("Test CA", NOW, LATER, organization="Dstack", ca_path_len=0),
        ca_key.public_key(),
        ca_key,
    )
    leaf_key = new_p256_key()
    leaf = issue(
        CertSpec(
            "svc",
            NOW,
            LATER,
            alt_names=("svc.local", "127.0.0.1"),
            uris=("spiffe://c/g/p",),
            server_auth=True,
            client_auth=True,
        ),
        leaf_key.public_key(),
        ca_key,
        ca,
    )
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["svc.local"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://c/g/p"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert load_cert_pem(cert_pem(leaf), field="x") == leaf


def test_bad_specs() -> None:
    key = new_p256_key()
    with pytest.raises(InputError, match="not_after"):
        issue(CertSpec("x", LATER, NOW), key.public_key(), key)
    with pytest.raises(InputError, match="common name"):
        issue(CertSpec("", NOW, LATER), key.public_key(), key)
    with pytest.raises(InputError, match="not a PEM certificate"):
        load_cert_pem("junk", field="cert")


@pytest.mark.parametrize("size", [0, 5, 127, 128, 300, 70000])
def test_der_octet_string_round_trip(size: int) -> None:
    raw = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert read_der_octet_string(der_octet_string(raw), field="x") == raw


@pytest.mark.parametrize("der", [b"", b"\x05\x00", b"\x04\x05ab", b"\x04\x81", b"\x04\x80"])
def test_bad_der(der: bytes) -> None:
    with pytest.raises(EvidenceError):
        read_der_octet_string(der, field="x")


def _ratls_cert(cvm: SimulatedCvm, *, bind_to=None, legacy: bool = False) -> x509.Certificate:
    key = new_p256_key()
    report_data = ratls_report_data((bind_to or key).public_key())
    if legacy:
        reply = cvm.get_quote_reply(report_data)
        exts = [
            extension(OID_TDX_QUOTE, bytes.fromhex(reply["quote"])),
            extension(OID_EVENT_LOG, reply["event_log"].encode()),
        ]
    else:
        exts = [extension(OID_ATTESTATION, cvm.attestation(report_data))]
    exts.append(extension(OID_APP_ID, cvm.app_id))
    return issue(
        CertSpec("ra", NOW, LATER, server_auth=True, extensions=exts), key.public_key(), key
    )


@pytest.mark.parametrize("legacy", [False, True])
def test_ratls_cert_verifies(platform, cvm, legacy: bool) -> None:
    cert = _ratls_cert(cvm, legacy=legacy)
    verdict = verify_ratls_cert(cert, _policy(platform), now=0)
    assert verdict.ok, verdict.reasons
    assert verdict.analysis.identity.app_id == cvm.app_id
    assert extension_bytes(cert, OID_APP_ID) == cvm.app_id


def test_evidence_bound_to_another_key_is_refused(platform, cvm) -> None:
    cert = _ratls_cert(cvm, bind_to=new_p256_key())
    verdict = verify_ratls_cert(cert, _policy(platform), now=0)
    assert [r.code for r in verdict.reasons] == [Reason.REPORT_DATA_MISMATCH]


def test_certificate_without_attestation(cvm) -> None:
    key = new_p256_key()
    cert = issue(CertSpec("plain", NOW, LATER), key.public_key(), key)
    with pytest.raises(EvidenceError, match="no attestation"):
        cert_evidence(cert)


def test_attestation_bytes_load_as_v0(cvm) -> None:
    from teemesh.attest.evidence import analyze, load_evidence

    analysis = analyze(load_evidence(cvm.attestation(b"abc")))
    assert analysis.evidence.form == "attestation-v0"
    assert analysis.replay_matches
    assert json.loads(json.dumps(analysis.to_json()))["dstack"]["app_id"] == cvm.app_id.hex()
