"""This CVM's backends in the catalog: registered, kept alive, tags and health kept current.

Platform-owned backends are probed (``health``); workload-owned ones get their tags and health
from the local API (a Patroni callback sets ``role``). One loop makes every catalog call, in
order: changed backends are pushed, the peer's lease is refreshed at a third of its TTL, and an
expired lease (410) or a lost entry (404) re-registers everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from teemesh.coordinator.catalog_client import CatalogClient
from teemesh.coordinator.errors import NotRegistered
from teemesh.errors import MeshError
from teemesh.logs import log_event
from teemesh.sidecar.config import Backend, SidecarConfig
from teemesh.sidecar.health import HealthState, probe
from teemesh.sidecar.metrics import Metrics
from teemesh.sidecar.routing import ROLE_TAG

log = logging.getLogger("teemesh.sidecar.registration")
RETRY = 1.0


@dataclass
class BackendState:
    name: str
    backend: Backend
    tags: dict[str, str]
    health: str
    registered: bool = False
    dirty: bool = True
    state: HealthState | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "port": self.backend.port,
            "owner": self.backend.owner,
            "tags": self.tags,
            "health": self.health,
            "registered": self.registered,
        }


class Registrar:
    def __init__(self, config: SidecarConfig, catalog: CatalogClient, metrics: Metrics) -> None:
        self.config = config
        self.catalog = catalog
        self.metrics = metrics
        self.backends: dict[str, BackendState] = {}
        for name, backend in config.backends.items():
            check = backend.health_check()
            state = BackendState(name, backend, dict(backend.tags),
                                 "critical" if check else "passing")  # fmt: skip
            state.state = HealthState(check) if check else None
            self.backends[name] = state
        self.lease_ttl = 15.0
        self._wake = asyncio.Event()
        self.stopping = False

    def set_workload_state(
        self,
        name: str,
        *,
        role: str | None = None,
        clear_role: bool = False,
        tags: dict[str, str] | None = None,
        health: str | None = None,
    ) -> BackendState:
        """The local API's change to a backend's tags or health; pushed on the next turn."""
        state = self.backends[name]
        new_tags = dict(state.tags)
        if tags:
            new_tags.update(tags)
        if role is not None:
            new_tags[ROLE_TAG] = role
        elif clear_role:
            new_tags.pop(ROLE_TAG, None)
        if health is not None:
            state.health = health
            state.state = None  # the workload now speaks for its health
        state.tags = new_tags
        state.dirty = True
        self._wake.set()
        log_event(log, "backend_changed", service=name, tags=new_tags, health=state.health)
        return state

    async def probe_forever(self, state: BackendState) -> None:
        check = state.backend.health_check()
        assert check is not None
        while True:
            health = state.state
            if health is None:  # the workload took over
                return
            ok = await probe(state.backend.host, state.backend.port, check)
            self.metrics.health.labels(state.name).set(1 if ok else 0)
            if health.observe(ok):
                state.health = health.status
                state.dirty = True
                self._wake.set()
                log_event(log, "health_changed", service=state.name, health=health.status)
            await asyncio.sleep(check.interval)

    async def run(self) -> None:
        """Probe, register and heartbeat until cancelled."""
        probes = [
            asyncio.create_task(self.probe_forever(s)) for s in self.backends.values() if s.state
        ]
        try:
            while True:
                try:
                    await self._push()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.lease_ttl / 3)
                    self._wake.clear()
                    if self.backends and any(s.registered for s in self.backends.values()):
                        reply = await self.catalog.heartbeat()
                        self.lease_ttl = float(reply.get("lease_ttl", self.lease_ttl))
                except NotRegistered as exc:
                    log_event(log, "lease_lost", logging.WARNING, error=str(exc))
                    for state in self.backends.values():
                        state.registered, state.dirty = False, True
                except MeshError as exc:
                    log_event(log, "catalog_unavailable", logging.WARNING, error=str(exc))
                    await asyncio.sleep(RETRY)
        finally:
            for task in probes:
                task.cancel()

    async def _push(self) -> None:
        for state in self.backends.values():
            if not state.dirty:
                continue
            state.dirty = False
            try:
                if state.registered:
                    await self.catalog.update(state.name, tags=state.tags, health=state.health)
                else:
                    reply = await self.catalog.register(
                        state.name, self.config.address, self.config.ingress_port,
                        tags=state.tags, health=state.health,
                    )  # fmt: skip
                    self.lease_ttl = float(reply.get("lease_ttl", self.lease_ttl))
                    state.registered = True
                    log_event(log, "registered", service=state.name, health=state.health,
                              tags=state.tags)  # fmt: skip
            except BaseException:
                state.dirty = True
                raise

    async def deregister_all(self) -> None:
        """At shutdown: leave the catalog first, so callers stop choosing this CVM."""
        for state in self.backends.values():
            if state.registered:
                with contextlib.suppress(MeshError):
                    await self.catalog.deregister(state.name)
                state.registered = False
