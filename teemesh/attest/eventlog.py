"""dstack event logs: parse, compute runtime-event digests, replay the RTMRs.

Runtime events (type 0x08000001, RTMR3) are never trusted for their ``digest`` field: the digest
is recomputed from the event name and payload, as dstack's verifiers do. Newer guests send an
empty digest; a non-empty one that disagrees with the payload makes the log invalid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from teemesh.encoding import check_unicode, load_json, parse_hex
from teemesh.errors import EvidenceError

RUNTIME_EVENT_TYPE = 0x08000001
RTMR_COUNT = 4
DIGEST_LEN = 48
MAX_EVENTS = 4096
MAX_PAYLOAD = 64 * 1024
ZERO_RTMR = bytes(DIGEST_LEN)
BOOT_MR_DONE = "boot-mr-done"
SYSTEM_READY = "system-ready"
_STRIPPED_PAYLOAD = b"ACPI DATA"


@dataclass(frozen=True)
class Event:
    imr: int
    event_type: int
    digest: bytes
    """As supplied; for runtime events this may be empty. Use ``measured_digest()``."""
    event: str
    payload: bytes
    version: int = 1
    preimage: bytes | None = None

    @property
    def is_runtime(self) -> bool:
        return self.event_type == RUNTIME_EVENT_TYPE

    def measured_digest(self) -> bytes:
        """The digest that was extended into the RTMR, checked against the payload."""
        if not self.is_runtime:
            return self.digest
        if self.version == 2:
            preimage = runtime_preimage_v2(self.event, self.payload)
            digest = hashlib.sha384(preimage).digest()
            if self.preimage is not None and self.preimage != preimage:
                raise EvidenceError(
                    "v2 preimage is not the canonical form of its name and payload",
                    field=f"event_log({self.event})",
                )
        else:
            digest = runtime_digest_v1(self.event, self.payload)
        if self.digest and self.digest != digest:
            raise EvidenceError(
                f"digest {self.digest.hex()[:16]}... does not match its payload",
                field=f"event_log({self.event})",
            )
        return digest

    def to_json(self) -> dict[str, Any]:
        """dstack's JSON shape; runtime digests are filled so old SDK replays still work."""
        out: dict[str, Any] = {
            "imr": self.imr,
            "event_type": self.event_type,
            "digest": self.measured_digest().hex(),
            "event": self.event,
            "event_payload": self.payload.hex(),
        }
        if self.version != 1:
            out["version"] = self.version
            out["preimage"] = runtime_preimage_v2(self.event, self.payload).hex()
        return out


def runtime_digest_v1(name: str, payload: bytes) -> bytes:
    """sha384(u32le(type) || ':' || name || ':' || payload), dstack's default rule."""
    return hashlib.sha384(
        RUNTIME_EVENT_TYPE.to_bytes(4, "little") + b":" + name.encode() + b":" + payload
    ).digest()


def runtime_preimage_v2(name: str, payload: bytes) -> bytes:
    """The JCS JSON that a v2 runtime digest hashes (keys sorted, UTF-8 unescaped)."""
    doc = {"name": name, "payload": payload.hex(), "type": RUNTIME_EVENT_TYPE}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def runtime_event(name: str, payload: bytes = b"") -> Event:
    """A v1 runtime event as a guest emits it (digest filled)."""
    return Event(3, RUNTIME_EVENT_TYPE, runtime_digest_v1(name, payload), name, payload)


def extend(register: bytes, digest: bytes) -> bytes:
    return hashlib.sha384(register + digest).digest()


def parse_event_log(
    data: str | bytes | list[Any], *, field: str = "event_log"
) -> tuple[Event, ...]:
    """Parse dstack's JSON event log (a JSON text, or the already-decoded list)."""
    if isinstance(data, str | bytes):
        items = load_json(data, field=field, error=EvidenceError)
    else:
        items = data
        check_unicode(items, field=field, error=EvidenceError)
    if not isinstance(items, list):
        raise EvidenceError(
            f"expected a JSON list of events, got {type(items).__name__}", field=field
        )
    if len(items) > MAX_EVENTS:
        raise EvidenceError(f"too many events: {len(items)} (max {MAX_EVENTS})", field=field)
    return tuple(_parse_event(item, f"{field}[{i}]") for i, item in enumerate(items))


def _parse_event(item: object, where: str) -> Event:
    if not isinstance(item, dict):
        raise EvidenceError(f"expected an event object, got {type(item).__name__}", field=where)
    imr = _uint(item, "imr", where, limit=RTMR_COUNT - 1)
    event_type = _uint(item, "event_type", where, limit=0xFFFFFFFF)
    digest = _hex(item.get("digest", ""), f"{where}.digest")
    payload = _hex(item.get("event_payload", ""), f"{where}.event_payload", MAX_PAYLOAD)
    name = item.get("event", "")
    if not isinstance(name, str):
        raise EvidenceError("expected a string", field=f"{where}.event")
    version = _uint(item, "version", where, limit=2) if "version" in item else 1
    preimage = item.get("preimage")
    pre = None if preimage in (None, "") else _hex(preimage, f"{where}.preimage")
    return checked_event(Event(imr, event_type, digest, name, payload, version or 1, pre), where)


def checked_event(event: Event, where: str) -> Event:
    """Digests are 48 bytes; only runtime events may omit theirs (it is recomputed)."""
    if len(event.digest) != DIGEST_LEN and not (event.is_runtime and not event.digest):
        raise EvidenceError(
            f"expected a {DIGEST_LEN}-byte digest, got {len(event.digest)}", field=f"{where}.digest"
        )
    return event


def _hex(value: object, field: str, max_size: int | None = None) -> bytes:
    return parse_hex(value, field=field, max_size=max_size, error=EvidenceError)


def _uint(item: dict[str, Any], key: str, where: str, *, limit: int) -> int:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvidenceError(f"expected an integer, got {value!r:.40}", field=f"{where}.{key}")
    if not 0 <= value <= limit:
        raise EvidenceError(f"{value} is out of range 0..{limit}", field=f"{where}.{key}")
    return value


@dataclass(frozen=True)
class Replay:
    """RTMR values folded from an event log, and which registers the log fully covers."""

    rtmrs: tuple[bytes, bytes, bytes, bytes]
    covered: tuple[int, ...]
    rtmr3_at_boot_mr_done: bytes | None

    def mismatches(self, quoted: Sequence[bytes]) -> tuple[int, ...]:
        return tuple(i for i in self.covered if self.rtmrs[i] != quoted[i])

    def matches(self, quoted: Sequence[bytes]) -> bool:
        """True when the log covers RTMR3 and every covered register equals the quoted value."""
        return 3 in self.covered and not self.mismatches(quoted)


def replay(events: Iterable[Event]) -> Replay:
    registers = [ZERO_RTMR] * RTMR_COUNT
    seen: list[list[Event]] = [[] for _ in range(RTMR_COUNT)]
    boot_done: bytes | None = None
    for event in events:
        registers[event.imr] = extend(registers[event.imr], event.measured_digest())
        seen[event.imr].append(event)
        if event.is_runtime and event.event == BOOT_MR_DONE and boot_done is None:
            boot_done = registers[3]
    covered = tuple(i for i in range(RTMR_COUNT) if seen[i] and not _stripped(seen[i], i))
    rtmrs = (registers[0], registers[1], registers[2], registers[3])
    return Replay(rtmrs, covered, boot_done)


def _stripped(events: list[Event], imr: int) -> bool:
    """dstack's stripped form keeps only placeholder ACPI events for RTMR0-2: not a full log."""
    return imr < 3 and all(e.payload == _STRIPPED_PAYLOAD for e in events)
