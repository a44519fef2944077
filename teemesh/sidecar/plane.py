"""What egress and ingress share: the identity in use, the catalog as last seen, open tunnels.

The control side (admission, watches) updates it; the listeners read it for every new
connection. A renewed SVID goes into fresh TLS contexts, so open tunnels keep the session they
have and new ones present the new certificate. When the catalog says a peer was revoked, or an
instance lost the role a route selects, the tunnels concerned are closed here.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from teemesh.errors import PeerError
from teemesh.identity.svid import SvidIdentity, read_svid
from teemesh.logs import log_event
from teemesh.net.relay import IdleSweeper, Leg
from teemesh.net.tls import PemPair, tls_context
from teemesh.sidecar.config import SidecarConfig
from teemesh.sidecar.metrics import Metrics
from teemesh.sidecar.routing import (
    ROLE_TAG,
    Balancer,
    InstanceTable,
    revocation_serial,
    revoked_serials,
)

log = logging.getLogger("teemesh.sidecar")


@dataclass(eq=False)
class Tunnel:
    """An open relay: ``peer`` is the mesh peer at the far end (caller or callee)."""

    direction: str  # "egress" or "ingress"
    name: str  # the route (egress) or backend (ingress)
    peer: SvidIdentity
    legs: tuple[Leg, Leg]
    instance: str | None = None  # egress: the catalog key of the instance it reaches
    role: str | None = None  # egress: the role its route selects

    def abort(self) -> None:
        for leg in self.legs:
            leg.abort()


class Plane:
    def __init__(
        self,
        config: SidecarConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self.client_context: ssl.SSLContext | None = None
        self.server_context: ssl.SSLContext | None = None
        self.ca_pem = ""
        """The mesh CA bundle trusted now (PEM)."""
        self.instances = InstanceTable()
        self.route_peers: dict[str, tuple[str, ...]] = {}
        """Per route, the peer ids serving it as last logged."""
        self.revoked: set[int] = set()
        self.balancer = Balancer(config.eject_seconds)
        self.tunnels: set[Tunnel] = set()
        self.pending = 0
        """Connections accepted but not yet joined (counted against the limit)."""
        self.sweeper = IdleSweeper(config.idle_timeout)
        self.draining = False
        self.callers = {name: config.callers_of(name) for name in config.backends}
        """Per local backend, the groups allowed to call it (None: any), worked out once."""
        self.sessions: dict[str, ssl.SSLSession] = {}
        """The last TLS session per instance key, offered again on the next tunnel to it."""

    # -- identity ---------------------------------------------------------------------------

    def use_identity(self, identity: PemPair, ca: str) -> None:
        """New connections present ``identity`` and trust ``ca``; open ones are left alone."""
        self.client_context = tls_context(server=False, identity=identity, verify=ca)
        self.server_context = tls_context(server=True, identity=identity, verify=ca)
        self.ca_pem = ca
        self.sessions.clear()  # they belong to the old context (and present the old SVID)

    def peer_of(self, der: bytes | None) -> SvidIdentity:
        """The mesh peer a certificate (verified by OpenSSL) names; PeerError if none."""
        if der is None:
            raise PeerError("the peer presented no certificate")
        peer = read_svid(der, self.config.cluster)
        if peer.not_after < self.wall_clock():
            # OpenSSL checked it at the full handshake; a resumed session may outlive it
            raise PeerError(f"the peer's certificate {peer.serial:x} has expired")
        return peer

    # -- tunnels ----------------------------------------------------------------------------

    def at_capacity(self) -> bool:
        return len(self.tunnels) + self.pending >= self.config.max_connections

    def add(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)
        self.metrics.connections.labels(tunnel.direction, tunnel.name).inc()
        self.metrics.active.labels(tunnel.direction).inc()
        if tunnel.instance is not None:
            self.balancer.opened(tunnel.instance)
        a, b = tunnel.legs
        self.sweeper.add(a, b)
        for leg in tunnel.legs:
            leg.on_close = lambda _leg, _exc, t=tunnel: self._leg_closed(t)

    def _leg_closed(self, tunnel: Tunnel) -> None:
        if tunnel not in self.tunnels or not all(leg.closed for leg in tunnel.legs):
            return
        self.tunnels.discard(tunnel)
        self.sweeper.discard(*tunnel.legs)
        self.metrics.active.labels(tunnel.direction).dec()
        outer, inner = tunnel.legs
        self.metrics.bytes.labels(tunnel.direction, "in").inc(outer.received)
        self.metrics.bytes.labels(tunnel.direction, "out").inc(inner.received)
        if tunnel.instance is not None:
            self.balancer.closed(tunnel.instance)

    def cut(self, tunnels: list[Tunnel], reason: str) -> None:
        for tunnel in tunnels:
            log_event(log, "tunnel_cut", reason=reason, direction=tunnel.direction,
                      name=tunnel.name, peer=tunnel.peer.peer)  # fmt: skip
            self.metrics.cut.labels(reason).inc()
            tunnel.abort()

    # -- catalog ----------------------------------------------------------------------------

    def load_revocations(self, snapshot: dict[str, Any]) -> None:
        self.revoked = revoked_serials(snapshot)
        self._cut_revoked()

    def revocation_events(self, events: tuple[dict[str, Any], ...]) -> None:
        for event in events:
            serial = revocation_serial(str(event.get("key")))
            if serial is not None and event.get("type") == "put":
                self.revoked.add(serial)
            # a deleted revocation is one whose certificate expired: keep refusing it
        self._cut_revoked()

    def _cut_revoked(self) -> None:
        cut = [t for t in self.tunnels if t.peer.serial in self.revoked]
        if cut:
            self.cut(cut, "revoked")

    def load_instances(self, snapshot: dict[str, Any]) -> None:
        self.instances.load(snapshot)
        self._note_routes(None)
        self._cut_demoted()

    def instance_events(self, events: tuple[dict[str, Any], ...]) -> None:
        self._note_routes(self.instances.apply(events))
        self._cut_demoted()

    def _note_routes(self, services: set[str] | None) -> None:
        """Log each route whose serving instances changed (of ``services``; None: all): when a
        promotion, a failure or a new replica reached this sidecar."""
        for name, route in self.config.routes.items():
            if services is not None and route.backend not in services:
                continue
            peers = tuple(sorted(i.peer_id for i in self.instances.serving(route)))
            if self.route_peers.get(name) != peers:
                self.route_peers[name] = peers
                log_event(log, "route_changed", route=name, instances=list(peers))

    def _cut_demoted(self) -> None:
        """Tunnels of role routes whose instance no longer holds the role (or is gone)."""
        cut = []
        for tunnel in self.tunnels:
            if tunnel.role is None or tunnel.instance is None:
                continue
            instance = self.instances.instances.get(tunnel.instance)
            if instance is None or instance.tags.get(ROLE_TAG) != tunnel.role:
                cut.append(tunnel)
        if cut:
            self.cut(cut, "role_lost")

    # -- shutdown ---------------------------------------------------------------------------

    async def drain(self, seconds: float) -> None:
        """Refuse new tunnels, let open ones finish for up to ``seconds``, then close the rest."""
        self.draining = True
        deadline = self.clock() + seconds
        while self.tunnels and self.clock() < deadline:
            await asyncio.sleep(0.05)
        if self.tunnels:
            self.cut(list(self.tunnels), "shutdown")
        self.sweeper.stop()
