from __future__ import annotations

import json

import pytest
from conftest import vector_path

from teemesh.attest.dstack import KeyProvider, compose_hash, default_app_id
from teemesh.attest.evidence import analyze, load_evidence
from teemesh.errors import EvidenceError

CASES = {
    "simulator/attestation.bin": "dstack/simulator/attestation.bin",
    "verifier/quote-report.json": "dstack/verifier/quote-report.json",
}


@pytest.mark.parametrize("key", CASES)
def test_identity_and_measurements_match_expected(expected, key: str) -> None:
    analysis = analyze(load_evidence(vector_path(CASES[key]).read_bytes()))
    want = expected[key]
    events = {e["event"]: e["payload_hex"] for e in want["runtime_events"]}
    ident = analysis.identity
    assert ident.app_id.hex() == events["app-id"]
    assert ident.compose_hash.hex() == events["compose-hash"]
    assert ident.instance_id.hex() == events["instance-id"]
    assert ident.key_provider_payload.decode() == want["derived"]["key_provider_info_utf8"]
    kp = json.loads(want["derived"]["key_provider_info_utf8"])
    assert ident.key_provider == KeyProvider(kp["name"], kp["id"])
    if "os-image-hash" in events:
        assert ident.os_image_hash.hex() == events["os-image-hash"]
    else:
        assert ident.os_image_hash is None
    mrs, derived = analysis.measurements, want["derived"]
    assert mrs.mr_system.hex() == derived["mr_system"]
    assert mrs.mr_aggregated.hex() == derived["mr_aggregated"]
    assert mrs.mr_system_boottime.hex() == derived["mr_system_boottime_variant"]
    assert mrs.mr_aggregated_boottime.hex() == derived["mr_aggregated_boottime"]


def test_app_events_after_system_ready_are_not_identity(expected) -> None:
    analysis = analyze(load_evidence(vector_path(CASES["verifier/quote-report.json"]).read_bytes()))
    assert [name for name, _ in analysis.identity.app_events] == ["LIUM_MINER_HOTKEY"]


def test_non_kms_app_id_is_compose_hash_prefix() -> None:
    analysis = analyze(load_evidence(vector_path(CASES["verifier/quote-report.json"]).read_bytes()))
    assert analysis.identity.app_id == default_app_id(analysis.identity.compose_hash)


def test_compose_hash_is_sha256_of_exact_bytes(expected) -> None:
    data = vector_path("dstack/simulator/app-compose.json").read_bytes()
    want = expected["simulator/app-compose.json"]["derived"]["sha256_raw_file_bytes"]
    assert compose_hash(data).hex() == want
    assert default_app_id(compose_hash(data)).hex() == want[:40]
    assert compose_hash(data.rstrip(b"\n")).hex() != want


def test_key_provider_payload_round_trip_and_errors() -> None:
    kp = KeyProvider("kms", "3059")
    assert kp.payload() == b'{"name":"kms","id":"3059"}'
    assert KeyProvider.from_payload(kp.payload()) == kp
    with pytest.raises(EvidenceError, match=r"key-provider.*invalid JSON"):
        KeyProvider.from_payload(b"{")
    with pytest.raises(EvidenceError, match="not"):
        KeyProvider.from_payload(b'{"id": 3}')
