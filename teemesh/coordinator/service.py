"""Admission with state: single-use nonces, one live instance per peer id, and policy epochs.

All of it lives in the shared store (key layout in ``records``), so with several coordinators on
etcd a nonce issued by one is accepted once by any other, two coordinators cannot bind one peer
id to two instances (every write is a compare-and-set), and a policy published through one is
the policy of all: each admission reads the current epoch before checking and again after its
write, so a peer admitted while a new policy was being published is revoked by one of the two.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.attest.dcap import CollateralStore
from teemesh.attest.policy import Reason
from teemesh.catalog.store import Store, StoreError, StoreErrorReason
from teemesh.clock import Clock, SystemClock
from teemesh.coordinator.admission import (
    NONCE_LEN,
    AdmissionRequest,
    Admitted,
    check_admission,
)
from teemesh.coordinator.errors import AdmissionRefused, refuse
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.coordinator.records import (
    ADMISSIONS,
    POLICY_KEY,
    AdmissionRecord,
    LiveCert,
    PolicyEpoch,
    Revocation,
    admission_key,
    lease_key,
    recheck,
    revocation_key,
)
from teemesh.errors import InputError
from teemesh.identity.certs import cert_pem
from teemesh.identity.meshca import issue_svid
from teemesh.identity.svid import spiffe_id

REVOCATION_SLACK = 300
"""Seconds a revocation outlives its certificate in the store, for clocks that disagree."""


@dataclass(frozen=True)
class Revoked:
    group: str
    peer_id: str
    serials: tuple[int, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        serials = [f"{s:x}" for s in self.serials]
        return {
            "group": self.group,
            "peer_id": self.peer_id,
            "serials": serials,
            "reason": self.reason,
        }


def check_serial(serial: int | None, in_force: int | None) -> None:
    """A signed policy (one with a serial) is replaced only by a later one: never rolled back,
    and never by an unsigned one."""
    if in_force is None:
        return
    if serial is None or serial <= in_force:
        given = "no serial" if serial is None else f"serial {serial}"
        raise InputError(
            f"the policy in force has serial {in_force}; this one has {given}: only a policy "
            "signed later (a higher serial) replaces it",
            field="serial",
        )


@dataclass
class Coordinator:
    """``policy`` starts as this replica's own; ``start`` publishes it unless it is in force."""

    policy: ClusterPolicy
    store: Store
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    collateral: CollateralStore | None = None
    clock: Clock = field(default_factory=SystemClock)
    _epoch: tuple[int, PolicyEpoch] | None = None  # (mod_revision, epoch) last read

    async def start(self) -> tuple[PolicyEpoch, tuple[Revoked, ...]]:
        """Publish ``policy`` if the cluster has none yet; otherwise adopt the one in force.

        A replica restarting with an older file must not roll the cluster back: a different
        file is published only by a reload (SIGHUP or the admin API).
        """
        if await self.store.get(POLICY_KEY) is None:
            return await self.publish_policy(self.policy)
        return await self.current(), ()

    # -- policy epochs ----------------------------------------------------------------------

    async def current(self) -> PolicyEpoch:
        """The policy in force cluster-wide (one read; parsed again only when it changed)."""
        held = await self.store.get(POLICY_KEY)
        if held is None:
            raise StoreError(StoreErrorReason.UNAVAILABLE, "no policy has been published")
        if self._epoch is None or self._epoch[0] != held.mod_revision:
            self._epoch = (held.mod_revision, PolicyEpoch.from_bytes(held.value))
        self.policy = self._epoch[1].policy
        return self._epoch[1]

    async def publish_policy(
        self, policy: ClusterPolicy
    ) -> tuple[PolicyEpoch, tuple[Revoked, ...]]:
        """Make ``policy`` the cluster's (a new epoch if it differs); revoke what it refuses."""
        if policy.cluster != self.policy.cluster:
            raise InputError(
                f"the policy is for cluster {policy.cluster!r}, not {self.policy.cluster!r}",
                field="cluster",
            )
        digest = PolicyEpoch.digest_of(policy)
        while True:
            held = await self.store.get(POLICY_KEY)
            previous = PolicyEpoch.from_bytes(held.value) if held else None
            if previous is not None and previous.digest == digest:
                epoch = previous
                break
            if previous is not None:
                check_serial(policy.serial, previous.policy.serial)
            number = previous.epoch + 1 if previous else 1
            epoch = PolicyEpoch(number, digest, policy, int(self.clock.now()))
            if (await self.store.replace(POLICY_KEY, epoch.to_bytes(), held)).succeeded:
                break
        await self.current()
        return epoch, await self.sweep(epoch.policy)

    async def sweep(self, policy: ClusterPolicy) -> tuple[Revoked, ...]:
        """Revoke every admission ``policy`` would not make; they lose their peer id too."""
        out = []
        for kv in (await self.store.range(ADMISSIONS)).kvs:
            record = AdmissionRecord.from_bytes(kv.value)
            refusals = recheck(record, policy)
            if refusals and record.revoked is None:
                reason = "; ".join(f"{r.code}: {r.message}" for r in refusals)
                done = await self._revoke(record.group, record.peer_id, reason, forget=True)
                out += [done] if done is not None else []
        return tuple(out)

    async def revoke_peer(self, group: str, peer_id: str, reason: str) -> Revoked | None:
        """An administrator's revocation: that instance is never admitted as this peer again
        (PEER_REVOKED); another instance may take the peer id. None if it was not admitted."""
        return await self._revoke(group, peer_id, reason, forget=False)

    async def _revoke(
        self, group: str, peer_id: str, reason: str, *, forget: bool
    ) -> Revoked | None:
        """Publish the live serials, then change the record only if it is still what was read:
        a renewal racing with the revocation makes it go round again, with that serial too."""
        key = admission_key(group, peer_id)
        while True:
            held = await self.store.get(key)
            if held is None:
                return None
            record = AdmissionRecord.from_bytes(held.value)
            now = self.clock.now()
            live = record.live_certs(now)
            for cert in live:
                entry = Revocation(cert.serial, group, peer_id, reason, cert.not_after, int(now))
                lease = await self.store.grant(int(cert.not_after - now) + REVOCATION_SLACK)
                await self.store.put(revocation_key(cert.serial), entry.to_bytes(), lease=lease.id)
            revoked = replace(record, certs=(), revoked=reason).to_bytes()
            written = (
                await self.store.delete_if(key, mod_revision=held.mod_revision)
                if forget
                else await self.store.put_if(key, revoked, mod_revision=held.mod_revision)
            )
            if written.succeeded:
                break
        peer_lease = await self.store.get(lease_key(group, peer_id))
        if peer_lease is not None:  # its catalog entries go with it
            try:
                await self.store.revoke(json.loads(peer_lease.value)["lease"])
            except StoreError as exc:
                if exc.reason is not StoreErrorReason.LEASE_NOT_FOUND:
                    raise
            await self.store.delete(lease_key(group, peer_id))
        return Revoked(group, peer_id, tuple(c.serial for c in live), reason)

    async def admissions(self) -> list[AdmissionRecord]:
        return [
            AdmissionRecord.from_bytes(kv.value) for kv in (await self.store.range(ADMISSIONS)).kvs
        ]

    # -- admission --------------------------------------------------------------------------

    async def challenge(self) -> dict[str, Any]:
        nonce = secrets.token_bytes(NONCE_LEN)
        ttl = self.policy.nonce_ttl_seconds
        expires_at = int(self.clock.now()) + ttl
        lease = await self.store.grant(ttl + 5)  # the store forgets it; expires_at decides
        body = json.dumps({"expires_at": expires_at}).encode()
        await self.store.put(f"nonces/{nonce.hex()}", body, lease=lease.id)
        return {"nonce": nonce.hex(), "expires_at": expires_at}

    async def _consume_nonce(self, nonce: bytes) -> None:
        key = f"nonces/{nonce.hex()}"
        held = await self.store.get(key)
        if held is None:
            raise refuse(Reason.NONCE_INVALID, "unknown or already used nonce")
        taken = await self.store.delete_if(key, mod_revision=held.mod_revision)
        if not taken.succeeded:
            raise refuse(Reason.NONCE_INVALID, "nonce already used")
        if json.loads(held.value)["expires_at"] < self.clock.now():
            raise refuse(Reason.NONCE_INVALID, "nonce expired")

    async def attest(self, request: AdmissionRequest) -> dict[str, Any]:
        """Consume the nonce first, so a refused request cannot be retried with it."""
        await self._consume_nonce(request.nonce)
        epoch = await self.current()
        now = self.clock.now()
        result = await asyncio.to_thread(  # quote verification is CPU work
            check_admission, request, epoch.policy, collateral=self.collateral, now=int(now)
        )
        if not isinstance(result, Admitted):
            raise AdmissionRefused(result)
        reply, record = await self._issue(request, result, now, epoch.policy)
        later = await self.current()
        if later.epoch != epoch.epoch and (refusals := recheck(record, later.policy)):
            reason = "policy changed during admission"
            await self._revoke(record.group, record.peer_id, reason, forget=True)
            raise AdmissionRefused(refusals)
        return reply

    async def _issue(
        self, request: AdmissionRequest, admitted: Admitted, now: float, policy: ClusterPolicy
    ) -> tuple[dict[str, Any], AdmissionRecord]:
        ident = admitted.identity
        assert ident.app_id is not None and ident.instance_id is not None
        key = admission_key(request.group, request.peer_id)
        held = await self.store.get(key)
        previous = AdmissionRecord.from_bytes(held.value) if held else None
        kept: tuple[LiveCert, ...] = ()
        if previous is not None and previous.instance_id == ident.instance_id.hex():
            if previous.revoked is not None:
                raise refuse(
                    Reason.PEER_REVOKED,
                    f"instance {previous.instance_id} of peer {request.peer_id!r} was revoked: "
                    f"{previous.revoked}",
                )
            kept = previous.live_certs(now)
        elif previous is not None and previous.live_certs(now):
            raise refuse(
                Reason.PEER_ID_IN_USE,
                f"peer id {request.peer_id!r} is held by live instance {previous.instance_id}",
            )
        ttl = dt.timedelta(seconds=policy.svid_ttl_seconds)
        issued_at = dt.datetime.fromtimestamp(now, dt.UTC)
        spiffe = spiffe_id(policy.cluster, request.group, request.peer_id)
        cert = issue_svid(
            self.ca_key, self.ca_cert, request.public_key,
            spiffe=spiffe, peer_id=request.peer_id, app_id=ident.app_id,
            now=issued_at, ttl=ttl,
        )  # fmt: skip
        not_after = int(now + ttl.total_seconds())
        kp = ident.key_provider
        record = AdmissionRecord(
            group=request.group,
            peer_id=request.peer_id,
            instance_id=ident.instance_id.hex(),
            app_id=ident.app_id.hex(),
            compose_hash=(ident.compose_hash or b"").hex(),
            os_image_hash=(ident.os_image_hash or b"").hex(),
            key_provider=(kp.name, kp.id) if kp else None,
            mr_system=admitted.mr_system.hex(),
            tee=admitted.tee,
            tcb_status=admitted.tcb_status,
            advisory_ids=admitted.advisory_ids,
            admitted_at=int(now),
            certs=(*kept, LiveCert(cert.serial_number, not_after)),
        )
        written = await self.store.replace(key, record.to_bytes(), held)
        if not written.succeeded:  # another coordinator admitted this peer id meanwhile
            raise refuse(Reason.PEER_ID_IN_USE, f"peer id {request.peer_id!r} was just admitted")
        reply = {
            "spiffe_id": spiffe,
            "certificate": cert_pem(cert),
            "ca_certificate": cert_pem(self.ca_cert),
            "expires_at": not_after,
            "renew_after": int(now + ttl.total_seconds() / 2),
        }
        return reply, record
