"""dstack's ``VersionedAttestation`` V0: SCALE-encoded quote, event log and runtime events.

Wire form (first byte 0x00):
    0x00 (V0) | u8 quote kind (0 = DstackTdx) | Vec<u8> quote | Vec<TdxEvent> event_log
    | Vec<RuntimeEvent> runtime_events | [u8; 64] report_data | String config
TdxEvent = u32 imr | u32 event_type | Vec<u8> digest | String event | Vec<u8> event_payload
RuntimeEvent = String event | Vec<u8> payload
"""

from __future__ import annotations

from dataclasses import dataclass

from teemesh.attest._reader import Reader
from teemesh.attest.eventlog import MAX_EVENTS, RUNTIME_EVENT_TYPE, Event, checked_event
from teemesh.errors import EvidenceError

_QUOTE_KINDS = {
    0: "DstackTdx",
    1: "DstackGcpTdx",
    2: "DstackNitroEnclave",
    3: "DstackAmdSevSnp",
    4: "DstackAwsNitroTpm",
}


@dataclass(frozen=True)
class AttestationV0:
    quote: bytes
    event_log: tuple[Event, ...]
    runtime_events: tuple[tuple[str, bytes], ...]
    report_data: bytes
    config: str


def compact(r: Reader, field: str) -> int:
    """A SCALE compact integer: the mode sits in the low two bits of the first byte."""
    first = r.u8(field)
    mode = first & 3
    if mode == 0:
        return first >> 2
    if mode == 1:
        return (first | r.u8(field) << 8) >> 2
    if mode == 2:
        return int.from_bytes(bytes([first]) + r.take(3, field), "little") >> 2
    return int.from_bytes(r.take((first >> 2) + 4, field), "little")


def encode_compact(value: int) -> bytes:
    if value < 1 << 6:
        return bytes([value << 2])
    if value < 1 << 14:
        return ((value << 2) | 1).to_bytes(2, "little")
    if value < 1 << 30:
        return ((value << 2) | 2).to_bytes(4, "little")
    raw = value.to_bytes((value.bit_length() + 7) // 8, "little")
    return bytes([((len(raw) - 4) << 2) | 3]) + raw


def _bytes(r: Reader, field: str) -> bytes:
    return r.take(compact(r, f"{field}.len"), field)


def _string(r: Reader, field: str) -> str:
    start = r.offset
    raw = _bytes(r, field)
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise r.fail("not valid UTF-8", field, start) from exc


def _count(r: Reader, field: str) -> int:
    start = r.offset
    n = compact(r, f"{field}.len")
    if n > MAX_EVENTS:
        raise r.fail(f"too many entries: {n} (max {MAX_EVENTS})", field, start)
    return n


def decode_attestation_v0(data: bytes) -> AttestationV0:
    r = Reader(data, what="attestation")
    version = r.u8("version")
    if version != 0:
        raise r.fail(f"expected VersionedAttestation V0 (0x00), got 0x{version:02x}", "version", 0)
    kind = r.u8("quote_kind")
    if kind != 0:
        name = _QUOTE_KINDS.get(kind, "unknown")
        raise r.fail(
            f"quote kind {kind} ({name}) is not supported, only DstackTdx (0)", "quote_kind", 1
        )
    quote = _bytes(r, "quote")
    events = []
    for i in range(_count(r, "event_log")):
        where = f"event_log[{i}]"
        imr = r.u32(f"{where}.imr")
        if imr > 3:
            raise r.fail(f"imr {imr} is out of range 0..3", f"{where}.imr", r.offset - 4)
        event_type = r.u32(f"{where}.event_type")
        digest = _bytes(r, f"{where}.digest")
        name = _string(r, f"{where}.event")
        payload = _bytes(r, f"{where}.event_payload")
        events.append(checked_event(Event(imr, event_type, digest, name, payload), where))
    runtime = tuple(
        (_string(r, f"runtime_events[{i}].event"), _bytes(r, f"runtime_events[{i}].payload"))
        for i in range(_count(r, "runtime_events"))
    )
    report_data = r.take(64, "report_data")
    config = _string(r, "config")
    if r.remaining:
        raise r.fail(f"{r.remaining} unexpected bytes after the attestation", "end")
    return AttestationV0(quote, tuple(events), runtime, report_data, config)


def runtime_log(attestation: AttestationV0) -> tuple[Event, ...]:
    """The event log to replay: RTMR3 rebuilt from ``runtime_events`` when the log lacks it."""
    log = attestation.event_log
    listed = tuple((e.event, e.payload) for e in log if e.is_runtime)
    if listed and attestation.runtime_events and listed != attestation.runtime_events:
        raise EvidenceError(
            "runtime_events disagree with the runtime events in event_log", field="attestation"
        )
    if listed or not attestation.runtime_events:
        return log
    rebuilt = tuple(Event(3, RUNTIME_EVENT_TYPE, b"", n, p) for n, p in attestation.runtime_events)
    return tuple(e for e in log if e.imr < 3) + rebuilt


def _enc_bytes(data: bytes) -> bytes:
    return encode_compact(len(data)) + data


def encode_attestation_v0(att: AttestationV0) -> bytes:
    out = bytearray(b"\x00\x00")
    out += _enc_bytes(att.quote)
    out += encode_compact(len(att.event_log))
    for e in att.event_log:
        out += e.imr.to_bytes(4, "little") + e.event_type.to_bytes(4, "little")
        out += _enc_bytes(e.digest) + _enc_bytes(e.event.encode()) + _enc_bytes(e.payload)
    out += encode_compact(len(att.runtime_events))
    for name, payload in att.runtime_events:
        out += _enc_bytes(name.encode()) + _enc_bytes(payload)
    if len(att.report_data) != 64:
        raise ValueError("report_data must be 64 bytes")
    out += att.report_data + _enc_bytes(att.config.encode())
    return bytes(out)


def stripped(att: AttestationV0) -> AttestationV0:
    """dstack's ``into_stripped``: RTMR3 events with empty digests, plus the ACPI placeholders."""
    acpi = tuple(e for e in att.event_log if e.imr == 0 and e.payload == b"ACPI DATA")
    runtime = tuple(
        Event(e.imr, e.event_type, b"", e.event, e.payload) for e in att.event_log if e.is_runtime
    )
    return AttestationV0(att.quote, acpi + runtime, att.runtime_events, att.report_data, att.config)
