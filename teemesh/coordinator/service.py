"""Admission with state: single-use nonces and one live instance per peer id, in the store.

Both live in the shared store, so with several coordinators on etcd a nonce issued by one is
accepted once by any other, and two coordinators cannot bind one peer id to two instances
(every write is a compare-and-set).

Store keys (relative to the cluster's prefix):
  nonces/<hex>                   {"expires_at"}, on a lease that outlives it slightly
  admissions/<group>/<peer_id>   {"instance_id", "app_id", "serial", "not_after", ...}
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.attest.dcap import CollateralStore
from teemesh.attest.policy import Reason, Refusal
from teemesh.catalog.store import Store
from teemesh.clock import Clock, SystemClock
from teemesh.coordinator.admission import (
    NONCE_LEN,
    AdmissionRequest,
    Admitted,
    check_admission,
)
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.errors import Refused
from teemesh.identity.certs import cert_pem
from teemesh.identity.meshca import issue_svid, spiffe_id


class AdmissionRefused(Refused):
    """403 with reason codes; each also names the peer so the log line says who."""

    def __init__(self, refusals: tuple[Refusal, ...]) -> None:
        self.refusals = refusals
        super().__init__([f"{r.code}: {r.message}" for r in refusals])


def refuse(code: Reason, message: str) -> AdmissionRefused:
    return AdmissionRefused((Refusal(code, message),))


@dataclass
class Coordinator:
    policy: ClusterPolicy
    store: Store
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    collateral: CollateralStore | None = None
    clock: Clock = field(default_factory=SystemClock)

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
        now = self.clock.now()
        result = await asyncio.to_thread(  # quote verification is CPU work
            check_admission, request, self.policy, collateral=self.collateral, now=int(now)
        )
        if not isinstance(result, Admitted):
            raise AdmissionRefused(result)
        return await self._issue(request, result, now)

    async def _issue(
        self, request: AdmissionRequest, admitted: Admitted, now: float
    ) -> dict[str, Any]:
        ident = admitted.identity
        assert ident.app_id is not None and ident.instance_id is not None
        key = f"admissions/{request.group}/{request.peer_id}"
        held = await self.store.get(key)
        if held is not None:
            record = json.loads(held.value)
            if record["instance_id"] != ident.instance_id.hex() and record["not_after"] > now:
                raise refuse(
                    Reason.PEER_ID_IN_USE,
                    f"peer id {request.peer_id!r} is held by live instance {record['instance_id']}",
                )
        ttl = dt.timedelta(seconds=self.policy.svid_ttl_seconds)
        issued_at = dt.datetime.fromtimestamp(now, dt.UTC)
        spiffe = spiffe_id(self.policy.cluster, request.group, request.peer_id)
        cert = issue_svid(
            self.ca_key, self.ca_cert, request.public_key,
            spiffe=spiffe, peer_id=request.peer_id, app_id=ident.app_id,
            now=issued_at, ttl=ttl,
        )  # fmt: skip
        not_after = int(now + ttl.total_seconds())
        record = {
            "instance_id": ident.instance_id.hex(),
            "app_id": ident.app_id.hex(),
            "compose_hash": (ident.compose_hash or b"").hex(),
            "serial": format(cert.serial_number, "x"),
            "not_after": not_after,
            "admitted_at": int(now),
        }
        body = json.dumps(record).encode()
        written = (
            await self.store.create(key, body)
            if held is None
            else await self.store.put_if(key, body, mod_revision=held.mod_revision)
        )
        if not written.succeeded:  # another coordinator admitted this peer id meanwhile
            raise refuse(Reason.PEER_ID_IN_USE, f"peer id {request.peer_id!r} was just admitted")
        return {
            "spiffe_id": spiffe,
            "certificate": cert_pem(cert),
            "ca_certificate": cert_pem(self.ca_cert),
            "expires_at": not_after,
            "renew_after": int(now + ttl.total_seconds() / 2),
        }
