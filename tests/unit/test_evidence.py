from __future__ import annotations

import json

import pytest
from conftest import vector_path

from teemesh.attest.evidence import MAX_EVIDENCE_LEN, analyze, load_evidence
from teemesh.attest.scale import decode_attestation_v0, encode_attestation_v0, stripped
from teemesh.errors import EvidenceError

ATT = "dstack/simulator/attestation.bin"
QUOTE = "dstack/simulator/attestation.quote.bin"
GETQUOTE = "dstack/verifier/quote-report.json"


def _b(name: str) -> bytes:
    return vector_path(name).read_bytes()


@pytest.mark.parametrize(
    ("make", "form"),
    [
        (lambda: _b(QUOTE), "quote"),
        (lambda: _b(QUOTE).hex().encode(), "quote-hex"),
        (lambda: b"0x" + _b(QUOTE).hex().upper().encode() + b"\n", "quote-hex"),
        (lambda: _b(ATT), "attestation-v0"),
        (lambda: b"  " + _b(ATT).hex().encode() + b"\r\n", "attestation-v0-hex"),
        (lambda: json.dumps({"attestation": _b(ATT).hex()}).encode(), "attestation-v0-json"),
        (lambda: _b(GETQUOTE), "get-quote-json"),
    ],
)
def test_forms_are_detected(make, form: str) -> None:
    evidence = load_evidence(make())
    assert evidence.form == form
    rtmr3 = "0f787c38" if form == "get-quote-json" else "f28a1490"
    assert evidence.quote.report.rtmr3.hex().startswith(rtmr3)


def test_stripped_attestation_as_a_verifier_receives_it() -> None:
    att = stripped(decode_attestation_v0(_b(ATT)))
    doc = json.dumps({"attestation": encode_attestation_v0(att).hex()}).encode()
    analysis = analyze(load_evidence(doc))
    assert analysis.replay.covered == (3,)
    assert analysis.replay_matches is True
    assert analysis.identity.compose_hash.hex().startswith("c143116f")


def test_get_quote_with_event_log_as_list_and_vm_config_object() -> None:
    doc = json.loads(_b(GETQUOTE))
    doc["event_log"] = json.loads(doc["event_log"])
    doc["vm_config"] = json.loads(doc["vm_config"])
    evidence = load_evidence(json.dumps(doc).encode())
    assert evidence.vm_config["os_image_hash"].startswith("14ad42d0")
    assert analyze(evidence).replay_matches


def test_raw_quote_has_no_replay() -> None:
    analysis = analyze(load_evidence(_b(QUOTE)))
    assert analysis.replay is None and analysis.replay_matches is None


def _getquote(**changes) -> bytes:
    doc = json.loads(_b(GETQUOTE))
    doc.update(changes)
    return json.dumps(doc).encode()


BAD = [
    (b"", "input is empty"),
    (b"   \n", "input is empty"),
    (b"\x07\x00garbage", "unrecognised evidence"),
    (b"zz-not-hex", "unrecognised evidence"),
    (b"abc", "unrecognised evidence"),
    (b"[1, 2]", "unrecognised evidence"),
    (b"{", "invalid JSON"),
    (b'{"foo": 1}', "expected a GetQuote reply"),
    (b'{"attestation": "0xzz"}', "attestation: not hex"),
    (b'{"attestation": 5}', "attestation: expected a hex string"),
    (b'{"quote": "abc"}', "quote: hex has an odd number"),
    (b"\x85\xa1a", "V1 \\(msgpack\\) is not supported"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_bad_input_names_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(EvidenceError, match=message):
        load_evidence(data)


def test_bad_get_quote_fields() -> None:
    with pytest.raises(EvidenceError, match="report_data: differs"):
        load_evidence(_getquote(report_data="ff" * 64))
    with pytest.raises(EvidenceError, match=r"event_log: invalid JSON"):
        load_evidence(_getquote(event_log="[{"))
    with pytest.raises(EvidenceError, match="vm_config: expected a JSON object"):
        load_evidence(_getquote(vm_config="[1]"))
    with pytest.raises(EvidenceError, match=r"event_log\[0\]\.imr"):
        load_evidence(_getquote(event_log=[{"imr": 9}]))


def test_attestation_report_data_must_match_quote() -> None:
    att = decode_attestation_v0(_b(ATT))
    forged = type(att)(att.quote, att.event_log, att.runtime_events, b"\x01" * 64, att.config)
    with pytest.raises(EvidenceError, match="report_data differs"):
        load_evidence(encode_attestation_v0(forged))


def test_oversized_input_is_bounded() -> None:
    with pytest.raises(EvidenceError, match="input too large"):
        load_evidence(b"0" * (MAX_EVIDENCE_LEN + 2))
