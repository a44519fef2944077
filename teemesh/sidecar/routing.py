"""Which instance a new connection goes to: pure decisions over the catalog as last seen.

An instance serves a route when it registered the route's backend, is not critical, carries
``role=<role>`` for a route with a role, and has the peer id of a route to one peer. Among
those, the one with the fewest open tunnels from this sidecar wins, ties going round-robin; an
instance that failed to connect is ejected for a while and only tried when nothing else is left.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from teemesh.sidecar.config import Route

ROLE_TAG = "role"


@dataclass(frozen=True)
class Instance:
    key: str
    service: str
    group: str
    peer_id: str
    address: str
    port: int
    tags: dict[str, str] = field(compare=False, hash=False)
    health: str = "passing"
    instance_id: str | None = None
    app_id: str | None = None

    @classmethod
    def from_value(cls, key: str, value: Any) -> Instance | None:
        """A catalog entry as an instance; None for an entry this sidecar cannot use."""
        if isinstance(value, bytes | str):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        if not isinstance(value, dict):
            return None
        try:
            tags = value.get("tags") or {}
            instance = cls(
                key, str(value["service"]), str(value["group"]), str(value["peer_id"]),
                str(value["address"]), int(value["port"]),
                {str(k): str(v) for k, v in tags.items()}, str(value.get("health", "passing")),
                _optional_str(value.get("instance_id")), _optional_str(value.get("app_id")),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            return None
        return instance if 1 <= instance.port <= 65535 else None

    def serves(self, route: Route) -> bool:
        if self.service != route.backend or self.health == "critical":
            return False
        if route.peer is not None and self.peer_id != route.peer:
            return False
        return route.role is None or self.tags.get(ROLE_TAG) == route.role


def live_instances_of(instances: Iterable[Instance], id: str) -> tuple[list[Instance], bool]:
    """The non-critical catalog entries of the instance ``id`` names, else of the app it
    names; True when it names an instance. The gateway's SNI routing and
    the client proxy's target headers name instances this way, as dstack's gateway does."""
    live = [i for i in instances if i.health != "critical"]
    found = [i for i in live if i.instance_id == id]
    if found:
        return found, True
    return [i for i in live if i.app_id == id], False


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


class InstanceTable:
    """The ``instances/`` prefix of the catalog, kept current from a watch."""

    PREFIX = "instances/"

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}

    def load(self, snapshot: dict[str, Any]) -> None:
        self.instances = {}
        for key, value in snapshot.items():
            self.put(key, value)

    def put(self, key: str, value: Any) -> set[str]:
        """Store one entry; the services whose instances it changed (old and new)."""
        instance = Instance.from_value(key, value)
        touched = self.delete(key)
        if instance is not None:
            self.instances[key] = instance
            touched.add(instance.service)
        return touched

    def delete(self, key: str) -> set[str]:
        old = self.instances.pop(key, None)
        return set() if old is None else {old.service}

    def apply(self, events: Iterable[dict[str, Any]]) -> set[str]:
        """Apply watch events; the services whose instances they changed."""
        touched: set[str] = set()
        for event in events:
            if event.get("type") == "put":
                touched |= self.put(str(event.get("key")), event.get("value"))
            elif event.get("type") == "delete":
                touched |= self.delete(str(event.get("key")))
        return touched

    def serving(self, route: Route) -> list[Instance]:
        return [i for i in self.instances.values() if i.serves(route)]


class Balancer:
    def __init__(self, eject_seconds: float) -> None:
        self.eject_seconds = eject_seconds
        self.open: dict[str, int] = {}
        self.ejected_until: dict[str, float] = {}
        self._turn = itertools.count()

    def order(self, candidates: list[Instance], now: float) -> list[Instance]:
        """Candidates in the order to try them: healthy ones by load, then the ejected ones."""
        if not candidates:
            return []
        turn = next(self._turn) % len(candidates)
        rotated = candidates[turn:] + candidates[:turn]

        def rank(instance: Instance) -> tuple[bool, int]:
            ejected = self.ejected_until.get(instance.key, 0.0) > now
            return ejected, self.open.get(instance.key, 0)

        return sorted(rotated, key=rank)

    def eject(self, key: str, now: float) -> None:
        self.ejected_until[key] = now + self.eject_seconds

    def opened(self, key: str) -> None:
        self.open[key] = self.open.get(key, 0) + 1
        self.ejected_until.pop(key, None)

    def closed(self, key: str) -> None:
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)


def revoked_serials(snapshot: dict[str, Any]) -> set[int]:
    """Serials under ``revocations/<serial hex>``; malformed keys are skipped."""
    out = set()
    for key in snapshot:
        serial = revocation_serial(key)
        if serial is not None:
            out.add(serial)
    return out


def revocation_serial(key: str) -> int | None:
    try:
        return int(key.rpartition("/")[2], 16)
    except ValueError:
        return None
