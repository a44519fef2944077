from __future__ import annotations

import json

import pytest
from conftest import vector_path

from teemesh.attest.eventlog import (
    RUNTIME_EVENT_TYPE,
    Event,
    parse_event_log,
    replay,
    runtime_digest_v1,
    runtime_preimage_v2,
)
from teemesh.attest.quote import parse_quote
from teemesh.errors import EvidenceError

SIM_LOG = "dstack/simulator/attestation.event_log.json"


def _sim_log() -> list[dict]:
    return json.loads(vector_path(SIM_LOG).read_text())


@pytest.mark.parametrize("key", ["simulator/attestation.bin", "verifier/quote-report.json"])
def test_runtime_digests_match_dstack(expected, key: str) -> None:
    for item in expected[key]["runtime_events"]:
        digest = runtime_digest_v1(item["event"], bytes.fromhex(item["payload_hex"]))
        assert digest.hex() == item["digest_v1"], item["event"]


def test_simulator_log_replays_to_quote(expected) -> None:
    events = parse_event_log(vector_path(SIM_LOG).read_text())
    quote = parse_quote(vector_path("dstack/simulator/attestation.quote.bin").read_bytes())
    result = replay(events)
    derived = expected["simulator/attestation.bin"]["derived"]
    assert result.covered == (0, 1, 2, 3)
    assert result.rtmrs[3].hex() == derived["rtmr3_replayed_full"]
    assert result.rtmr3_at_boot_mr_done.hex() == derived["rtmr3_replayed_to_boot_mr_done"]
    assert result.matches(quote.report.rtmrs)


def test_quote_report_log_replays_all_rtmrs(expected) -> None:
    doc = json.loads(vector_path("dstack/verifier/quote-report.json").read_text())
    quote = parse_quote(bytes.fromhex(doc["quote"]))
    result = replay(parse_event_log(doc["event_log"]))
    assert result.mismatches(quote.report.rtmrs) == ()
    want = expected["verifier/quote-report.json"]["derived"]["rtmr3_replayed_to_boot_mr_done"]
    assert result.rtmr3_at_boot_mr_done.hex() == want


def test_empty_runtime_digests_are_computed_from_payload() -> None:
    items = _sim_log()
    full = replay(parse_event_log(items))
    for item in items:
        if item["event_type"] == RUNTIME_EVENT_TYPE:
            item["digest"] = ""
    assert replay(parse_event_log(items)).rtmrs == full.rtmrs


def test_runtime_digest_that_disagrees_with_payload_is_refused() -> None:
    items = _sim_log()
    runtime = next(i for i in items if i["event"] == "compose-hash")
    runtime["digest"] = "00" * 48
    with pytest.raises(
        EvidenceError, match=r"event_log\(compose-hash\).*does not match its payload"
    ):
        replay(parse_event_log(items))


def test_changed_payload_changes_replay() -> None:
    items = _sim_log()
    quote = parse_quote(vector_path("dstack/simulator/attestation.quote.bin").read_bytes())
    target = next(i for i in items if i["event"] == "compose-hash")
    target["event_payload"] = "11" * 32
    target["digest"] = ""
    result = replay(parse_event_log(items))
    assert result.mismatches(quote.report.rtmrs) == (3,)
    assert not result.matches(quote.report.rtmrs)


def test_boot_event_digest_changes_rtmr0() -> None:
    items = _sim_log()
    items[0]["digest"] = "22" * 48
    quote = parse_quote(vector_path("dstack/simulator/attestation.quote.bin").read_bytes())
    assert replay(parse_event_log(items)).mismatches(quote.report.rtmrs) == (0,)


def test_v2_runtime_events_use_canonical_preimage() -> None:
    preimage = runtime_preimage_v2("app-id", b"\x01\x02")
    assert preimage == b'{"name":"app-id","payload":"0102","type":134217729}'
    good = {
        "imr": 3,
        "event_type": RUNTIME_EVENT_TYPE,
        "digest": "",
        "event": "app-id",
        "event_payload": "0102",
        "version": 2,
        "preimage": preimage.hex(),
    }
    (event,) = parse_event_log([good])
    import hashlib

    assert event.measured_digest() == hashlib.sha384(preimage).digest()
    bad = dict(good, preimage=b'{"name":"other"}'.hex())
    with pytest.raises(EvidenceError, match="preimage is not the canonical form"):
        parse_event_log([bad])[0].measured_digest()


def test_stripped_log_only_covers_rtmr3() -> None:
    acpi = [Event(0, 10, bytes(48), "acpi-loader", b"ACPI DATA")]
    runtime = [Event(3, RUNTIME_EVENT_TYPE, b"", "x", b"")]
    assert replay(acpi + runtime).covered == (3,)


def test_log_without_runtime_events_does_not_match() -> None:
    result = replay([Event(0, 1, bytes(48), "", b"")])
    assert result.covered == (0,)
    assert not result.matches([result.rtmrs[0], bytes(48), bytes(48), bytes(48)])


BAD = [
    ({"imr": 4, "event_type": 1, "digest": "00" * 48}, r"event_log\[0\]\.imr: 4 is out of range"),
    (
        {"imr": "0", "event_type": 1, "digest": "00" * 48},
        r"event_log\[0\]\.imr: expected an integer",
    ),
    ({"imr": True, "event_type": 1, "digest": "00" * 48}, r"\.imr: expected an integer"),
    ({"imr": 0, "event_type": -1, "digest": "00" * 48}, r"event_type: -1 is out of range"),
    ({"imr": 0, "event_type": 1, "digest": "zz"}, r"event_log\[0\]\.digest: not hex"),
    ({"imr": 0, "event_type": 1, "digest": "00" * 47}, r"expected a 48-byte digest, got 47"),
    ({"imr": 0, "event_type": 1, "digest": ""}, r"expected a 48-byte digest, got 0"),
    ({"imr": 0, "event_type": 1, "digest": "00" * 48, "event": 5}, r"\.event: expected a string"),
    ({"imr": 0, "event_type": 1, "digest": "00" * 48, "event_payload": "abc"}, r"odd number"),
]


@pytest.mark.parametrize(("item", "message"), BAD)
def test_malformed_events_name_the_field(item: dict, message: str) -> None:
    with pytest.raises(EvidenceError, match=message):
        parse_event_log([item])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", "expected a JSON list"),
        ("[1]", r"\[0\]: expected an event object"),
        ("[", "invalid JSON"),
        (b"\xff", "not UTF-8"),
    ],
)
def test_malformed_logs(text: str | bytes, message: str) -> None:
    with pytest.raises(EvidenceError, match=message):
        parse_event_log(text)


def test_too_many_events_bounded() -> None:
    item = {"imr": 0, "event_type": 1, "digest": "00" * 48}
    with pytest.raises(EvidenceError, match="too many events"):
        parse_event_log([item] * 5000)
