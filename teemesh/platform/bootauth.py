"""dstack KMS boot authorization: may this CVM (or this KMS) receive keys?

dstack's KMS asks an auth service ``POST {url}/bootAuth/app`` (or ``/kms``) with a camelCase
``BootInfo`` and acts on ``{isAllowed, reason, gatewayAppId}``. This module holds the wire types,
auth-simple's config model and its pure decision (same order and reason strings as dstack's
``kms/auth-simple``), and three authorizers behind one protocol:

    DevAuth      allows every boot (dstack's ``type = "dev"``); never chosen by default
    ConfigAuth   the built-in auth-simple: re-reads its JSON file on every request
    WebhookAuth  asks a remote auth service; anything but a well-formed 2xx reply is a PeerError

Authorization fails closed: an unreadable config is a denial with a reason; a broken webhook is
a PeerError, which no caller takes for "allowed": the KMS answers 503 (try another KMS), the
auth server answers a denial.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, cast, get_args

import httpx
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
)
from pydantic.alias_generators import to_camel

from teemesh.config import MAX_CONFIG_LEN, ConfigError, Frozen, parse_model
from teemesh.encoding import load_json, parse_hex
from teemesh.errors import InputError, PeerError

BootKind = Literal["app", "kms"]
"""A CVM running an app, or a KMS (itself, a peer, or the source it onboards from)."""
BOOT_KINDS: tuple[str, ...] = get_args(BootKind)
ZERO_ADDRESS = "0x" + "00" * 20
MAX_REPLY = 1024 * 1024


class BootReason(StrEnum):
    """auth-simple's refusals, word for word (KMS operators grep their logs for them)."""

    TCB_STATUS = "TCB status is not allowed"
    ADVISORY = "advisory ID is not allowed"
    OS_IMAGE = "OS image is not allowed"
    KMS_MR = "aggregated MR not allowed"
    KMS_DEVICE = "KMS is not allowed to boot on this device"
    APP_NOT_REGISTERED = "app not registered"
    COMPOSE_HASH = "compose hash not allowed"
    APP_DEVICE = "app is not allowed to boot on this device"


# --------------------------------------------------------------------------- wire types

_HEX_FIELDS = {
    "mr_aggregated": "mrAggregated",
    "os_image_hash": "osImageHash",
    "mr_system": "mrSystem",
    "app_id": "appId",
    "compose_hash": "composeHash",
    "instance_id": "instanceId",
    "device_id": "deviceId",
    "key_provider_info": "keyProviderInfo",
}
_OPTIONAL_HEX = frozenset({"mrSystem", "keyProviderInfo"})
"""auth-simple accepts requests without these (older KMS releases do not send them)."""


@dataclass(frozen=True, kw_only=True)
class BootInfo:
    """What the KMS learnt from a verified attestation: bytes here, plain hex on the wire."""

    mr_aggregated: bytes
    os_image_hash: bytes
    app_id: bytes
    compose_hash: bytes
    instance_id: bytes
    device_id: bytes
    tee_variant: str = ""
    mr_system: bytes = b""
    key_provider_info: bytes = b""
    tcb_status: str = ""
    advisory_ids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"teeVariant": self.tee_variant}
        doc.update({wire: getattr(self, name).hex() for name, wire in _HEX_FIELDS.items()})
        doc["tcbStatus"] = self.tcb_status
        doc["advisoryIds"] = list(self.advisory_ids)
        return doc

    @classmethod
    def from_json(cls, doc: object) -> BootInfo:
        """Parse the camelCase form; hex may carry ``0x``. Unknown keys are ignored, as upstream."""
        if not isinstance(doc, dict):
            raise InputError(f"expected a JSON object, got {_json_type(doc)}", field="BootInfo")
        values: dict[str, Any] = {}
        for name, wire in _HEX_FIELDS.items():
            if wire in doc:
                values[name] = parse_hex(doc[wire], field=wire)
            elif wire not in _OPTIONAL_HEX:
                raise InputError("missing", field=wire)
        # Older dstack KMS releases call the TEE variant ``attestationMode``.
        variant_key = "teeVariant" if "teeVariant" in doc else "attestationMode"
        values["tee_variant"] = _string(doc, variant_key)
        values["tcb_status"] = _string(doc, "tcbStatus")
        advisories = doc.get("advisoryIds", [])
        if not isinstance(advisories, list):
            raise InputError(
                f"expected an array, got {_json_type(advisories)}", field="advisoryIds"
            )
        for i, advisory in enumerate(advisories):
            if not isinstance(advisory, str):
                raise InputError(
                    f"expected a string, got {_json_type(advisory)}", field=f"advisoryIds[{i}]"
                )
        values["advisory_ids"] = tuple(advisories)
        return cls(**values)


@dataclass(frozen=True)
class BootDecision:
    """The answer; ``reason`` is empty when allowed, and says why when not."""

    is_allowed: bool
    reason: str
    gateway_app_id: str = ""

    @classmethod
    def deny(cls, reason: str, gateway_app_id: str = "") -> BootDecision:
        return cls(False, reason, gateway_app_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "isAllowed": self.is_allowed,
            "reason": self.reason,
            "gatewayAppId": self.gateway_app_id,
        }

    @classmethod
    def from_json(cls, doc: object) -> BootDecision:
        """Strict, as dstack's KMS is: all three fields, each of the right type."""
        if not isinstance(doc, dict):
            raise InputError(f"expected a JSON object, got {_json_type(doc)}", field="BootDecision")
        allowed = doc.get("isAllowed")
        if not isinstance(allowed, bool):
            raise InputError(
                f"expected true or false, got {_json_type(allowed)}", field="isAllowed"
            )
        reason = _string(doc, "reason", required=True)
        return cls(allowed, reason, _string(doc, "gatewayAppId", required=True))


@dataclass(frozen=True, kw_only=True)
class AuthInfo:
    """The auth service's metadata, which the KMS republishes in ``GetMeta``."""

    gateway_app_id: str = ""
    kms_contract_addr: str = ZERO_ADDRESS
    chain_id: int = 0
    app_implementation: str = ZERO_ADDRESS
    is_dev: bool = False
    """Dev mode: GetMeta then reports is_dev and leaves the contract fields out."""

    def to_json(self) -> dict[str, Any]:
        """The ``GET /`` reply; ``appAuthImplementation`` repeats ``appImplementation``."""
        return {
            "status": "ok",
            "kmsContractAddr": self.kms_contract_addr,
            "gatewayAppId": self.gateway_app_id,
            "chainId": self.chain_id,
            "appImplementation": self.app_implementation,
            "appAuthImplementation": self.app_implementation,
        }

    @classmethod
    def from_json(cls, doc: object) -> AuthInfo:
        if not isinstance(doc, dict):
            raise InputError(f"expected a JSON object, got {_json_type(doc)}", field="info")
        if doc.get("status") != "ok":
            raise InputError(f'expected "ok", got {doc.get("status")!r}', field="status")
        chain_id = doc.get("chainId")
        if not isinstance(chain_id, int) or isinstance(chain_id, bool) or chain_id < 0:
            raise InputError(f"expected an unsigned integer, got {chain_id!r}", field="chainId")
        return cls(
            gateway_app_id=_string(doc, "gatewayAppId", required=True),
            kms_contract_addr=_string(doc, "kmsContractAddr", required=True),
            chain_id=chain_id,
            app_implementation=_string(doc, "appImplementation", required=True),
        )


def _string(doc: dict[Any, Any], key: str, *, required: bool = False) -> str:
    if key not in doc:
        if required:
            raise InputError("missing", field=key)
        return ""
    value = doc[key]
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {_json_type(value)}", field=key)
    return value


_JSON_TYPES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (type(None), "null"),
    (bool, "a boolean"),  # before int: a bool is an int in Python
    ((int, float), "a number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "an object"),
)


def _json_type(value: object) -> str:
    """The JSON name of a value's type, for error messages read by non-Python peers."""
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), "a value")


# --------------------------------------------------------------------------- auth-simple config


def _normal_hex(value: str) -> str:
    try:
        return parse_hex(value, field="value").hex()
    except InputError as exc:
        raise ValueError(exc.problem) from exc


Hex = Annotated[StrictStr, AfterValidator(_normal_hex)]
"""Hex with or without ``0x``, in any case; stored lowercase without ``0x``."""


class _Model(Frozen):
    model_config = ConfigDict(alias_generator=to_camel)


class DeviceRule(_Model):
    devices: tuple[Hex, ...] = ()
    allow_any_device: StrictBool = False

    def admits_device(self, device_id: bytes) -> bool:
        """auth-simple's rule: an empty device list admits any device, like allowAnyDevice."""
        return self.allow_any_device or not self.devices or device_id.hex() in self.devices


class KmsRule(DeviceRule):
    mr_aggregated: tuple[Hex, ...] = ()
    """An empty list admits no KMS."""


class AppRule(DeviceRule):
    compose_hashes: tuple[Hex, ...] = ()


class AuthSimpleConfig(_Model):
    """auth-simple's config file (camelCase JSON); unknown keys are errors, so typos show."""

    gateway_app_id: StrictStr = ""
    kms_contract_addr: StrictStr = ZERO_ADDRESS
    chain_id: Annotated[StrictInt, Field(ge=0, lt=2**64)] = 0
    app_implementation: StrictStr = ZERO_ADDRESS
    os_images: tuple[Hex, ...] = ()
    allowed_tcb_statuses: tuple[StrictStr, ...] = ("UpToDate",)
    allowed_advisory_ids: tuple[StrictStr, ...] = ()
    kms: KmsRule = Field(default_factory=KmsRule)
    apps: Mapping[Hex, AppRule] = Field(default_factory=dict)
    """Keyed by app id; ``0xAB..`` and ``ab..`` name the same app."""

    @field_validator("apps", mode="before")
    @classmethod
    def _one_entry_per_app(cls, value: object) -> object:
        if isinstance(value, dict):
            seen: dict[str, str] = {}
            for key in value:
                try:
                    app_id = parse_hex(key, field="apps").hex()
                except InputError:
                    continue  # reported by the key's own validation
                if app_id in seen:
                    raise ValueError(f"app {app_id} is listed twice ({seen[app_id]!r}, {key!r})")
                seen[app_id] = key
        return value

    def auth_info(self) -> AuthInfo:
        return AuthInfo(
            gateway_app_id=self.gateway_app_id,
            kms_contract_addr=self.kms_contract_addr,
            chain_id=self.chain_id,
            app_implementation=self.app_implementation,
        )


def parse_auth_config(data: bytes | str, *, source: str) -> AuthSimpleConfig:
    """Parse auth-simple's JSON config; every problem is reported at once, each with its path."""
    if len(data) > MAX_CONFIG_LEN:
        raise ConfigError(source, [f"file larger than {MAX_CONFIG_LEN} bytes"])
    try:
        doc = load_json(data, field="(top level)")
    except InputError as exc:
        raise ConfigError(source, [str(exc)]) from exc
    return parse_model(AuthSimpleConfig, doc, source=source)


def load_auth_config(path: Path) -> AuthSimpleConfig:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_LEN + 1)
    except OSError as exc:
        raise ConfigError(str(path), [exc.strerror or str(exc)]) from exc
    return parse_auth_config(data, source=str(path))


# --------------------------------------------------------------------------- the decision


def decide(config: AuthSimpleConfig, info: BootInfo, kind: BootKind) -> BootDecision:
    """auth-simple's checks, in its order; the first that fails is the reason."""
    refusal = _refusal(config, info, _checked_kind(kind))
    if refusal is None:
        return BootDecision(True, "", config.gateway_app_id)
    return BootDecision.deny(refusal, config.gateway_app_id)


def _refusal(config: AuthSimpleConfig, info: BootInfo, kind: BootKind) -> BootReason | None:
    if info.tcb_status not in config.allowed_tcb_statuses:
        return BootReason.TCB_STATUS
    if any(advisory not in config.allowed_advisory_ids for advisory in info.advisory_ids):
        return BootReason.ADVISORY
    if info.os_image_hash.hex() not in config.os_images:
        return BootReason.OS_IMAGE
    return _kms_refusal(config.kms, info) if kind == "kms" else _app_refusal(config, info)


def _kms_refusal(rule: KmsRule, info: BootInfo) -> BootReason | None:
    if info.mr_aggregated.hex() not in rule.mr_aggregated:
        return BootReason.KMS_MR
    if not rule.admits_device(info.device_id):
        return BootReason.KMS_DEVICE
    return None


def _app_refusal(config: AuthSimpleConfig, info: BootInfo) -> BootReason | None:
    app = config.apps.get(info.app_id.hex())
    if app is None:
        return BootReason.APP_NOT_REGISTERED
    if info.compose_hash.hex() not in app.compose_hashes:
        return BootReason.COMPOSE_HASH
    if not app.admits_device(info.device_id):
        return BootReason.APP_DEVICE
    return None


def _checked_kind(kind: str) -> BootKind:
    if kind not in BOOT_KINDS:
        raise InputError(f"expected one of {', '.join(BOOT_KINDS)}, got {kind!r}", field="kind")
    return cast(BootKind, kind)


# --------------------------------------------------------------------------- authorizers


class BootAuthorizer(Protocol):
    def authorize(self, info: BootInfo, kind: BootKind) -> BootDecision:
        """Decide one boot; PeerError when it cannot (a webhook down or talking nonsense).

        Callers fail closed on it, each its own way: the auth server answers a denial, as
        auth-simple does; the KMS answers 503, so a CVM asks another KMS instead of giving up.
        """
        ...

    def info(self) -> AuthInfo:
        """Metadata for ``GET /`` and GetMeta; raises MeshError when it cannot be had."""
        ...


@dataclass(frozen=True)
class DevAuth:
    """Allows every boot: for development only, and only when asked for by name."""

    gateway_app_id: str

    def authorize(self, info: BootInfo, kind: BootKind) -> BootDecision:
        _checked_kind(kind)
        return BootDecision(True, "", self.gateway_app_id)

    def info(self) -> AuthInfo:
        return AuthInfo(gateway_app_id=self.gateway_app_id, is_dev=True)


@dataclass(frozen=True)
class ConfigAuth:
    """auth-simple from a file read on every request, so an edit takes effect at once."""

    path: Path

    def load(self) -> AuthSimpleConfig:
        return load_auth_config(self.path)

    def authorize(self, info: BootInfo, kind: BootKind) -> BootDecision:
        kind = _checked_kind(kind)
        try:
            config = self.load()
        except ConfigError as exc:
            problems = "; ".join(exc.problems)
            return BootDecision.deny(f"auth config {exc.source} is invalid: {problems}")
        return decide(config, info, kind)

    def info(self) -> AuthInfo:
        return self.load().auth_info()


@dataclass(frozen=True)
class WebhookAuth:
    """A remote auth service (auth-simple, auth-eth, ...); no decision is cached between calls."""

    url: str
    timeout: float = 10.0
    transport: httpx.BaseTransport | None = field(default=None, compare=False, repr=False)
    """For tests: an in-memory transport instead of the network."""
    _client: httpx.Client = field(init=False, compare=False, repr=False)
    """One pooled client: a new one per call costs ~25 ms (TLS and pool set-up)."""

    def __post_init__(self) -> None:
        try:
            parsed = httpx.URL(self.url)
        except httpx.InvalidURL as exc:
            raise InputError(str(exc), field="url") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InputError(f"expected an http(s) URL, got {self.url!r}", field="url")
        if not self.timeout > 0:
            raise InputError(
                f"expected a positive number of seconds, got {self.timeout}", field="timeout"
            )
        client = httpx.Client(timeout=self.timeout, transport=self.transport)
        object.__setattr__(self, "_client", client)  # frozen: set once, here

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> WebhookAuth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def authorize(self, info: BootInfo, kind: BootKind) -> BootDecision:
        url = self._join(f"bootAuth/{_checked_kind(kind)}")
        doc = self._call("POST", url, info.to_json())
        try:
            return BootDecision.from_json(doc)
        except InputError as exc:
            raise PeerError(f"auth webhook {url} sent a malformed reply: {exc}") from exc

    def info(self) -> AuthInfo:
        url = self._join("")
        try:
            return AuthInfo.from_json(self._call("GET", url, None))
        except InputError as exc:
            raise PeerError(f"auth webhook {url} sent a malformed reply: {exc}") from exc

    def _join(self, path: str) -> str:
        return self.url.rstrip("/") + "/" + path

    def _call(self, method: str, url: str, body: object) -> Any:
        """One request; every way it can go wrong becomes a PeerError naming what happened."""
        try:
            with self._client.stream(method, url, json=body) as reply:
                data = bytearray()
                for chunk in reply.iter_bytes():
                    data += chunk
                    if len(data) > MAX_REPLY:
                        raise PeerError(f"auth webhook {url} sent a reply over {MAX_REPLY} bytes")
        except httpx.TimeoutException as exc:
            raise PeerError(f"auth webhook {url} timed out after {self.timeout:g} s") from exc
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise PeerError(f"auth webhook {url} failed: {problem}") from exc
        if not reply.is_success:
            snippet = bytes(data[:200]).decode(errors="replace").strip()
            raise PeerError(f"auth webhook {url} answered HTTP {reply.status_code}: {snippet}")
        try:
            return load_json(bytes(data), field="body")
        except InputError as exc:
            raise PeerError(f"auth webhook {url} sent a malformed reply: {exc}") from exc
