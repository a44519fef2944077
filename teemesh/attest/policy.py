"""Attestation policy: a typed model and a pure check that returns every failing reason.

A field left out is not checked; a field given as an empty list admits nothing. The defaults
are strict: real TDX only, TCB status UpToDate only, no advisories, and debug TDs are always
refused (by the verifier, not by policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, model_validator

from teemesh.attest.dstack import DstackIdentity
from teemesh.config import ConfigError, Frozen, parse_model, read_yaml
from teemesh.encoding import parse_hex
from teemesh.errors import InputError

TcbStatus = Literal[
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
]
TCB_STATUSES: tuple[str, ...] = get_args(TcbStatus)


class Reason(StrEnum):
    """Why evidence was refused; the same codes travel in admission replies."""

    QUOTE_INVALID = "QUOTE_INVALID"
    EVENT_LOG_MISMATCH = "EVENT_LOG_MISMATCH"
    DEBUG_TD = "DEBUG_TD"
    TCB_STATUS_NOT_ALLOWED = "TCB_STATUS_NOT_ALLOWED"
    ADVISORY_NOT_ALLOWED = "ADVISORY_NOT_ALLOWED"
    OS_IMAGE_NOT_ALLOWED = "OS_IMAGE_NOT_ALLOWED"
    MR_SYSTEM_NOT_ALLOWED = "MR_SYSTEM_NOT_ALLOWED"
    COMPOSE_HASH_NOT_ALLOWED = "COMPOSE_HASH_NOT_ALLOWED"
    APP_ID_NOT_ALLOWED = "APP_ID_NOT_ALLOWED"
    KEY_PROVIDER_NOT_ALLOWED = "KEY_PROVIDER_NOT_ALLOWED"
    REPORT_DATA_MISMATCH = "REPORT_DATA_MISMATCH"
    # admission (coordinator) codes
    NONCE_INVALID = "NONCE_INVALID"
    GROUP_NOT_ALLOWED = "GROUP_NOT_ALLOWED"
    PEER_ID_NOT_ALLOWED = "PEER_ID_NOT_ALLOWED"
    PEER_ID_IN_USE = "PEER_ID_IN_USE"
    PEER_REVOKED = "PEER_REVOKED"


@dataclass(frozen=True)
class Refusal:
    code: Reason
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


def _hex(size: int | None = None, max_size: int | None = None) -> AfterValidator:
    def check(value: str) -> str:
        try:
            return parse_hex(value, field="value", size=size, max_size=max_size).hex()
        except InputError as exc:
            raise ValueError(exc.problem) from exc

    return AfterValidator(check)


Hex20 = Annotated[str, _hex(20)]
Hex32 = Annotated[str, _hex(32)]
HexBytes = Annotated[str, _hex()]


class KeyProviderRule(Frozen):
    name: str
    id: HexBytes | None = None
    """None admits any id for this provider name."""


class Policy(Frozen):
    tee: Literal["tdx", "simulated"] = "tdx"
    platform_key: str | None = None
    """PEM public key of the simulated platform; required (and only allowed) with tee: simulated."""
    os_images: tuple[Hex32, ...] | None = None
    mr_systems: tuple[Hex32, ...] | None = None
    compose_hashes: tuple[Hex32, ...] | None = None
    app_ids: tuple[Hex20, ...] | None = None
    key_providers: tuple[KeyProviderRule, ...] | None = None
    allowed_tcb_statuses: tuple[TcbStatus, ...] = ("UpToDate",)
    allowed_advisory_ids: tuple[str, ...] | None = ()
    """Advisories are refused unless listed; None leaves them to a later check (KMS bootAuth)."""
    report_data: Annotated[str, _hex(max_size=64)] | None = None

    @model_validator(mode="after")
    def _platform_key_matches_tee(self) -> Policy:
        check_platform_key(self.tee, self.platform_key)
        return self


def check_platform_key(tee: str, platform_key: str | None) -> None:
    """Simulated quotes need a pinned platform key, and a TDX policy must not carry one."""
    if tee == "simulated" and not platform_key:
        raise ValueError("tee: simulated needs platform_key (the platform's PEM public key)")
    if tee == "tdx" and platform_key:
        raise ValueError("platform_key is only for tee: simulated")


def load_policy(path: Path) -> Policy:
    """Read a policy file; ``platform_key`` may be PEM text or a path next to the policy."""
    doc = read_yaml(path)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(str(path), ["(top level): expected a mapping of policy fields"])
    return parse_model(Policy, with_platform_key(doc, path), source=str(path))


def with_platform_key(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """``platform_key`` may be PEM text or a file path relative to the document at ``path``."""
    key = doc.get("platform_key")
    if isinstance(key, str) and key and not key.lstrip().startswith("-----BEGIN"):
        key_path = path.parent / key
        try:
            return {**doc, "platform_key": key_path.read_text()}
        except (OSError, ValueError) as exc:  # ValueError: NUL in the path, or not UTF-8
            raise ConfigError(str(path), [f"platform_key: cannot read {key_path}: {exc}"]) from exc
    return doc


@dataclass(frozen=True)
class Claims:
    """Facts established by a verifier; ``identity`` is None when the event log did not match."""

    tee: str
    tcb_status: str
    advisory_ids: tuple[str, ...]
    report_data: bytes
    identity: DstackIdentity | None
    mr_system: bytes


def check_policy(claims: Claims, policy: Policy) -> tuple[Refusal, ...]:
    out: list[Refusal] = []
    if claims.tcb_status not in policy.allowed_tcb_statuses:
        allowed = ", ".join(policy.allowed_tcb_statuses)
        out.append(
            Refusal(
                Reason.TCB_STATUS_NOT_ALLOWED,
                f"TCB status {claims.tcb_status} is not in [{allowed}]",
            )
        )
    allowed_advisories = policy.allowed_advisory_ids
    bad = [
        a
        for a in claims.advisory_ids
        if allowed_advisories is not None and a not in allowed_advisories
    ]
    if bad:
        out.append(
            Refusal(Reason.ADVISORY_NOT_ALLOWED, f"advisories not allowed: {', '.join(bad)}")
        )
    if policy.report_data is not None:
        expected = bytes.fromhex(policy.report_data).ljust(64, b"\0")
        if claims.report_data != expected:
            out.append(
                Refusal(
                    Reason.REPORT_DATA_MISMATCH,
                    f"report_data is {claims.report_data.hex()}, expected {expected.hex()}",
                )
            )
    if policy.mr_systems is not None and claims.mr_system.hex() not in policy.mr_systems:
        out.append(
            Refusal(
                Reason.MR_SYSTEM_NOT_ALLOWED, f"mr_system {claims.mr_system.hex()} is not allowed"
            )
        )
    if claims.identity is not None:
        out.extend(_check_identity(claims.identity, policy))
    return tuple(out)


def _check_identity(identity: DstackIdentity, policy: Policy) -> list[Refusal]:
    out: list[Refusal] = []
    pins = (
        (policy.os_images, identity.os_image_hash, "os-image-hash", Reason.OS_IMAGE_NOT_ALLOWED),
        (
            policy.compose_hashes,
            identity.compose_hash,
            "compose-hash",
            Reason.COMPOSE_HASH_NOT_ALLOWED,
        ),
        (policy.app_ids, identity.app_id, "app-id", Reason.APP_ID_NOT_ALLOWED),
    )
    for allowed, value, event, code in pins:
        if allowed is None:
            continue
        if value is None:
            out.append(Refusal(code, f"no {event} event was measured"))
        elif value.hex() not in allowed:
            out.append(Refusal(code, f"{event} {value.hex()} is not allowed"))
    if policy.key_providers is not None:
        kp = identity.key_provider
        if kp is None:
            out.append(
                Refusal(Reason.KEY_PROVIDER_NOT_ALLOWED, "no key-provider event was measured")
            )
        elif not any(
            r.name == kp.name and r.id in (None, kp.id.lower()) for r in policy.key_providers
        ):
            out.append(
                Refusal(
                    Reason.KEY_PROVIDER_NOT_ALLOWED,
                    f"key provider {kp.name}:{kp.id[:16]}... is not allowed",
                )
            )
    return out
