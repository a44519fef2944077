"""dstack-vpc's VPC API, the pure parts: allowlist, parameters, node records, reply shapes.

The JSON shapes and status codes are dstack-vpc's ``vpc-api-server`` (so its nodes and scripts
work unchanged); what differs is underneath. Nodes live in the shared store (they survive
restarts and every coordinator sees them), can be deleted, and are checked before they are
kept. No Headscale pre-auth key is ever minted: admission by attestation replaced it.
dstack-vpc's ``etcd`` special case (an etcd update deletes every other etcd node) is not kept:
it makes a multi-member etcd undiscoverable, and stale nodes are now deleted explicitly.

Nodes have owners, which dstack-vpc's do not: a node records the app (from the creator's
verified SVID) that created it, and only that app may update or delete it; a node written
before owners were recorded is claimed by the first app that updates it (or may be deleted by
any allowed app). The owner is kept in the store only: the replies keep dstack-vpc's shapes.
The catalog store is shared with the whole mesh, so what callers can put in it is bounded:
``MAX_NODES_PER_APP`` nodes per app and ``MAX_NODES`` in all, each one a few hundred bytes at
most; ``/api/nodes`` and discovery, bounded by these, stay unpaginated as in dstack-vpc.

Pure: no store, no HTTP. ``http_vpc`` does the I/O around these.

Store keys (relative to the cluster's prefix):
  vpc/nodes/<uuid>                  Node (``Node.to_bytes``: as listed, plus its owner)
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

from teemesh.errors import InputError, MeshError

NODES = "vpc/nodes/"
ANY = "any"
ETCD = "etcd"
DISCOVERED_ETCD_PORT = 2379
"""The port in discovery's ``hostname_with_port`` for etcd nodes (dstack-vpc's: etcd's default)."""
MAX_NODES_PER_APP = 256
"""Nodes one app may hold; its next create is refused (429) until it deletes one."""
MAX_NODES = 4096
"""Nodes in all, whichever apps hold them."""
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


class NodeLimit(MeshError):
    """A create would take an app, or the whole store, past its node limit (429)."""


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
class Owner:
    """Who created a node: the app id (lowercase hex) from its verified SVID decides who may
    change it; the group and peer are kept to say who in the log."""

    app_id: str
    group: str = ""
    peer_id: str = ""

    @property
    def peer(self) -> str:
        return f"{self.group}/{self.peer_id}"

    def __str__(self) -> str:
        return f"app {self.app_id} ({self.peer})"


@dataclass(frozen=True)
class Node:
    """dstack-vpc's ``NodeInfo``: its ``name`` is always the uuid, so it is not stored.

    ``owner``: None only in a record written before owners were recorded."""

    uuid: str
    node_type: str = ""
    tailscale_ip: str | None = None
    hostname: str | None = None
    owner: Owner | None = None

    def to_json(self) -> dict[str, Any]:
        """As dstack-vpc lists it: no owner."""
        return {
            "uuid": self.uuid,
            "name": self.uuid,
            "node_type": self.node_type,
            "tailscale_ip": self.tailscale_ip,
            "actual_hostname": self.hostname,
        }

    def to_bytes(self) -> bytes:
        doc = self.to_json()
        del doc["name"]
        if self.owner is not None:
            o = self.owner
            doc["owner"] = {"app_id": o.app_id, "group": o.group, "peer_id": o.peer_id}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, value: bytes) -> Node:
        doc = json.loads(value)
        o = doc.get("owner")
        owner = None if o is None else Owner(o["app_id"], o["group"], o["peer_id"])
        return cls(
            doc["uuid"], doc["node_type"], doc["tailscale_ip"], doc["actual_hostname"], owner
        )


def may_change(node: Node, app_id: str) -> bool:
    """Only the app that created a node may update or delete it; a node without an owner
    (written before owners were recorded) any allowed app may."""
    return node.owner is None or node.owner.app_id == app_id.lower()


def merge(held: Node | None, update: NodeUpdate, owner: Owner) -> Node:
    """A new node of ``owner`` from the update, or the held one with the fields the update
    carries (and ``owner`` if it had none). The caller checks ``may_change`` first."""
    base = held if held is not None else Node(update.uuid)
    changes: dict[str, Any] = {
        "node_type": update.node_type,
        "tailscale_ip": update.tailscale_ip,
        "hostname": update.hostname,
        "owner": owner if base.owner is None else None,
    }
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


def check_room(nodes: Iterable[Node], app_id: str) -> None:
    """Raise NodeLimit if ``app_id`` may not create one more node next to ``nodes``.

    Checked against a snapshot, so coordinators creating at the same instant may each pass:
    the limits can be overshot by the creates in flight at once, not more."""
    app_id = app_id.lower()
    total = mine = 0
    for node in nodes:
        total += 1
        mine += node.owner is not None and node.owner.app_id == app_id
    if mine >= MAX_NODES_PER_APP:
        raise NodeLimit(
            f"app {app_id} already has {mine} nodes, the limit is {MAX_NODES_PER_APP}: "
            "delete one (DELETE /api/nodes/<uuid>) before creating another"
        )
    if total >= MAX_NODES:
        raise NodeLimit(f"the VPC already has {total} nodes, the limit is {MAX_NODES}")


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
            entry["hostname_with_port"] = f"{node.hostname}:{DISCOVERED_ETCD_PORT}"
        found.append(entry)
    if not found:
        return None
    return {"nodes": found, "count": len(found), "node_type": node_type}


def nodes_reply(nodes: Iterable[Node]) -> dict[str, Any]:
    listed = [n.to_json() for n in nodes]
    return {"nodes": listed, "count": len(listed)}
