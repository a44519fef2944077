"""Ingress: the CVM's one mTLS port; each authorized tunnel is relayed to its local backend.

OpenSSL checks that the client's chain leads to the mesh CA. Then, before a byte reaches a
backend: the certificate must name a peer of this cluster and not be revoked; the tunnel's
``CONNECT`` must name a backend of this CVM on its port; the caller's group must be allowed
to call it (the routes' ``callers``). Bytes that arrive meanwhile are held. A refusal is
answered in the tunnel, so the egress learns why, and logged with the caller's identity.
"""

from __future__ import annotations

import asyncio
import logging

from teemesh.errors import MeshError
from teemesh.identity.svid import SvidIdentity
from teemesh.logs import log_event
from teemesh.net.relay import TcpLeg, TlsLeg, join
from teemesh.sidecar import tunnel as wire
from teemesh.sidecar.plane import Plane, Tunnel

log = logging.getLogger("teemesh.sidecar.ingress")
HEAD_TIMEOUT = 10.0


class IngressLeg(TlsLeg):
    caller: SvidIdentity | None = None
    counted = False
    """Counted in ``plane.pending`` (from the handshake until joined or refused)."""
    timer: asyncio.TimerHandle | None = None


class IngressListener:
    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> TlsLeg:
        context = self.plane.server_context
        assert context is not None, "ingress listens only once admitted"
        return IngressLeg(context, server_side=True, on_handshake=self._verified,
                          on_failure=self._failed)  # fmt: skip

    def _failed(self, leg: TlsLeg, exc: BaseException) -> None:
        self.plane.metrics.handshakes.labels("server", "failed").inc()
        log_event(log, "handshake_failed", logging.INFO, error=str(exc))

    def _count(self, leg: IngressLeg) -> None:
        leg.counted = True
        self.plane.pending += 1
        leg.on_close = lambda _leg, _exc: self._uncount(leg)
        leg.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._head_timeout, leg)

    def _uncount(self, leg: IngressLeg) -> None:
        if leg.timer is not None:
            leg.timer.cancel()
        if leg.counted:
            leg.counted = False
            self.plane.pending -= 1

    def _verified(self, leg: TlsLeg) -> None:
        assert isinstance(leg, IngressLeg)
        plane = self.plane
        try:
            leg.caller = plane.peer_of(leg.peer_der())
        except MeshError as exc:
            plane.metrics.handshakes.labels("server", "refused").inc()
            self._refuse(leg, wire.Refusal.NOT_A_PEER, str(exc))
            return
        if leg.caller.serial in plane.revoked:
            plane.metrics.handshakes.labels("server", "refused").inc()
            self._refuse(leg, wire.Refusal.REVOKED, "the caller's certificate is revoked")
            return
        plane.metrics.handshakes.labels(
            "server", "resumed" if leg.tls.session_reused else "full"
        ).inc()
        if plane.draining or plane.at_capacity():
            reason = wire.Refusal.DRAINING if plane.draining else wire.Refusal.CONNECTION_LIMIT
            self._refuse(leg, reason, "")
            return
        self._count(leg)
        buffer = bytearray()

        def read_head(chunks: list[bytes]) -> None:
            buffer.extend(b"".join(chunks))
            try:
                parts = wire.split_head(bytes(buffer))
                if parts is None:
                    return
                head, rest = parts
                target = wire.parse_request(head)
            except MeshError as exc:
                self._refuse(leg, wire.Refusal.BAD_REQUEST, str(exc))
                return
            leg.sink = None
            if rest:
                leg.hold([rest])
            self._authorize(leg, target)

        leg.sink = read_head

    def _head_timeout(self, leg: IngressLeg) -> None:
        if leg.sink is not None:
            self._refuse(leg, wire.Refusal.BAD_REQUEST, "no tunnel request in time")

    def _authorize(self, leg: IngressLeg, target: wire.Target) -> None:
        plane, caller = self.plane, leg.caller
        assert caller is not None
        if leg.timer is not None:
            leg.timer.cancel()
        backend = plane.config.backends.get(target.backend)
        if backend is None or backend.port != target.port:
            self._refuse(leg, wire.Refusal.UNKNOWN_BACKEND, f"{target.backend}:{target.port}")
            return
        allowed = plane.callers[target.backend]
        if allowed is not None and caller.group not in allowed:
            self._refuse(leg, wire.Refusal.CALLER_NOT_ALLOWED, target.backend)
            return
        task = asyncio.get_running_loop().create_task(self._connect(leg, caller, target))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, leg: IngressLeg, caller: SvidIdentity, target: wire.Target) -> None:
        plane = self.plane
        host = plane.config.backends[target.backend].host
        loop = asyncio.get_running_loop()
        try:
            _, backend = await asyncio.wait_for(
                loop.create_connection(TcpLeg, host, target.port),
                plane.config.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self._refuse(leg, wire.Refusal.BACKEND_UNREACHABLE, str(exc))
            return
        self._uncount(leg)
        if leg.closed:
            backend.abort()
            return
        leg.send([wire.accepted()])
        plane.add(Tunnel("ingress", target.backend, caller, (leg, backend)))
        join(leg, backend)
        log_event(log, "tunnel_open", logging.DEBUG, backend=target.backend, caller=caller.peer)

    def _refuse(self, leg: IngressLeg, reason: wire.Refusal, detail: str) -> None:
        self._uncount(leg)
        caller = leg.caller
        self.plane.metrics.refusals.labels("ingress", reason.name.lower()).inc()
        log_event(log, "tunnel_refused", logging.WARNING, reason=reason.name,
                  caller=caller.peer if caller else None,
                  serial=f"{caller.serial:x}" if caller else None, detail=detail)  # fmt: skip
        leg.sink = None
        leg.held.clear()
        if leg.handshaken and not leg.closed:
            leg.send([wire.refused(reason)])
            leg.send_eof()
            leg.close()
        else:
            leg.abort()
