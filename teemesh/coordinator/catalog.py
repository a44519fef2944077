"""The catalog API's rules: who may read, register and change what, over the shared store.

A caller is the peer named by its SVID (verified by TLS against the mesh CA), and only while
that certificate is one of the live certificates of the peer's current admission: a revoked,
superseded or foreign certificate gets nothing. A peer writes only under its own peer id and
only services its group owns in the policy; who it is (group, app id, instance id) is taken from
its admission, never from what it sends. A peer's instances share one lease, which its
heartbeat keeps alive, so a silent CVM drops out of the catalog by itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from teemesh.catalog.store import MAX_KEY_BYTES, StoreError, StoreErrorReason
from teemesh.coordinator.errors import NotRegistered, lease_gone
from teemesh.coordinator.records import (
    SIDECAR_READABLE,
    AdmissionRecord,
    InstanceUpdate,
    Registration,
    admission_key,
    instance_key,
    instance_value,
    lease_key,
)
from teemesh.coordinator.service import Coordinator
from teemesh.encoding import DNS_LABEL
from teemesh.errors import InputError, PeerError, Refused
from teemesh.identity.svid import SvidIdentity, read_svid


class Unauthenticated(PeerError):
    """No usable SVID: HTTP 401."""


@dataclass(frozen=True)
class Caller:
    svid: SvidIdentity
    admission: AdmissionRecord

    @property
    def group(self) -> str:
        return self.svid.group

    @property
    def peer_id(self) -> str:
        return self.svid.peer_id


def check_readable(prefix: str) -> str:
    if not prefix.startswith(SIDECAR_READABLE):
        readable = ", ".join(SIDECAR_READABLE)
        raise InputError(f"{prefix!r} is not readable: start it with {readable}", field="prefix")
    if len(prefix.encode(errors="replace")) > MAX_KEY_BYTES:
        raise InputError(f"a prefix is at most {MAX_KEY_BYTES} bytes", field="prefix")
    return prefix


def check_service(service: str) -> str:
    """A service named in a path: a DNS label, as every registered one is."""
    if not DNS_LABEL.fullmatch(service):
        raise InputError(f"{service[:100]!r} is not a service name (a DNS label)", field="service")
    return service


@dataclass
class Catalog:
    coordinator: Coordinator

    async def authenticate(self, der: bytes | None) -> Caller:
        if der is None:
            raise Unauthenticated("this API needs a client certificate (the peer's SVID)")
        try:
            svid = read_svid(der, self.coordinator.policy.cluster)
        except PeerError as exc:  # a certificate of the mesh CA, but no SVID of this cluster
            raise Unauthenticated(str(exc)) from exc
        held = await self.coordinator.store.get(admission_key(svid.group, svid.peer_id))
        record = AdmissionRecord.from_bytes(held.value) if held else None
        now = self.coordinator.clock.now()
        if record is None or svid.serial not in {c.serial for c in record.live_certs(now)}:
            raise Refused(f"certificate {svid.serial:x} of {svid.peer} is revoked or superseded")
        return Caller(svid, record)

    async def register(self, caller: Caller, reg: Registration) -> dict[str, Any]:
        policy = (await self.coordinator.current()).policy
        rules = policy.groups.get(caller.group)
        if rules is None or reg.service not in rules.services:
            raise Refused(
                f"group {caller.group} does not own service {reg.service!r} "
                f"(policy: groups.{caller.group}.services)"
            )
        lease, ttl = await self._peer_lease(caller, policy.lease_ttl_seconds)
        key = instance_key(reg.service, caller.peer_id)
        value = instance_value(reg, caller.admission)
        try:
            revision = await self.coordinator.store.put(key, value, lease=lease)
        except StoreError as exc:  # the lease expired between refresh and put: once more
            if exc.reason is not StoreErrorReason.LEASE_NOT_FOUND:
                raise
            lease, ttl = await self._peer_lease(caller, policy.lease_ttl_seconds)
            revision = await self.coordinator.store.put(key, value, lease=lease)
        return {"key": key, "revision": revision, "lease_ttl": ttl}

    async def _peer_lease(self, caller: Caller, ttl: int) -> tuple[int, int]:
        """The peer's lease, refreshed; a new one if it has none or it expired."""
        store = self.coordinator.store
        key = lease_key(caller.group, caller.peer_id)
        while True:
            held = await store.get(key)
            if held is not None:
                doc = json.loads(held.value)
                try:
                    return (await store.refresh(doc["lease"])).id, doc["ttl"]
                except StoreError as exc:
                    if exc.reason is not StoreErrorReason.LEASE_NOT_FOUND:
                        raise
            lease = await store.grant(ttl)
            value = json.dumps({"lease": lease.id, "ttl": ttl}).encode()
            if (await store.replace(key, value, held)).succeeded:
                return lease.id, ttl
            await store.revoke(lease.id)  # a concurrent registration won; use its lease

    async def heartbeat(self, caller: Caller) -> dict[str, Any]:
        store = self.coordinator.store
        held = await store.get(lease_key(caller.group, caller.peer_id))
        gone = lease_gone()
        if held is None:
            raise gone
        try:
            lease = await store.refresh(json.loads(held.value)["lease"])
        except StoreError as exc:
            if exc.reason is StoreErrorReason.LEASE_NOT_FOUND:
                raise gone from exc
            raise
        return {"lease_ttl": lease.ttl}

    async def update(self, caller: Caller, service: str, change: InstanceUpdate) -> dict[str, Any]:
        """Tags and health of the caller's own instance, compare-and-set against other writers."""
        store = self.coordinator.store
        key = instance_key(check_service(service), caller.peer_id)
        while True:
            held = await store.get(key)
            if held is None:
                raise NotRegistered(f"{caller.peer_id} has no registered instance of {service!r}")
            doc = json.loads(held.value)
            doc |= change.model_dump(exclude_none=True)
            value = json.dumps(doc, separators=(",", ":")).encode()
            try:
                written = await store.replace(key, value, held, lease=held.lease)
            except StoreError as exc:  # its lease expired a moment ago
                if exc.reason is not StoreErrorReason.LEASE_NOT_FOUND:
                    raise
                raise lease_gone() from exc
            if written.succeeded:
                return {"key": key, "revision": written.revision, "instance": doc}

    async def deregister(self, caller: Caller, service: str) -> dict[str, Any]:
        key = instance_key(check_service(service), caller.peer_id)
        revision = await self.coordinator.store.delete(key)
        if revision is None:
            raise NotRegistered(f"{caller.peer_id} has no registered instance of {service!r}")
        return {"key": key, "revision": revision}

    async def read(self, prefix: str) -> dict[str, Any]:
        snapshot = await self.coordinator.store.range(check_readable(prefix))
        items = [
            {"key": kv.key, "value": json.loads(kv.value), "mod_revision": kv.mod_revision}
            for kv in snapshot.kvs
        ]
        return {"revision": snapshot.revision, "items": items}
