"""Contrast's sidecar data path, without TPROXY: listeners on the CVM's address, not redirection.

Contrast's sidecar has iptables send every inbound TCP connection to Envoy (TPROXY to 15006,
mTLS required; listed ports to 15007, TLS only; ``disableTLS`` ports bypass it). This machine
has no netfilter, so nothing can be redirected: the app binds its ports on 127.0.0.1, and the
sidecar owns the CVM's ``address``, listening there on each port and relaying to
``127.0.0.1:<the same port>`` (``contrast.inbound`` says which ports, in which mode). What no
listener covers is unreachable from outside, which is Contrast's default deny; and since the
sidecar never listens where it relays to (checked with the config), there is no loop to
blackhole. Listeners open only once the CVM is admitted and the revocations are loaded.

Egress: a listener on each loopback ``listen`` address opens TLS to the remote with the SVID,
requiring its chain to lead to the mesh CA (all Contrast checks) and, beyond Contrast, that it
names a mesh peer whose certificate is not revoked. Every connection becomes a plane tunnel, so
revocations, the connection limit, drain, the idle timeout and the metrics apply as elsewhere;
new connections take the identity in use at that moment (``Plane.use_identity`` and ours).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from teemesh.errors import PeerError
from teemesh.identity.svid import SvidIdentity
from teemesh.logs import log_event
from teemesh.net.relay import Leg, TcpLeg, TlsLeg, join
from teemesh.net.tls import PemPair, tls_context
from teemesh.sidecar import api
from teemesh.sidecar.config import SidecarConfig
from teemesh.sidecar.contrast import EgressEntry, Inbound, inbound
from teemesh.sidecar.egress import AcceptedLeg
from teemesh.sidecar.plane import Plane, Tunnel

log = logging.getLogger("teemesh.sidecar.contrast")
ADMIN_PATHS = ("/stats/prometheus", "/stats", "/metrics")


class ContrastListeners:
    def __init__(self, plane: Plane, config: SidecarConfig, identity: PemPair) -> None:
        assert config.contrast is not None
        self.plane = plane
        self.config = config
        self.settings = config.contrast
        self.anonymous = SvidIdentity(config.cluster, "", "anonymous", -1, None)
        """The far end of a connection without a client certificate (never revoked)."""
        self.tls_context: ssl.SSLContext | None = None
        """The SVID, no client certificate asked (``disableTLS=false`` ports)."""
        self.tasks: set[asyncio.Task[None]] = set()
        self.use_identity(identity)

    def use_identity(self, identity: PemPair) -> None:
        """New TLS-only connections present ``identity``; the mTLS ones use the plane's."""
        self.tls_context = tls_context(server=True, identity=identity)

    async def start(self, ready: Callable[[], bool]) -> list[asyncio.Server]:
        """Open every listener (the ingress ports, egress, admin); ``ready``: for ``/ready``."""
        loop, address = asyncio.get_running_loop(), self.config.address
        servers: list[asyncio.Server] = []
        try:
            for listener in inbound(self.config):
                factory = self._inbound_factory(listener)
                servers.append(await loop.create_server(factory, address, listener.port,
                                                        backlog=1024))  # fmt: skip
            for entry in self.settings.egress:
                factory = self._egress_factory(entry)
                listen = (entry.listen_ip, entry.listen_port)
                servers.append(await loop.create_server(factory, *listen, backlog=1024))
            if self.settings.admin_port:
                servers.append(await api.serve_http(address, self.settings.admin_port,
                                                    lambda r: self._admin(r, ready)))  # fmt: skip
        except BaseException:  # a port taken: close what opened, or it would listen on, unowned
            for server in servers:
                server.close()
            raise
        log_event(log, "contrast_listening", address=address,
                  ingress=[f"{i.port}/{i.mode}" for i in inbound(self.config)],
                  egress=[f"{e.listen_ip}:{e.listen_port}" for e in self.settings.egress],
                  admin=self.settings.admin_port)  # fmt: skip
        return servers

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _refused(self, direction: str, reason: str) -> bool:
        """True (and counted) when the plane takes no new connection now."""
        plane = self.plane
        refusal = ("draining" if plane.draining
                   else "connection_limit" if plane.at_capacity() else None)  # fmt: skip
        if refusal is not None:
            plane.metrics.refusals.labels(direction, refusal).inc()
            log_event(log, "contrast_refused", logging.WARNING, reason=refusal, name=reason)
        return refusal is not None

    # -- ingress ----------------------------------------------------------------------------

    def _inbound_factory(self, listener: Inbound) -> Callable[[], Leg]:
        name = f"contrast-{listener.name}"

        def plain() -> Leg:
            return AcceptedLeg(lambda leg: self._accepted(leg, listener, name, self.anonymous))

        def tls() -> Leg:
            assert self.tls_context is not None
            return TlsLeg(self.tls_context, server_side=True, on_failure=self._failed,
                          on_handshake=lambda leg: self._accepted(leg, listener, name,
                                                                  self.anonymous))  # fmt: skip

        def mtls() -> Leg:
            context = self.plane.server_context
            assert context is not None, "listening only once admitted"
            return TlsLeg(context, server_side=True, on_failure=self._failed,
                          on_handshake=lambda leg: self._verified(leg, listener, name))  # fmt: skip

        return {"plain": plain, "tls": tls, "mtls": mtls}[listener.mode]

    def _failed(self, _leg: TlsLeg, exc: BaseException) -> None:
        self.plane.metrics.handshakes.labels("server", "failed").inc()
        log_event(log, "handshake_failed", logging.INFO, error=str(exc))

    def _verified(self, leg: TlsLeg, listener: Inbound, name: str) -> None:
        """A mesh peer, not revoked, of a group the backend admits; else the leg is reset."""
        plane = self.plane
        try:
            peer = plane.peer_of(leg.peer_der())
            if peer.serial in plane.revoked:
                raise PeerError(f"{peer.peer}: certificate {peer.serial:x} is revoked")
            allowed = plane.callers.get(listener.backend) if listener.backend else None
            if allowed is not None and peer.group not in allowed:
                raise PeerError(f"{peer.peer}: group {peer.group} may not call {listener.backend}")
        except PeerError as exc:
            plane.metrics.handshakes.labels("server", "refused").inc()
            plane.metrics.refusals.labels("ingress", "contrast_peer").inc()
            log_event(log, "contrast_refused", logging.WARNING, name=name, error=str(exc))
            leg.abort()
            return
        plane.metrics.handshakes.labels("server", "resumed" if leg.tls.session_reused
                                        else "full").inc()  # fmt: skip
        self._accepted(leg, listener, name, peer)

    def _accepted(self, leg: Leg, listener: Inbound, name: str, peer: SvidIdentity) -> None:
        if self._refused("ingress", name):
            leg.abort()
            return
        self.plane.pending += 1
        self._spawn(self._relay(leg, listener, name, peer))

    async def _relay(self, leg: Leg, listener: Inbound, name: str, peer: SvidIdentity) -> None:
        """Connect to the app on loopback; what the client sent meanwhile is held, then sent."""
        plane = self.plane
        try:
            _, app = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(TcpLeg, listener.target,
                                                             listener.port),
                plane.config.connect_timeout,
            )  # fmt: skip
        except (OSError, TimeoutError) as exc:
            plane.metrics.refusals.labels("ingress", "backend_unreachable").inc()
            log_event(log, "contrast_unreachable", logging.WARNING, name=name, error=str(exc))
            leg.abort()
            return
        finally:
            plane.pending -= 1
        if leg.closed:
            app.abort()
            return
        plane.add(Tunnel("ingress", name, peer, (leg, app)))
        join(leg, app)

    # -- egress -----------------------------------------------------------------------------

    def _egress_factory(self, entry: EgressEntry) -> Callable[[], Leg]:
        name = f"contrast-{entry.name}"

        def accept(client: TcpLeg) -> None:
            if self._refused("egress", name) or self.plane.client_context is None:
                client.abort()
                return
            self.plane.pending += 1
            self._spawn(self._dial(client, entry, name))

        return lambda: AcceptedLeg(accept)

    async def _dial(self, client: Leg, entry: EgressEntry, name: str) -> None:
        """TLS to the remote with the SVID; a mesh peer's chain, not revoked; then relay."""
        plane, loop = self.plane, asyncio.get_running_loop()
        context = plane.client_context
        assert context is not None
        handshake: asyncio.Future[SvidIdentity] = loop.create_future()

        def verified(leg: TlsLeg) -> None:
            peer = plane.peer_of(leg.peer_der())
            if peer.serial in plane.revoked:
                raise PeerError(f"{peer.peer}: certificate {peer.serial:x} is revoked")
            if not handshake.done():
                handshake.set_result(peer)

        def failed(_leg: Leg, exc: BaseException | None) -> None:
            if not handshake.done():
                handshake.set_exception(PeerError(f"TLS to {entry.remote_host}: {exc}"))
                handshake.exception()  # retrieved: no warning when nobody awaits it any more

        def make() -> TlsLeg:
            return TlsLeg(context, server_side=False, on_handshake=verified, on_failure=failed,
                          server_hostname=_sni(entry.remote_host))  # fmt: skip

        try:
            _, remote = await asyncio.wait_for(
                loop.create_connection(make, entry.remote_host, entry.remote_port),
                plane.config.connect_timeout,
            )
            remote.on_close = failed
            try:
                peer = await asyncio.wait_for(asyncio.shield(handshake),
                                              plane.config.connect_timeout)  # fmt: skip
            except BaseException:
                remote.abort()
                raise
        except (OSError, TimeoutError, PeerError) as exc:
            plane.metrics.connect_failures.labels(name).inc()
            target = f"{entry.remote_host}:{entry.remote_port}"
            log_event(log, "contrast_connect_failed", logging.WARNING, name=name, remote=target,
                      error=str(exc))  # fmt: skip
            client.abort()
            return
        finally:
            plane.pending -= 1
        plane.metrics.handshakes.labels("client", "full").inc()
        if client.closed:
            remote.abort()
            return
        plane.add(Tunnel("egress", name, peer, (client, remote)))
        join(client, remote)

    # -- admin ------------------------------------------------------------------------------

    async def _admin(self, request: api.Request, ready: Callable[[], bool]) -> api.Response:
        """Envoy's admin port, read only: metrics (Prometheus text) and readiness."""
        path = request.path.partition("?")[0]
        if request.method not in ("GET", "HEAD"):
            return api.Response(405, "text/plain", b"read only: GET\n")
        if path in ADMIN_PATHS:
            return api.Response(200, "text/plain; version=0.0.4", self.plane.metrics.render())
        if path == "/ready":
            ok = ready()
            return api.Response(200 if ok else 503, "text/plain", b"LIVE\n" if ok else b"NOT\n")
        return api.Response(404, "text/plain", f"no {path}: {', '.join(ADMIN_PATHS)}, /ready\n"
                            .encode())  # fmt: skip


def _sni(host: str) -> str | None:
    """The remote's name as SNI (a gateway in passthrough routes by it); none for an IP."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None
