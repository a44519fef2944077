"""Egress: a listener per route on its VIP; each connection becomes a tunnel to an instance.

For each new connection: pick an instance (``routing``), open TLS to its sidecar's ingress with
our SVID, check that the certificate names that very peer and is not revoked, then send
``CONNECT <backend>:<port>`` and the client's first bytes at once. Until the ingress answers,
those bytes are kept (up to a bound), so a refusal that reached no backend (unreachable,
limit, draining) is retried on another instance. A failed connect ejects the instance for a
while and tries the next.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teemesh.checks import split_host_port
from teemesh.errors import MeshError, PeerError
from teemesh.identity.svid import SvidIdentity
from teemesh.logs import log_event
from teemesh.net.relay import HELD_LIMIT, Leg, TcpLeg, TlsLeg, join
from teemesh.sidecar import tunnel as wire
from teemesh.sidecar.config import Route
from teemesh.sidecar.plane import Plane, Tunnel
from teemesh.sidecar.routing import Instance

log = logging.getLogger("teemesh.sidecar.egress")


class NoInstance(PeerError):
    """No instance of the route's backend could be reached."""


@dataclass
class _Attempt:
    """One tunnel being opened: the TLS leg, and what it has said so far."""

    leg: TlsLeg
    handshake: asyncio.Future[SvidIdentity]
    reply: asyncio.Future[tuple[wire.Refusal | None, bytes]]
    buffer: bytearray = field(default_factory=bytearray)


class EgressListener:
    def __init__(self, plane: Plane, name: str, route: Route) -> None:
        self.plane = plane
        self.name = name
        self.route = route
        self.target = wire.Target(route.backend, route.port)
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> TcpLeg:
        return AcceptedLeg(self.attach)

    def candidates(self) -> list[Instance]:
        """The instances a new connection may go to (before the balancer orders them)."""
        return self.plane.instances.serving(self.route)

    def attach(self, client: Leg) -> None:
        """Open a tunnel for ``client``, a connection accepted here or by the gateway; what it
        has sent so far is held and goes first."""
        plane = self.plane
        refusal = (
            "draining" if plane.draining
            else "connection_limit" if plane.at_capacity()
            else "no_identity" if plane.client_context is None
            else None
        )  # fmt: skip
        if refusal is not None:
            plane.metrics.refusals.labels("egress", refusal).inc()
            client.abort()
            return
        plane.pending += 1
        task = asyncio.get_running_loop().create_task(self._open(client))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self, client: Leg) -> None:
        plane = self.plane
        try:
            tried: set[str] = set()
            while not client.closed:
                candidates = [i for i in self.candidates() if i.key not in tried]
                ordered = plane.balancer.order(candidates, plane.clock())
                if not ordered:
                    raise NoInstance(f"route {self.name}: no reachable instance of "
                                     f"{self.route.backend}")  # fmt: skip
                instance = ordered[0]
                tried.add(instance.key)
                if await self._try(client, instance):
                    return
        except NoInstance as exc:
            plane.metrics.refusals.labels("egress", "no_instance").inc()
            log_event(log, "no_instance", logging.WARNING, route=self.name, error=str(exc))
            client.abort()
        finally:
            plane.pending -= 1

    async def _try(self, client: Leg, instance: Instance) -> bool:
        """True when the tunnel is up (or the client gave up); False to try another instance."""
        plane = self.plane
        try:
            attempt = await self._dial(instance)
        except (OSError, TimeoutError, MeshError, ValueError) as exc:
            plane.balancer.eject(instance.key, plane.clock())
            plane.metrics.connect_failures.labels(self.name).inc()
            log_event(log, "connect_failed", logging.WARNING, route=self.name,
                      instance=instance.key, error=str(exc))  # fmt: skip
            return False
        leg, early = attempt.leg, client.take_held()
        leg.send([wire.connect_request(self.target), *early])
        sent = list(early)

        def forward(chunks: list[bytes]) -> None:  # client bytes while the reply is awaited
            leg.send(chunks)
            sent.extend(chunks)
            if sum(len(c) for c in sent) > HELD_LIMIT:
                client.pause_reading()

        client.sink = forward
        try:
            refusal, rest = await asyncio.wait_for(attempt.reply, self.plane.config.connect_timeout)
        except (OSError, TimeoutError, MeshError, ValueError) as exc:
            client.sink = None
            leg.abort()
            log_event(log, "tunnel_failed", logging.WARNING, route=self.name,
                      instance=instance.key, error=str(exc))  # fmt: skip
            client.abort()  # bytes may have reached the backend: never replay them
            return True
        if refusal is not None:
            client.sink = None
            leg.abort()
            plane.metrics.refusals.labels("egress", refusal.name.lower()).inc()
            log_event(log, "tunnel_refused", logging.WARNING, route=self.name,
                      instance=instance.key, reason=refusal.name)  # fmt: skip
            if refusal.retryable and not client.closed:
                client.held = sent + client.held
                client.held_bytes = sum(len(c) for c in client.held)
                client.resume_reading()
                return False
            client.abort()
            return True
        if client.closed:
            leg.abort()
            return True
        if rest:
            client.send([rest])
        if leg.tls.session_reused:
            plane.metrics.handshakes.labels("client", "resumed").inc()
        else:  # keep this session for the next tunnels (its tickets came before the reply)
            plane.metrics.handshakes.labels("client", "full").inc()
            # read once: on CPython 3.11 every read of .session leaks a copy (cpython#116810)
            session = leg.tls.session
            if session is not None and session.has_ticket:
                plane.sessions[instance.key] = session
        tunnel = Tunnel("egress", self.name, attempt.handshake.result(), (client, leg),
                        instance=instance.key, role=self.route.role)  # fmt: skip
        plane.add(tunnel)
        join(client, leg)
        return True

    async def _dial(self, instance: Instance) -> _Attempt:
        plane = self.plane
        context = plane.client_context
        if context is None:
            raise PeerError("no SVID yet")
        loop = asyncio.get_running_loop()
        handshake: asyncio.Future[SvidIdentity] = loop.create_future()
        reply: asyncio.Future[tuple[wire.Refusal | None, bytes]] = loop.create_future()

        def verified(leg: TlsLeg) -> None:
            svid = plane.peer_of(leg.peer_der())
            if svid.serial in plane.revoked:
                raise PeerError(f"{svid.peer}: certificate {svid.serial:x} is revoked")
            if (svid.group, svid.peer_id) != (instance.group, instance.peer_id):
                raise PeerError(f"{instance.address}:{instance.port} is {svid.peer}, "
                                f"not {instance.group}/{instance.peer_id}")  # fmt: skip
            if not handshake.done():
                handshake.set_result(svid)

        def failed(_leg: TlsLeg, exc: BaseException) -> None:
            plane.metrics.handshakes.labels("client", "failed").inc()
            for future in (handshake, reply):
                _fail(future, PeerError(f"TLS to {instance.key}: {exc}"))

        session = plane.sessions.get(instance.key)
        host, port, sni = _way_to(plane, instance)

        def make() -> TlsLeg:
            return TlsLeg(context, server_side=False, on_handshake=verified, on_failure=failed,
                          session=session, server_hostname=sni)  # fmt: skip

        _, leg = await asyncio.wait_for(
            loop.create_connection(make, host, port), plane.config.connect_timeout
        )
        attempt = _Attempt(leg, handshake, reply)
        leg.sink = lambda chunks: _read_reply(attempt, chunks)
        leg.on_close = lambda _leg, exc: _closed_early(attempt, exc)
        try:
            await asyncio.wait_for(asyncio.shield(handshake), plane.config.connect_timeout)
        except BaseException:
            leg.abort()
            raise
        return attempt


def _way_to(plane: Plane, instance: Instance) -> tuple[str, int, str | None]:
    """Where to connect for ``instance``'s ingress, and the SNI to send: its address, or with
    the gateway transport the gateway, in passthrough to ``<instance_id>-<port>s``."""
    via = plane.config.via_gateway
    if via is None:
        return instance.address, instance.port, None
    if instance.instance_id is None:
        raise PeerError(f"{instance.key} has no instance id for the gateway to route by")
    host, port = split_host_port(via.address)
    return host, port, f"{instance.instance_id}-{instance.port}s.{via.base_domain}"


class AcceptedLeg(TcpLeg):
    """A client connection that tells its listener once it is set up."""

    def __init__(self, on_made: Callable[[TcpLeg], None]) -> None:
        super().__init__()
        self.on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.on_made(self)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail ``future`` if still pending, without a 'never retrieved' warning if nobody waits."""
    if not future.done():
        future.set_exception(exc)
        future.exception()


def _read_reply(attempt: _Attempt, chunks: list[bytes]) -> None:
    attempt.buffer.extend(b"".join(chunks))
    if attempt.reply.done():
        return
    try:
        parts = wire.split_head(bytes(attempt.buffer))
        if parts is None:
            return
        head, rest = parts
        attempt.leg.sink = None
        attempt.reply.set_result((wire.parse_reply(head), rest))
    except MeshError as exc:
        _fail(attempt.reply, PeerError(f"tunnel reply: {exc}"))


def _closed_early(attempt: _Attempt, exc: BaseException | None) -> None:
    for future in (attempt.handshake, attempt.reply):
        _fail(future, PeerError(f"tunnel closed before its reply: {exc}"))
