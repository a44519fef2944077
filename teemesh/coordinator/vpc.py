"""dstack-vpc's VPC API, the pure parts: allowlist, parameters, node records, reply shapes.

The JSON shapes and status codes are dstack-vpc's ``vpc-api-server`` (so its nodes and scripts
work unchanged); what differs is underneath. Nodes live in the shared store (they survive
restarts and every coordinator sees them), can be deleted, and are checked before they are
kept. No Headscale pre-auth key is ever minted: admission by attestation replaced it.
dstack-vpc's ``etcd`` special case (an etcd update deletes every other etcd node) is not kept:
it makes a multi-member etcd undiscoverable, and stale nodes are now deleted explicitly.

Pure: no store, no HTTP. ``http_vpc`` does the I/O around these.

Store keys (relative to the cluster's prefix):
  vpc/nodes/<uuid>                  Node, as ``/api/nodes`` lists it
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teemesh.errors import InputError

NODES = "vpc/nodes/"
ANY = "any"
ETCD = "etcd"
ETCD_CLIENT_PORT = 2379
SHARED_KEY_PATH = "teemesh/vpc-shared-key/v1"
"""The GetKey path of the coordinator app the VPC shared key is derived from."""
SHARED_KEY_LEN = 64

_APP_ID = re.compile(r"[0-9a-f]{40}")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""uuid, instance_id: one store key segment, so no '/' and bounded."""
_NODE_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_HOST_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*")
MAX_HOSTNAME = 253
MAX_IP_TEXT = 64

Query = Sequence[tuple[str, str]]
"""Query parameters as sent, repeats included (``request.query_params.multi_items()``)."""


class MissingParameter(InputError):
    """A required parameter is absent: dstack's exact 400 reply, ``{"error": <message>}``."""


# -- allowlist -------------------------------------------------------------------------------


def parse_allowed_apps(value: object) -> tuple[str, ...]:
    """``ALLOWED_APPS`` as dstack-vpc reads it, from a string or a list of strings.

    Entries are split on ',', trimmed, empties dropped, lowercased. Each is ``any`` or an app id
    (40 hex digits): a typo would otherwise deny its app silently. Empty denies everyone.
    """
    if isinstance(value, str):
        items: list[object] = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError("expected 'any', a comma-separated string or a list of app ids")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a string")
        for part in item.split(","):
            entry = part.strip().lower()
            if not entry:
                continue
            if entry != ANY and not _APP_ID.fullmatch(entry):
                raise ValueError(f"{part.strip()[:80]!r} is neither 'any' nor an app id (40 hex)")
            if entry not in out:
                out.append(entry)
    return tuple(out)


def app_allowed(allowed: Sequence[str], app_id: str) -> bool:
    """``any`` anywhere allows every app; otherwise the app id, compared case-insensitively."""
    return ANY in allowed or app_id.lower() in allowed


# -- parameters ------------------------------------------------------------------------------


def _params(items: Query, names: tuple[str, ...]) -> dict[str, str]:
    """The named parameters that are present and non-empty (dstack: empty means absent).

    A repeated parameter is refused: which copy counts would be the server's guess.
    """
    out: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in items:
        if name not in names:
            continue  # dstack ignores what it does not know
        if name in seen:
            raise InputError(f"{name} is given more than once", field=name)
        seen.add(name)
        if value:
            out[name] = value
    return out


def _show(value: str) -> str:
    return repr(value[:80])


def check_token(value: str, field: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise InputError(
            f"{_show(value)} is not a valid {field} (1 to 128 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit)",
            field=field,
        )
    return value


def check_node_type(value: str) -> str:
    if not _NODE_TYPE.fullmatch(value):
        raise InputError(
            f"{_show(value)} is not a valid node_type (1 to 63 of A-Z a-z 0-9 _ -)",
            field="node_type",
        )
    return value


def check_hostname(value: str, field: str) -> str:
    if len(value) > MAX_HOSTNAME or not _HOSTNAME.fullmatch(value):
        raise InputError(f"{_show(value)} is not a host name", field=field)
    return value


def check_ip(value: str, field: str = "tailscale_ip") -> str:
    """An IPv4 or IPv6 address, kept in its canonical text (so equal addresses compare equal)."""
    try:
        if len(value) > MAX_IP_TEXT:
            raise ValueError
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InputError(f"{_show(value)} is not an IP address", field=field) from None


@dataclass(frozen=True)
class RegisterRequest:
    instance_id: str
    node_name: str


def parse_register(items: Query) -> RegisterRequest:
    """``instance_id`` required; ``node_name`` defaults to ``node-<instance_id>`` (only logged)."""
    params = _params(items, ("instance_id", "node_name"))
    if "instance_id" not in params:
        raise MissingParameter("Missing required parameters", field="instance_id")
    instance_id = check_token(params["instance_id"], "instance_id")
    node_name = params.get("node_name")
    if node_name is not None:
        check_hostname(node_name, "node_name")
    return RegisterRequest(instance_id, node_name or f"node-{instance_id}")


@dataclass(frozen=True)
class NodeUpdate:
    """What ``/api/nodes/update`` carries; None: not sent, so kept as it was."""

    uuid: str
    node_type: str | None = None
    tailscale_ip: str | None = None
    hostname: str | None = None


def parse_update(items: Query) -> NodeUpdate:
    params = _params(items, ("uuid", "node_type", "tailscale_ip", "hostname"))
    if "uuid" not in params:
        raise MissingParameter("uuid parameter is required", field="uuid")
    node_type, ip, host = (params.get(n) for n in ("node_type", "tailscale_ip", "hostname"))
    return NodeUpdate(
        uuid=check_token(params["uuid"], "uuid"),
        node_type=None if node_type is None else check_node_type(node_type),
        tailscale_ip=None if ip is None else check_ip(ip),
        hostname=None if host is None else check_hostname(host, "hostname"),
    )


# -- node records ----------------------------------------------------------------------------


def node_key(uuid: str) -> str:
    return f"{NODES}{uuid}"


@dataclass(frozen=True)
class Node:
    """dstack-vpc's ``NodeInfo``: its ``name`` is always the uuid, so it is not stored."""

    uuid: str
    node_type: str = ""
    tailscale_ip: str | None = None
    hostname: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.uuid,
            "node_type": self.node_type,
            "tailscale_ip": self.tailscale_ip,
            "actual_hostname": self.hostname,
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, value: bytes) -> Node:
        doc = json.loads(value)
        return cls(doc["uuid"], doc["node_type"], doc["tailscale_ip"], doc["actual_hostname"])


def merge(held: Node | None, update: NodeUpdate) -> Node:
    """A new node from the update, or the held one with the fields the update carries."""
    base = held if held is not None else Node(update.uuid)
    changes = {
        "node_type": update.node_type,
        "tailscale_ip": update.tailscale_ip,
        "hostname": update.hostname,
    }
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


# -- replies ---------------------------------------------------------------------------------


def derive_shared_key(secret: bytes) -> bytes:
    """The nodes' shared key from the coordinator app's GetKey secret: the same in every
    replica and across restarts, and nothing to store. HKDF-SHA256, 64 bytes, as dstack-vpc's
    random one."""
    info = b"teemesh vpc shared key v1"
    return HKDF(hashes.SHA256(), SHARED_KEY_LEN, b"teemesh-vpc", info).derive(secret)


def register_reply(shared_key: bytes, server_url: str) -> dict[str, Any]:
    """``pre_auth_key`` is null: a node got here with an admitted SVID, which is its admission;
    a reusable key that admits whoever holds it is what attestation replaces."""
    return {
        "pre_auth_key": None,
        "shared_key": base64.b64encode(shared_key).decode(),
        "server_url": server_url,
    }


def discover_reply(nodes: Iterable[Node], node_type: str) -> dict[str, Any] | None:
    """The ``node_type`` nodes that have a host name; None when there are none (404)."""
    found = []
    for node in nodes:
        if node.node_type != node_type or not node.hostname:
            continue
        entry: dict[str, Any] = {
            "hostname": node.hostname,
            "tailscale_ip": node.tailscale_ip,
            "uuid": node.uuid,
        }
        if node_type == ETCD:
            entry["hostname_with_port"] = f"{node.hostname}:{ETCD_CLIENT_PORT}"
        found.append(entry)
    if not found:
        return None
    return {"nodes": found, "count": len(found), "node_type": node_type}


def nodes_reply(nodes: Iterable[Node]) -> dict[str, Any]:
    listed = [n.to_json() for n in nodes]
    return {"nodes": listed, "count": len(listed)}
