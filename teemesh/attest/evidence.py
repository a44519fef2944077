"""Evidence in any form a dstack user has, detected from its bytes.

Forms: a raw TDX quote (binary or hex); a dstack ``GetQuote`` JSON reply (``quote``,
``event_log`` as a JSON string, ``vm_config``); a ``VersionedAttestation`` V0 (binary, hex, or
wrapped as ``{"attestation": "<hex>"}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from teemesh.attest.dstack import DstackIdentity, Measurements, identity_from_events, measurements
from teemesh.attest.eventlog import Event, Replay, parse_event_log, replay
from teemesh.attest.quote import INTEL_QE_VENDOR_ID, Quote, parse_quote
from teemesh.attest.scale import decode_attestation_v0, runtime_log
from teemesh.encoding import is_hex_text, load_json, parse_hex
from teemesh.errors import EvidenceError, InputError

MAX_EVIDENCE_LEN = 1024 * 1024
_MSGPACK_MAP_PREFIXES = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


@dataclass(frozen=True)
class Evidence:
    form: str
    quote: Quote
    event_log: tuple[Event, ...] | None
    vm_config: dict[str, Any] | None


@dataclass(frozen=True)
class Analysis:
    """What the evidence claims, before any signature is checked."""

    evidence: Evidence
    replay: Replay | None
    identity: DstackIdentity
    measurements: Measurements

    def to_json(self) -> dict[str, Any]:
        """The shape ``teemesh attest inspect --json`` prints: lowercase hex, no 0x."""
        report = self.evidence.quote.report
        quote = {
            name: getattr(report, name).hex()
            for name in ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data")
        }
        quote["mrtd"] = quote.pop("mr_td")
        quote |= {
            "mr_config_id": report.mr_config_id.hex(),
            "td_attributes": report.td_attributes.hex(),
            "tee_tcb_svn": report.tee_tcb_svn.hex(),
            "xfam": report.xfam.hex(),
            "version": self.evidence.quote.header.version,
            "debug": report.debug,
            "simulated": self.evidence.quote.header.qe_vendor_id != INTEL_QE_VENDOR_ID,
        }
        replayed: dict[str, Any] | None = None
        if self.replay is not None:
            replayed = {f"rtmr{i}": self.replay.rtmrs[i].hex() for i in self.replay.covered}
            replayed["matches_quote"] = self.replay_matches
        ident, mrs = self.identity, self.measurements
        measured_os = ident.os_image_hash
        os_image = measured_os or vm_config_os_image_hash(self.evidence)
        dstack = {
            "app_id": _hex_or_none(ident.app_id),
            "compose_hash": _hex_or_none(ident.compose_hash),
            "instance_id": _hex_or_none(ident.instance_id),
            "key_provider": (
                {"name": ident.key_provider.name, "id": ident.key_provider.id}
                if ident.key_provider
                else None
            ),
            "os_image_hash": _hex_or_none(os_image),
            "os_image_hash_measured": measured_os is not None,
            "mr_system": mrs.mr_system.hex(),
            "mr_aggregated": mrs.mr_aggregated.hex(),
            "mr_system_boottime": mrs.mr_system_boottime.hex(),
            "mr_aggregated_boottime": _hex_or_none(mrs.mr_aggregated_boottime),
            "app_events": [{"event": n, "payload": p.hex()} for n, p in ident.app_events],
        }
        return {"form": self.evidence.form, "quote": quote, "replay": replayed, "dstack": dstack}

    @property
    def replay_matches(self) -> bool | None:
        return (
            None if self.replay is None else self.replay.matches(self.evidence.quote.report.rtmrs)
        )


def load_evidence(data: bytes) -> Evidence:
    if len(data) > MAX_EVIDENCE_LEN:
        raise EvidenceError(f"input too large: {len(data)} bytes (max {MAX_EVIDENCE_LEN})")
    if not data.strip():
        raise EvidenceError("input is empty")
    head = data.lstrip()[:1]
    if head == b"{":
        return _from_json(load_json(data, field="evidence", error=EvidenceError))
    if is_hex_text(data):
        text = data.strip().decode()
        return _from_binary(_hex(text, "evidence"), form_suffix="-hex")
    return _from_binary(data, form_suffix="")


def _from_binary(data: bytes, *, form_suffix: str) -> Evidence:
    if data[:1] in (b"\x04", b"\x05") and data[1:2] == b"\x00":
        return Evidence("quote" + form_suffix, parse_quote(data), None, None)
    if data[:1] == b"\x00":
        return _from_attestation(data, "attestation-v0" + form_suffix)
    if data and data[0] in _MSGPACK_MAP_PREFIXES:
        raise EvidenceError("VersionedAttestation V1 (msgpack) is not supported yet; send V0")
    raise EvidenceError(
        f"unrecognised evidence (first byte 0x{data[0]:02x}): expected a TDX quote, "
        "a dstack GetQuote JSON reply, or a VersionedAttestation"
    )


def _from_attestation(data: bytes, form: str) -> Evidence:
    att = decode_attestation_v0(data)
    quote = parse_quote(att.quote)
    if att.report_data != quote.report.report_data:
        raise EvidenceError(
            "report_data differs from the quote's report_data", field="attestation.report_data"
        )
    return Evidence(form, quote, runtime_log(att), _vm_config(att.config, "attestation.config"))


def _from_json(doc: object) -> Evidence:
    if not isinstance(doc, dict):
        raise EvidenceError("expected a JSON object")
    if "quote" in doc:
        return _from_get_quote(doc)
    if "attestation" in doc:
        blob = _hex(doc["attestation"], "attestation", max_size=MAX_EVIDENCE_LEN)
        return _from_attestation(blob, "attestation-v0-json")
    raise EvidenceError('expected a GetQuote reply ("quote", "event_log") or {"attestation": hex}')


def _from_get_quote(doc: dict[str, Any]) -> Evidence:
    quote = parse_quote(_hex(doc["quote"], "quote"))
    log = doc.get("event_log")
    events = None if log in (None, "") else parse_event_log(log, field="event_log")
    if doc.get("report_data") not in ("", None):
        claimed = _hex(doc["report_data"], "report_data", max_size=64).ljust(64, b"\0")
        if claimed != quote.report.report_data:
            raise EvidenceError("differs from the quote's report_data", field="report_data")
    vm_config = _vm_config(doc.get("vm_config"), "vm_config")
    return Evidence("get-quote-json", quote, events, vm_config)


def _hex(value: object, field: str, *, max_size: int | None = None) -> bytes:
    return parse_hex(value, field=field, max_size=max_size, error=EvidenceError)


def _vm_config(value: object, field: str) -> dict[str, Any] | None:
    """vm_config as a JSON string or object; a sys-config carries it nested as a string."""
    if value in (None, ""):
        return None
    doc = load_json(value, field=field, error=EvidenceError) if isinstance(value, str) else value
    if not isinstance(doc, dict):
        raise EvidenceError("expected a JSON object", field=field)
    if isinstance(doc.get("vm_config"), str):
        return _vm_config(doc["vm_config"], f"{field}.vm_config")
    return doc


def analyze(evidence: Evidence) -> Analysis:
    report = evidence.quote.report
    log = evidence.event_log
    rep = replay(log) if log is not None else None
    identity = identity_from_events(log or ())
    return Analysis(
        evidence,
        rep,
        identity,
        measurements(report, identity, rep.rtmr3_at_boot_mr_done if rep else None),
    )


def vm_config_os_image_hash(evidence: Evidence) -> bytes | None:
    """The host-declared (unmeasured) OS image hash in vm_config, if any."""
    value = (evidence.vm_config or {}).get("os_image_hash")
    if not isinstance(value, str):
        return None
    try:
        return parse_hex(value, field="vm_config.os_image_hash", size=32)
    except InputError:
        return None


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()
