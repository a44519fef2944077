from __future__ import annotations

import pytest
from conftest import vector_path

from teemesh.attest._reader import Reader
from teemesh.attest.scale import (
    compact,
    decode_attestation_v0,
    encode_attestation_v0,
    encode_compact,
    runtime_log,
    stripped,
)
from teemesh.errors import EvidenceError


def _attestation() -> bytes:
    return vector_path("dstack/simulator/attestation.bin").read_bytes()


@pytest.mark.parametrize("value", [0, 1, 63, 64, 16383, 16384, 2**30 - 1, 2**30, 2**64])
def test_compact_round_trip(value: int) -> None:
    encoded = encode_compact(value)
    reader = Reader(encoded, what="t")
    assert compact(reader, "n") == value
    assert reader.remaining == 0


def test_compact_known_encodings() -> None:
    assert encode_compact(1) == b"\x04"
    assert encode_compact(64) == b"\x01\x01"
    assert encode_compact(5010) == (5010 << 2 | 1).to_bytes(2, "little")


def test_simulator_attestation_decodes(expected) -> None:
    att = decode_attestation_v0(_attestation())
    want = expected["simulator/attestation.bin"]
    assert len(att.quote) == want["quote"]["len"]
    assert len(att.event_log) == want["tdx_event_log_count"]
    assert [n for n, _ in att.runtime_events] == [e["event"] for e in want["runtime_events"]]
    assert [p.hex() for _, p in att.runtime_events] == [
        e["payload_hex"] for e in want["runtime_events"]
    ]
    assert att.report_data == bytes(64)
    assert '"vm_config"' in att.config


def test_encode_is_byte_identical() -> None:
    data = _attestation()
    assert encode_attestation_v0(decode_attestation_v0(data)) == data


def test_stripped_form_keeps_rtmr3_and_acpi_placeholders() -> None:
    att = stripped(decode_attestation_v0(_attestation()))
    assert {e.imr for e in att.event_log} == {0, 3}
    assert all(not e.digest for e in att.event_log if e.imr == 3)
    assert sum(1 for e in att.event_log if e.imr == 0) == 3
    again = decode_attestation_v0(encode_attestation_v0(att))
    assert again == att


def test_runtime_log_rebuilt_from_runtime_events() -> None:
    att = decode_attestation_v0(_attestation())
    without = type(att)(
        att.quote,
        tuple(e for e in att.event_log if e.imr < 3),
        att.runtime_events,
        att.report_data,
        att.config,
    )
    rebuilt = runtime_log(without)
    assert [(e.event, e.payload) for e in rebuilt if e.imr == 3] == list(att.runtime_events)


def test_runtime_events_that_disagree_with_log_are_refused() -> None:
    att = decode_attestation_v0(_attestation())
    forged = type(att)(
        att.quote, att.event_log, (("app-id", b"\x00" * 20),), att.report_data, att.config
    )
    with pytest.raises(EvidenceError, match="runtime_events disagree"):
        runtime_log(forged)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"\x01" + d[1:], "expected VersionedAttestation V0"),
        (lambda d: d[:1] + b"\x03" + d[2:], r"quote kind 3 \(DstackAmdSevSnp\) is not supported"),
        (lambda d: d[:100], r"attestation\.quote at offset \d+: truncated"),
        (lambda d: d + b"\x00", "1 unexpected bytes after the attestation"),
        (lambda d: d[:-10], r"attestation\.config"),
    ],
)
def test_malformed_attestations(mutate, message: str) -> None:
    with pytest.raises(EvidenceError, match=message):
        decode_attestation_v0(mutate(_attestation()))


def test_huge_declared_vector_length_is_bounded() -> None:
    data = b"\x00\x00" + encode_compact(2**40) + b"\x00" * 10
    with pytest.raises(EvidenceError, match="truncated"):
        decode_attestation_v0(data)
