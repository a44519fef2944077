"""The sidecar on dstack: its configuration is the app-compose its CVM was measured by.

``teemesh render`` writes each app's sidecar settings into the app-compose (the ``teemesh``
section), so what the sidecar does is exactly what the compose hash pins and the coordinator's
policy admits. What differs between replicas of one app cannot be measured (they share a compose
hash), so it comes from the app's environment (dstack's encrypted env, whose names alone are
measured as ``allowed_envs``): the peer id, the address other sidecars dial, the coordinators'
URLs, and on a simulated TEE the platform key. Pure: Info's app-compose and an environment in,
the sidecar's configuration document out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from teemesh.errors import InputError

ENV_PEER_ID = "TEEMESH_PEER_ID"
"""The replica's peer id, ``<group>-<index>``: what the policy's ``peer_ids`` admit."""
ENV_INDEX = "TEEMESH_INDEX"
ENV_ADDRESS = "TEEMESH_ADDRESS"
"""Where other sidecars reach this CVM (its address in the cluster's network)."""
ENV_COORDINATORS = "TEEMESH_COORDINATORS"
"""The coordinators' URLs, comma-separated (``https://host:8443,...``)."""
ENV_PLATFORM_KEY = "TEEMESH_PLATFORM_KEY"
"""tee: simulated only: the simulated platform's public key (PEM), which no real TEE has."""
ENV_VIA_GATEWAY = "TEEMESH_VIA_GATEWAY"
"""transport: gateway only: the gateway's ``host:port``."""
ENV_GATEWAY_CERT = "TEEMESH_GATEWAY_CERT"
ENV_GATEWAY_KEY = "TEEMESH_GATEWAY_KEY"
"""The gateway app only: its public certificate chain and key (PEM)."""
REPLICA_ENV = (ENV_PEER_ID, ENV_INDEX, ENV_ADDRESS, ENV_COORDINATORS)
SECTION = "teemesh"
MAX_COORDINATORS = 16


def measured_section(info: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The ``teemesh`` section of the app-compose in the agent's ``Info``, and its compose
    hash (hex). Refuses an app-compose that does not hash to the compose hash Info reports."""
    try:
        tcb = json.loads(info["tcb_info"]) if isinstance(info["tcb_info"], str) else {}
        text = tcb["app_compose"]
        reported = str(tcb.get("compose_hash") or info.get("compose_hash") or "").lower()
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise InputError("the agent's Info has no tcb_info.app_compose", field="Info") from exc
    if not isinstance(text, str):
        raise InputError("tcb_info.app_compose is not text", field="Info")
    try:
        digest = hashlib.sha256(text.encode()).hexdigest()
    except UnicodeEncodeError as exc:  # a lone surrogate, which JSON escapes can carry
        raise InputError("tcb_info.app_compose is not UTF-8 text", field="Info") from exc
    if reported != digest:
        raise InputError(
            f"the app-compose hashes to {digest}, not to the compose hash the agent measured "
            f"({reported or 'none'})",
            field="Info",
        )
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"the app-compose is not JSON: {exc}", field="app-compose") from exc
    section = doc.get(SECTION) if isinstance(doc, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("sidecar"), dict):
        raise InputError(
            f"this app's compose has no {SECTION}.sidecar section: it was not rendered by "
            "teemesh render, or its group runs no sidecar",
            field="app-compose",
        )
    return section, digest


def pem_from_env(value: str) -> str:
    """PEM text from an env value: as is, or on one line with ``\\n`` for its line breaks (an
    env file holds one line per variable); it ends with a newline, as PEM files do."""
    text = value.strip()
    if "\n" not in text:
        text = text.replace("\\n", "\n")
    return text.strip() + "\n"


def dstack_sidecar_config(
    section: Mapping[str, Any],
    compose_hash: str,
    env: Mapping[str, str],
    *,
    gateway_files: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The sidecar configuration of this replica: the measured ``section`` completed by ``env``.

    A coordinator CVM's sidecar (the DCS) pins its coordinators by its own compose hash (its
    section cannot hold it: that would change the hash). The gateway app's sidecar takes its
    certificate and key from ``gateway_files`` (where the caller wrote ``ENV_GATEWAY_CERT`` and
    ``ENV_GATEWAY_KEY``; None when they are not set). Every missing variable is reported
    together."""
    sidecar = dict(section["sidecar"])
    for name in ("coordinator_policy", "via_gateway", "gateway"):
        if name in sidecar and not isinstance(sidecar[name], Mapping):
            raise InputError("expected a mapping", field=f"{SECTION}.sidecar.{name}")
    problems: list[str] = []

    def need(name: str) -> str:
        value = env.get(name, "").strip()
        if not value:
            problems.append(f"{name}: not set (give it in the app's environment)")
        return value

    peer_id, address = need(ENV_PEER_ID), need(ENV_ADDRESS)
    listed = need(ENV_COORDINATORS)
    coordinators = [u.strip() for u in listed.split(",") if u.strip()]
    if listed and not coordinators:
        problems.append(f"{ENV_COORDINATORS}: no URL in {listed!r}")
    if len(coordinators) > MAX_COORDINATORS:
        problems.append(f"{ENV_COORDINATORS}: more than {MAX_COORDINATORS} URLs")
    pin = dict(sidecar.get("coordinator_policy") or {})
    if "compose_hashes" not in pin:
        pin["compose_hashes"] = [compose_hash]
    if pin.get("tee") == "simulated":
        pin["platform_key"] = pem_from_env(need(ENV_PLATFORM_KEY))
    extra: dict[str, Any] = {}
    if "via_gateway" in sidecar:
        extra["via_gateway"] = dict(sidecar["via_gateway"]) | {"address": need(ENV_VIA_GATEWAY)}
    if "gateway" in sidecar:
        if gateway_files is None:
            problems.append(
                f"{ENV_GATEWAY_CERT}, {ENV_GATEWAY_KEY}: not set (the gateway's certificate "
                "chain and key, PEM)"
            )
        else:
            certificate, key = gateway_files
            extra["gateway"] = dict(sidecar["gateway"]) | {"certificate": certificate, "key": key}
    if problems:
        raise InputError("; ".join(problems), field="environment")
    own = {"peer_id": peer_id, "address": address, "coordinators": coordinators}
    return sidecar | extra | own | {"coordinator_policy": pin}
