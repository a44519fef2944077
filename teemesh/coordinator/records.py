"""What the coordinator keeps in the store, as values: key layout, records and the rules on them.

Pure: no store, no clock. ``service``, ``catalog`` and ``epochs`` do the I/O around these.

Store keys (relative to the cluster's prefix):
  nonces/<hex>                      a challenge, on a lease
  admissions/<group>/<peer_id>      AdmissionRecord: what was attested, the live certificates
  leases/<group>/<peer_id>          {"lease", "ttl"}: the lease a peer's instances live on
  instances/<service>/<peer_id>     Instance, on the peer's lease
  revocations/<serial>              Revocation, on a lease that ends after the certificate does
  policy/current                    PolicyEpoch: the policy every coordinator admits by
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, TypeVar

from pydantic import Field, StringConstraints, ValidationError

from teemesh.attest.dstack import DstackIdentity, KeyProvider
from teemesh.attest.policy import Claims, Reason, Refusal, check_policy
from teemesh.checks import Address, Health, Label
from teemesh.config import Frozen, describe_error
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.errors import InputError

ADMISSIONS = "admissions/"
INSTANCES = "instances/"
REVOCATIONS = "revocations/"
POLICY_KEY = "policy/current"
SIDECAR_READABLE = (INSTANCES, REVOCATIONS)
"""What an admitted peer may read and watch; nonces, admissions and leases are not its business."""


def admission_key(group: str, peer_id: str) -> str:
    return f"{ADMISSIONS}{group}/{peer_id}"


def lease_key(group: str, peer_id: str) -> str:
    return f"leases/{group}/{peer_id}"


def instance_key(service: str, peer_id: str) -> str:
    return f"{INSTANCES}{service}/{peer_id}"


def revocation_key(serial: int) -> str:
    return f"{REVOCATIONS}{serial:x}"


def check_peer(policy: ClusterPolicy, group: str, peer_id: str) -> Refusal | None:
    """Does the policy have this group, and this peer id in it?"""
    rules = policy.groups.get(group)
    if rules is None:
        return Refusal(Reason.GROUP_NOT_ALLOWED, f"no group {group!r} in this cluster")
    if rules.peer_ids is not None and peer_id not in rules.peer_ids:
        return Refusal(
            Reason.PEER_ID_NOT_ALLOWED, f"peer id {peer_id!r} is not allowed in group {group!r}"
        )
    return None


@dataclass(frozen=True)
class LiveCert:
    serial: int
    not_after: int


@dataclass(frozen=True)
class AdmissionRecord:
    """One peer id's binding to an attested instance, with what its evidence established.

    The claims are kept so a new policy can be checked against admissions already made.
    """

    group: str
    peer_id: str
    instance_id: str
    app_id: str
    compose_hash: str
    os_image_hash: str
    key_provider: tuple[str, str] | None
    mr_system: str
    tee: str
    tcb_status: str
    advisory_ids: tuple[str, ...]
    admitted_at: int
    certs: tuple[LiveCert, ...] = ()
    revoked: str | None = None
    """Why an administrator revoked it; that instance is not admitted again under this peer id."""

    @property
    def not_after(self) -> int:
        return max((c.not_after for c in self.certs), default=0)

    def live_certs(self, now: float) -> tuple[LiveCert, ...]:
        return tuple(c for c in self.certs if c.not_after > now)

    def identity(self) -> DstackIdentity:
        kp = KeyProvider(*self.key_provider) if self.key_provider else None
        return DstackIdentity(
            app_id=bytes.fromhex(self.app_id),
            compose_hash=bytes.fromhex(self.compose_hash) if self.compose_hash else None,
            instance_id=bytes.fromhex(self.instance_id),
            key_provider=kp,
            key_provider_payload=kp.payload() if kp else None,
            os_image_hash=bytes.fromhex(self.os_image_hash) if self.os_image_hash else None,
            app_events=(),
        )

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        doc["certs"] = [{"serial": f"{c.serial:x}", "not_after": c.not_after} for c in self.certs]
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, value: bytes) -> AdmissionRecord:
        doc = json.loads(value)
        certs = tuple(LiveCert(int(c["serial"], 16), c["not_after"]) for c in doc.pop("certs"))
        kp = doc.pop("key_provider")
        advisories = tuple(doc.pop("advisory_ids"))  # JSON gives a list
        return cls(
            **doc,
            certs=certs,
            key_provider=(kp[0], kp[1]) if kp else None,
            advisory_ids=advisories,
        )

    def to_public(self) -> dict[str, Any]:
        """The admin listing: what a human wants to see, serials in hex."""
        doc: dict[str, Any] = json.loads(self.to_bytes())
        return doc | {"not_after": self.not_after}


def recheck(record: AdmissionRecord, policy: ClusterPolicy) -> tuple[Refusal, ...]:
    """Would this admission still be made under ``policy``? The same rules as at admission time."""
    refusal = check_peer(policy, record.group, record.peer_id)
    if refusal is not None:
        return (refusal,)
    if record.tee != policy.tee:
        return (Refusal(Reason.QUOTE_INVALID, f"admitted under tee {record.tee}"),)
    claims = Claims(
        tee=record.tee,
        tcb_status=record.tcb_status,
        advisory_ids=record.advisory_ids,
        report_data=b"",
        identity=record.identity(),
        mr_system=bytes.fromhex(record.mr_system),
    )
    return check_policy(claims, policy.attest_policy(record.group))


@dataclass(frozen=True)
class Revocation:
    serial: int
    group: str
    peer_id: str
    reason: str
    not_after: int
    revoked_at: int

    def to_bytes(self) -> bytes:
        doc = asdict(self) | {"serial": f"{self.serial:x}"}
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class PolicyEpoch:
    """The policy in force cluster-wide; ``epoch`` counts the changes published."""

    epoch: int
    digest: str
    policy: ClusterPolicy = field(compare=False)
    published_at: int = 0

    @staticmethod
    def digest_of(policy: ClusterPolicy) -> str:
        canonical = json.dumps(policy.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()

    def to_bytes(self) -> bytes:
        doc = {
            "epoch": self.epoch,
            "digest": self.digest,
            "published_at": self.published_at,
            "policy": self.policy.model_dump(mode="json"),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, value: bytes) -> PolicyEpoch:
        doc = json.loads(value)
        policy = ClusterPolicy.model_validate(doc["policy"])
        return cls(doc["epoch"], doc["digest"], policy, doc["published_at"])


TagText = Annotated[str, StringConstraints(min_length=1, max_length=256)]
MAX_TAGS = 32


class Registration(Frozen):
    """A sidecar's registration of one of its group's services; the peer comes from its SVID."""

    service: Label
    address: Address
    port: int = Field(ge=1, le=65535)
    tags: dict[Label, TagText] = Field(default_factory=dict, max_length=MAX_TAGS)
    health: Health = "passing"


class InstanceUpdate(Frozen):
    tags: dict[Label, TagText] | None = Field(None, max_length=MAX_TAGS)
    health: Health | None = None


M = TypeVar("M", bound=Frozen)


def parse_request(model: type[M], doc: Any) -> M:
    """A request body as ``model``; every problem is reported at once, as a 400 naming fields."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        problems = [describe_error(err) for err in exc.errors()]
        fields = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        raise InputError("; ".join(problems), field=",".join(sorted(fields)) or "body") from exc


def instance_value(reg: Registration, admission: AdmissionRecord) -> bytes:
    """The catalog entry: what the sidecar said, and who it is (from its admission)."""
    doc = {
        "service": reg.service,
        "group": admission.group,
        "peer_id": admission.peer_id,
        "address": reg.address,
        "port": reg.port,
        "tags": reg.tags,
        "health": reg.health,
        "app_id": admission.app_id,
        "instance_id": admission.instance_id,
    }
    return json.dumps(doc, separators=(",", ":")).encode()
