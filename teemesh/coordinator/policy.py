"""The cluster policy a coordinator admits by: one attestation policy per group of peers.

The TEE kind and its trust anchor (``tee``, ``platform_key``) are cluster-wide, so no group can
quietly accept simulated quotes in a TDX cluster. Group fields follow the attestation policy's
rule: left out means not checked, an empty list admits nothing. ``vpc`` turns on dstack-vpc's
VPC API (``coordinator.vpc``) for the apps it allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from teemesh.attest.policy import (
    Hex20,
    Hex32,
    KeyProviderRule,
    Policy,
    TcbStatus,
    check_platform_key,
    with_platform_key,
)
from teemesh.checks import Label
from teemesh.config import ConfigError, Frozen, parse_model, parse_yaml, read_yaml
from teemesh.coordinator.vpc import app_allowed, parse_allowed_apps


class GroupPolicy(Frozen):
    compose_hashes: tuple[Hex32, ...] | None = None
    app_ids: tuple[Hex20, ...] | None = None
    os_images: tuple[Hex32, ...] | None = None
    mr_systems: tuple[Hex32, ...] | None = None
    key_providers: tuple[KeyProviderRule, ...] | None = None
    allowed_tcb_statuses: tuple[TcbStatus, ...] = ("UpToDate",)
    allowed_advisory_ids: tuple[str, ...] = ()
    peer_ids: tuple[Label, ...] | None = None
    """None admits any peer id; a list admits only those."""
    services: tuple[Label, ...] = ()
    """Services this group's peers may register in the catalog; no other group may own them."""


class VpcPolicy(Frozen):
    allowed_apps: Annotated[tuple[str, ...], BeforeValidator(parse_allowed_apps)]
    """dstack-vpc's ``ALLOWED_APPS``: ``any``, or app ids (a list or comma-separated); an app
    is its SVID's attested app id. Empty denies every app."""

    def allows(self, app_id: str) -> bool:
        return app_allowed(self.allowed_apps, app_id)


class ClusterPolicy(Frozen):
    cluster: Label
    tee: Literal["tdx", "simulated"] = "tdx"
    platform_key: str | None = None
    """PEM public key of the simulated platform (tee: simulated only)."""
    svid_ttl_seconds: int = Field(3600, ge=60, le=30 * 24 * 3600)
    nonce_ttl_seconds: int = Field(60, ge=5, le=3600)
    lease_ttl_seconds: int = Field(15, ge=2, le=300)
    """A peer's catalog entries vanish this long after its last heartbeat."""
    groups: dict[Label, GroupPolicy] = Field(default_factory=dict)
    vpc: VpcPolicy | None = None
    """None: the VPC API is off (404)."""
    serial: int | None = Field(None, ge=1, lt=2**63)
    """Set by ``teemesh policy sign`` (its time by default): once a policy with a serial is in
    force, only a policy with a higher serial replaces it, so an older signed policy that the
    host replays (through the env or the admin API) is refused."""

    @model_serializer(mode="wrap")
    def _without_absent_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A policy without ``vpc`` or ``serial`` dumps as before: same epoch digest, and
        coordinators that predate them can still read it from the store (one with them, not:
        upgrade every coordinator before publishing it)."""
        doc: dict[str, Any] = handler(self)
        for name in ("vpc", "serial"):
            if getattr(self, name) is None:
                doc.pop(name, None)
        return doc

    @model_validator(mode="after")
    def _platform_key_matches_tee(self) -> ClusterPolicy:
        check_platform_key(self.tee, self.platform_key)
        return self

    @model_validator(mode="after")
    def _one_owner_per_service(self) -> ClusterPolicy:
        owners: dict[str, str] = {}
        for group, rules in self.groups.items():
            for service in rules.services:
                if owners.setdefault(service, group) != group:
                    raise ValueError(
                        f"groups.{group}.services: {service!r} is already owned by group "
                        f"{owners[service]}"
                    )
        return self

    def attest_policy(self, group: str | None) -> Policy:
        """The attestation policy for ``group`` (None: only the cluster-wide quote checks)."""
        rules = self.groups[group].model_dump(exclude={"peer_ids", "services"}) if group else {}
        return Policy(tee=self.tee, platform_key=self.platform_key, **rules)


def load_cluster_policy(path: Path) -> ClusterPolicy:
    """Read a cluster policy; ``platform_key`` may be PEM text or a path next to the file."""
    return _cluster_policy(read_yaml(path), str(path), path)


def parse_cluster_policy(text: str, source: str, *, signer: str | None = None) -> ClusterPolicy:
    """A cluster policy from its text (JSON or YAML), as ``load_cluster_policy`` reads a file;
    ``source`` names it in every problem (``$TEEMESH_CLUSTER_POLICY``). With no file to be
    next to, ``platform_key`` must be the PEM text itself. With ``signer`` (an Ed25519 public
    key, hex) the text must be a policy that key signed (``policy_signing``)."""
    if signer is None:
        return _cluster_policy(parse_yaml(text, source), source, None)
    from teemesh.coordinator.policy_signing import verified_policy  # noqa: PLC0415

    return _cluster_policy(verified_policy(text, signer, source), source, None)


def _cluster_policy(doc: Any, source: str, path: Path | None) -> ClusterPolicy:
    if not isinstance(doc, dict):
        raise ConfigError(source, ["(top level): expected a mapping with cluster and groups"])
    if path is not None:
        doc = with_platform_key(doc, path)
    else:
        key = doc.get("platform_key")
        if isinstance(key, str) and key and not key.lstrip().startswith("-----BEGIN"):
            raise ConfigError(source, ["platform_key: expected PEM text (there is no file here "
                                       "for a key path to be next to)"])  # fmt: skip
    return parse_model(ClusterPolicy, doc, source=source)
