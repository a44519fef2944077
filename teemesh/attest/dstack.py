"""dstack's identity rules: app id, compose hash, instance id, key provider, mr_system/aggregated.

The identity is read from RTMR3's runtime events (first occurrence of each name before
``system-ready``; later events are application events). Callers must only trust it after the
event log's replay has been checked against the quote.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from teemesh.attest.eventlog import SYSTEM_READY, Event
from teemesh.attest.quote import TdReport
from teemesh.encoding import load_json
from teemesh.errors import EvidenceError

APP_ID_LEN = 20


@dataclass(frozen=True)
class KeyProvider:
    name: str
    id: str
    """As measured: hex for kms (the KMS root CA's SubjectPublicKeyInfo) and local-sgx."""

    def payload(self) -> bytes:
        """The ``key-provider`` event payload, as dstack-util serialises it."""
        return json.dumps({"name": self.name, "id": self.id}, separators=(",", ":")).encode()

    @classmethod
    def from_payload(cls, payload: bytes) -> KeyProvider:
        doc = load_json(payload, field="event_log(key-provider)", error=EvidenceError)
        if not (
            isinstance(doc, dict)
            and isinstance(doc.get("name"), str)
            and isinstance(doc.get("id", ""), str)
        ):
            raise EvidenceError(
                'key-provider payload is not {"name", "id"}', field="event_log(key-provider)"
            )
        return cls(doc["name"], doc.get("id", ""))


@dataclass(frozen=True)
class DstackIdentity:
    app_id: bytes | None
    compose_hash: bytes | None
    instance_id: bytes | None
    key_provider: KeyProvider | None
    key_provider_payload: bytes | None
    os_image_hash: bytes | None
    app_events: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class Measurements:
    mr_system: bytes
    mr_aggregated: bytes
    mr_system_boottime: bytes
    mr_aggregated_boottime: bytes | None


def identity_from_events(events: Iterable[Event]) -> DstackIdentity:
    first: dict[str, bytes] = {}
    app_events: list[tuple[str, bytes]] = []
    ready = False
    for event in events:
        if not event.is_runtime:
            continue
        if ready:
            app_events.append((event.event, event.payload))
        elif event.event == SYSTEM_READY:
            ready = True
        else:
            first.setdefault(event.event, event.payload)
    kp_payload = first.get("key-provider")
    return DstackIdentity(
        app_id=first.get("app-id"),
        compose_hash=first.get("compose-hash"),
        instance_id=first.get("instance-id"),
        key_provider=KeyProvider.from_payload(kp_payload) if kp_payload is not None else None,
        key_provider_payload=kp_payload,
        os_image_hash=first.get("os-image-hash"),
        app_events=tuple(app_events),
    )


def mr_system(report: TdReport, key_provider_payload: bytes | None) -> bytes:
    """sha256(mrtd || rtmr0..2 || sha256(key-provider payload) or zeros): the OS and platform."""
    mr_kp = (
        hashlib.sha256(key_provider_payload).digest()
        if key_provider_payload is not None
        else bytes(32)
    )
    return hashlib.sha256(
        report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2 + mr_kp
    ).digest()


def mr_aggregated(report: TdReport, rtmr3: bytes) -> bytes:
    """sha256 over every measurement; the config/owner registers join only when any is set."""
    parts = report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2 + rtmr3
    extra = report.mr_config_id + report.mr_owner + report.mr_owner_config
    if any(extra):
        parts += extra
    return hashlib.sha256(parts).digest()


def measurements(
    report: TdReport, identity: DstackIdentity, rtmr3_at_boot_mr_done: bytes | None
) -> Measurements:
    return Measurements(
        mr_system=mr_system(report, identity.key_provider_payload),
        mr_aggregated=mr_aggregated(report, report.rtmr3),
        mr_system_boottime=mr_system(report, None),
        mr_aggregated_boottime=(
            mr_aggregated(report, rtmr3_at_boot_mr_done)
            if rtmr3_at_boot_mr_done is not None
            else None
        ),
    )


def compose_hash(app_compose: bytes) -> bytes:
    """sha256 of the exact bytes of app-compose.json: dstack does no canonicalisation."""
    return hashlib.sha256(app_compose).digest()


def default_app_id(compose: bytes) -> bytes:
    """An app without a pinned id is named by the first 20 bytes of its compose hash."""
    return compose[:APP_ID_LEN]
