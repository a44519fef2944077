from __future__ import annotations

import json

import pytest

from teemesh.attest.dstack import KeyProvider, compose_hash
from teemesh.attest.evidence import analyze, load_evidence
from teemesh.attest.quote import INTEL_QE_VENDOR_ID, parse_quote
from teemesh.attest.simulated import (
    SIM_QE_VENDOR_ID,
    OsImage,
    PlatformKey,
    SimulatedCvm,
    SimulatedQuoteInvalid,
    is_simulated,
    load_platform_public_key,
    verify_simulated_quote,
)
from teemesh.errors import InputError

COMPOSE = b'{"manifest_version": 2, "name": "demo", "runner": "docker-compose"}\n'


@pytest.fixture(scope="module")
def platform() -> PlatformKey:
    return PlatformKey.generate()


def _cvm(platform: PlatformKey, **kw) -> SimulatedCvm:
    return SimulatedCvm(
        platform, OsImage("dstack-dev-0.5.11"), COMPOSE, KeyProvider("kms", "ab"), **kw
    )


def test_quote_uses_the_real_layout_and_is_marked(platform) -> None:
    cvm = _cvm(platform)
    quote = parse_quote(cvm.quote(b"nonce"))
    assert quote.header.version == 4 and quote.header.tee_type == 0x81
    assert quote.header.qe_vendor_id == SIM_QE_VENDOR_ID != INTEL_QE_VENDOR_ID
    assert is_simulated(quote) and not quote.from_intel_qe
    assert quote.report.report_data == b"nonce".ljust(64, b"\0")
    assert quote.report.mr_config_id[:33] == b"\x01" + compose_hash(COMPOSE)
    assert verify_simulated_quote(quote, platform.public_key) == "UpToDate"


def test_event_log_replays_to_quote_and_carries_identity(platform) -> None:
    cvm = _cvm(platform)
    analysis = analyze(load_evidence(json.dumps(cvm.get_quote_reply(b"x")).encode()))
    assert analysis.replay.covered == (0, 1, 2, 3)
    assert analysis.replay_matches
    ident = analysis.identity
    assert ident.compose_hash == compose_hash(COMPOSE)
    assert ident.app_id == compose_hash(COMPOSE)[:20]
    assert ident.instance_id == cvm.instance_id
    assert ident.key_provider == KeyProvider("kms", "ab")
    assert ident.os_image_hash == OsImage("dstack-dev-0.5.11").os_image_hash
    names = [e.event for e in cvm.events if e.is_runtime]
    assert names == [
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-mr-done",
        "os-image-hash",
        "key-provider",
        "system-ready",
    ]


def test_emitted_events_extend_rtmr3_and_show_in_later_quotes(platform) -> None:
    cvm = _cvm(platform)
    before = parse_quote(cvm.quote(b"")).report.rtmr3
    cvm.emit("my-app-event", b"\x01")
    analysis = analyze(load_evidence(json.dumps(cvm.get_quote_reply(b"")).encode()))
    assert analysis.evidence.quote.report.rtmr3 != before
    assert analysis.replay_matches
    assert analysis.identity.app_events == (("my-app-event", b"\x01"),)


def test_os_image_determines_mrtd_and_rtmr0_2(platform) -> None:
    a = parse_quote(_cvm(platform).quote(b"")).report
    b = parse_quote(SimulatedCvm(platform, OsImage("other"), COMPOSE).quote(b"")).report
    assert a.mr_td != b.mr_td and a.rtmr0 != b.rtmr0 and a.rtmr2 != b.rtmr2


def test_pinned_app_and_instance_ids(platform) -> None:
    cvm = _cvm(platform, app_id=b"\x11" * 20, instance_id=b"\x22" * 20)
    ident = analyze(load_evidence(json.dumps(cvm.get_quote_reply(b"")).encode())).identity
    assert ident.app_id == b"\x11" * 20 and ident.instance_id == b"\x22" * 20


def test_other_platform_key_is_refused(platform) -> None:
    quote = parse_quote(_cvm(platform).quote(b""))
    with pytest.raises(SimulatedQuoteInvalid, match="signed by another platform key"):
        verify_simulated_quote(quote, PlatformKey.generate().public_key)


@pytest.mark.parametrize("offset", [47, 100, 600])
def test_tampering_breaks_the_signature(platform, offset: int) -> None:
    data = bytearray(_cvm(platform).quote(b""))
    data[offset] ^= 1
    with pytest.raises(SimulatedQuoteInvalid, match="signature is invalid"):
        verify_simulated_quote(parse_quote(bytes(data)), platform.public_key)


def test_real_quote_is_not_simulated(platform) -> None:
    from conftest import vector_path

    quote = parse_quote(vector_path("dcap-qvl/tdx_quote").read_bytes())
    with pytest.raises(SimulatedQuoteInvalid, match="not a simulated quote"):
        verify_simulated_quote(quote, platform.public_key)


def test_simulated_tcb_status_and_debug_flag(platform) -> None:
    quote = parse_quote(_cvm(platform, tcb_status="OutOfDate", debug=True).quote(b""))
    assert verify_simulated_quote(quote, platform.public_key) == "OutOfDate"
    assert quote.report.debug
    with pytest.raises(InputError, match="unknown TCB status"):
        _cvm(platform, tcb_status="Fine")


def test_report_data_over_64_bytes_refused(platform) -> None:
    with pytest.raises(InputError, match="at most 64 bytes"):
        _cvm(platform).quote(b"x" * 65)


def test_platform_key_pem_round_trip_and_errors(platform) -> None:
    again = PlatformKey.from_pem(platform.private_pem())
    assert again.public_pem() == platform.public_pem()
    assert load_platform_public_key(platform.public_pem()) == platform.public_key
    with pytest.raises(InputError, match="not a PEM private key"):
        PlatformKey.from_pem(b"junk")
    with pytest.raises(InputError, match="not a PEM public key"):
        load_platform_public_key(b"junk")
