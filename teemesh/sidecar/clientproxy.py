"""dstack-vpc's client proxy (``client_proxy``): plain HTTP from the workload, sent into the
mesh by its ``x-dstack-target-*`` headers; without them, a call to the local guest agent.

Each connection carries one request, read whole (bounded in size and time) before anything is
dialed. A tunnel is opened as a route's egress opens one (``EgressListener._dial``): mTLS to the
target sidecar's ingress, whose certificate must chain to the mesh CA, be unrevoked, name the
catalog's peer and carry the target app id; only then are the ``CONNECT`` and the request sent.
dstack-vpc checks the app id after the response, once the request has reached the server.
The target's ingress still applies its ``callers``. The response is relayed as it comes, and
the connection closes after it (later client bytes are never forwarded).

Identity headers (``X-Dstack-App-Id``, ``x-teemesh-group``, ``x-teemesh-peer``,
``x-client-verify``, ``x-client-cert``) are never forwarded, to a backend or to a coordinator:
a backend must take the caller's identity only from the auth service behind nginx (or from the
mesh: its sidecar's ``callers``), never from a header a client could set.

Each client connection may hold up to ``MAX_BODY`` for up to ``REQUEST_TIMEOUT`` before
anything else bounds it, so the open ones are counted from ``connection_made`` and those beyond
``MAX_CLIENTS`` (or the sidecar's ``max_connections``, if lower) get a 503 and are closed at once.

The guest-agent fallback serves only ``Info``, ``GetQuote``, ``Attest``, ``Verify`` and
``Version`` (403 for the others): dstack-vpc lets anything that reaches its port get the app's
keys and emit events; an app inside the CVM has the guest agent's socket for those.

The VPC server. dstack-vpc's nodes reach their VPC server through this proxy with
``x-dstack-target-app: <the server's app id>``; in teemesh the coordinators serve that API
(``/api/register``, ``/api/nodes/update``, ``/api/discover/<type>``, ...), and they are not
catalog instances. A request whose target app is one of the coordinators' app ids
(``vpc_app_ids``: the ``app_ids`` the sidecar's ``coordinator_policy`` pins, else dstack's
default app id of each of its ``compose_hashes``, their first 20 bytes, i.e. the first 40 hex
digits) goes to a coordinator instead, over the sidecar's own catalog connection: mTLS with
this CVM's SVID to coordinators whose RA-TLS certificates the admission helper verified, with
the catalog's failover. The coordinator authenticates the SVID and allows the app by its
policy's ``vpc.allowed_apps``, so a node's identity is the attested one. Only ``/api/`` paths
and ``/health`` (exactly: the VPC server's health check) are passed on (others: 404), with
method, query and body; ``x-dstack-target-*``, ``Host``, hop-by-hop and identity headers are
dropped; the other target headers (port, instance, TLS) mean nothing here. The coordinator's
status and body come back whole. ``vpc-server`` is not accepted as an app id: an app is given
the coordinators' app id where dstack-vpc reads the VPC server's, from the deployment:
``teemesh plan --json`` lists it as ``app_ids.coordinator``, and it is the first 40 hex digits
of the compose hash in the sidecar config's ``coordinator_policy`` (or that policy's
``app_ids``). Catalog instances of that app (coordinators' sidecars serving a DCS) are
therefore not reachable through this proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import h11

from teemesh.coordinator.catalog_client import CatalogClient, Unavailable
from teemesh.errors import MeshError, PeerError
from teemesh.logs import log_event
from teemesh.net.relay import TcpLeg, join
from teemesh.platform.agent_client import AgentClient
from teemesh.sidecar import tunnel as wire
from teemesh.sidecar.clientproxy_core import (
    MAX_BODY,
    ROUTED_METHODS,
    ProxyError,
    Target,
    agent_args,
    agent_method,
    backends_by_port,
    candidates,
    error_response,
    forwarded_request,
    gateway_domain,
    identity_problem,
    json_response,
    parse_target,
    refusal_error,
    relayed_response,
    vpc_app_ids,
    vpc_headers,
    vpc_path,
)
from teemesh.sidecar.config import Route
from teemesh.sidecar.egress import EgressListener, _Attempt
from teemesh.sidecar.plane import Plane, Tunnel
from teemesh.sidecar.routing import Instance

log = logging.getLogger("teemesh.sidecar.clientproxy")
NAME = "client-proxy"
REQUEST_TIMEOUT = 30.0
"""The whole request (head and body) must arrive within this: a slow client is cut (408)."""
LINGER = 2.0
"""After answering itself, how long the proxy still drains a client that has not closed."""
MAX_HEAD = 16 * 1024
"""Request line and headers; above it, 431."""
MAX_CLIENTS = 256
"""Open client connections at most (fewer if the sidecar's ``max_connections`` is lower); the
next is answered 503 and closed. A fixed bound rather than ``max_connections`` alone (default
10000): that one counts tunnels, whose relays are flow-controlled, while each proxy connection
may buffer a whole ``MAX_BODY`` (10 MiB) for ``REQUEST_TIMEOUT`` before it is dialed. 256 keeps
that worst case to 2.5 GiB and is far above what one workload's HTTP clients hold open to its
own sidecar."""
_T = TypeVar("_T")


class Clients:
    """The proxy's open client connections, counted from ``connection_made`` to
    ``connection_lost``, against ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    """As received (h11 lowercases the names)."""
    body: bytes

    def header_map(self) -> dict[str, str]:
        return {k.decode().lower(): v.decode("latin-1") for k, v in self.headers}


class ProxyLeg(TcpLeg):
    """The client's connection: one request parsed here, then (routed) joined to a tunnel, of
    which only the response direction carries bytes."""

    def __init__(self, on_request: Callable[[ProxyLeg, Request], None], clients: Clients) -> None:
        super().__init__()
        self.on_request = on_request
        self.clients = clients
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.done = False
        self.lingering = False
        """Answered by the proxy itself: waiting for the client's EOF before closing."""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.clients.open += 1  # asyncio calls connection_lost once, after this
        if self.clients.open > self.clients.limit:
            log_event(log, "proxy_full", logging.DEBUG, open=self.clients.open)
            full = f"the client proxy holds {self.clients.limit} connections already"
            self.reply(error_response(ProxyError(503, full)))
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(REQUEST_TIMEOUT, self._too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self.clients.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.done:  # the one request is read: what follows is never forwarded
            return
        self.http.receive_data(data)
        self._events()

    def eof_received(self) -> bool:
        if self.lingering:  # our answer is out, theirs is over
            self.close()
            return False
        if self.done:
            return super().eof_received()
        self.http.receive_data(b"")
        self._events()
        return True

    def send_eof(self) -> None:
        """The response is whole: close (the client's side carries nothing more we forward)."""
        super().send_eof()
        if self.partner is not None and not self.eof_in:
            self.eof_in = True
            self.partner.send_eof()
        self.close()

    def reply(self, response: bytes) -> None:
        """The proxy's own answer, then close. Closing a socket with request bytes still unread
        makes the kernel send a reset, which a client may see before the answer: half-close
        instead, drop what the client still sends, and close on its EOF or after ``LINGER`` s."""
        self.done = True
        self._stop_timer()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(response)
        if not isinstance(transport, asyncio.WriteTransport) or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.lingering = True
        self.timer = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _too_slow(self) -> None:
        if not self.done:
            self.reply(error_response(ProxyError(408, "the request did not arrive in time")))

    def _events(self) -> None:
        try:
            while not self.done:
                event = self.http.next_event()
                if event is h11.NEED_DATA:
                    if self.http.they_are_waiting_for_100_continue and self.transport:
                        continue_ = h11.InformationalResponse(status_code=100, headers=[])
                        self.transport.write(self.http.send(continue_) or b"")
                    return
                self._event(event)
        except h11.RemoteProtocolError as exc:
            self.reply(error_response(ProxyError(exc.error_status_hint, f"bad request: {exc}")))
        except ProxyError as exc:
            self.reply(error_response(exc))

    def _event(self, event: Any) -> None:
        if isinstance(event, h11.Request):
            self.request = event
            head = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if head > MAX_HEAD:  # h11 bounds only a head that arrives in pieces
                raise ProxyError(431, f"the request head is limited to {MAX_HEAD} bytes")
            length = dict(event.headers).get(b"content-length", b"0")
            if int(length) > MAX_BODY:  # h11 checked it is a number
                raise ProxyError(413, f"the body is limited to {MAX_BODY} bytes")
        elif isinstance(event, h11.Data):
            self.body.extend(event.data)
            if len(self.body) > MAX_BODY:
                raise ProxyError(413, f"the body is limited to {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage) and self.request is not None:
            self.done = True
            self._stop_timer()
            request = self.request
            self.on_request(self, Request(request.method.decode(),
                                          request.target.decode("ascii", "replace"),
                                          list(request.headers), bytes(self.body)))  # fmt: skip
        elif isinstance(event, h11.ConnectionClosed):  # gone before a whole request
            self.done = True
            self.abort()


class _Dialer(EgressListener):
    """A route egress's dial, plus the target app id: one check more before any byte."""

    def __init__(self, plane: Plane) -> None:
        super().__init__(plane, NAME, Route(NAME, 1))

    async def dial(self, instance: Instance, app: str) -> _Attempt:
        attempt = await self._dial(instance)  # chain, revocation, peer: checked in the handshake
        problem = identity_problem(attempt.handshake.result(), instance, app, self.plane.revoked)
        if problem is not None:
            attempt.leg.abort()
            raise PeerError(problem)
        return attempt


class ClientProxyListener:
    def __init__(
        self, plane: Plane, agent: str | None, catalog: CatalogClient | None = None
    ) -> None:
        """``agent``: the guest agent's endpoint (None: ``DSTACK_SIMULATOR_ENDPOINT`` or the
        default socket, as for admission); ``catalog``: the sidecar's connection to the
        coordinators, which VPC requests take (None: they get 503)."""
        self.plane = plane
        self.agent = agent
        self.catalog = catalog
        self.vpc_apps = vpc_app_ids(plane.config.coordinator_policy)
        self.backends = backends_by_port(plane.config)
        self.dialer = _Dialer(plane)
        self.tasks: set[asyncio.Task[None]] = set()
        self.clients = Clients(min(MAX_CLIENTS, plane.config.max_connections))

    def __call__(self) -> ProxyLeg:
        return ProxyLeg(self._received, self.clients)

    def _received(self, client: ProxyLeg, request: Request) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(client, request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, client: ProxyLeg, request: Request) -> None:
        try:
            target = parse_target(request.header_map())
            if target is None:
                client.reply(await self._local(request))
            elif target.app in self.vpc_apps:
                client.reply(await self._vpc(request))
            else:
                await self._forward(client, request, target)
        except ProxyError as exc:
            if exc.status >= 500 or exc.status == 403:
                log_event(log, "proxy_failed", logging.WARNING, status=exc.status, error=str(exc))
            client.reply(error_response(exc))
        except Exception as exc:  # never let one request take the sidecar down
            log.exception("client proxy request failed")
            client.reply(error_response(ProxyError(500, f"internal error: {type(exc).__name__}")))

    @contextlib.contextmanager
    def _admitted(self, request: Request, way_out: _T | None) -> Iterator[_T]:
        """The gate of both ways into the mesh: a routed method (else 405), a sidecar taking
        connections and ``way_out`` there (else 503), which is yielded; the request is counted
        in ``pending`` while it is under way."""
        plane = self.plane
        if request.method not in ROUTED_METHODS:
            raise ProxyError(405, f"{request.method} is not routed")
        if way_out is None or plane.draining or plane.at_capacity():
            raise ProxyError(503, "the sidecar is not taking new connections")
        plane.pending += 1
        try:
            yield way_out
        finally:
            plane.pending -= 1

    # -- into the mesh ------------------------------------------------------------------------

    async def _forward(self, client: ProxyLeg, request: Request, target: Target) -> None:
        plane = self.plane
        with self._admitted(request, plane.client_context):
            found = candidates(plane.instances.instances.values(), target,
                               self.backends.get(target.port, frozenset()))  # fmt: skip
            outbound = forwarded_request(request.method, request.target, request.headers,
                                         request.body)  # fmt: skip
            await self._open(client, target, found, outbound)

    async def _open(self, client: ProxyLeg, target: Target, found: list[Instance],
                    outbound: bytes) -> None:  # fmt: skip
        """Try the instances in the balancer's order until one takes the request; an instance
        is retried only when nothing of the request can have reached its backend."""
        plane = self.plane
        tried: set[str] = set()
        error = ProxyError(502, f"no instance of app {target.app} could be reached")
        while not client.closed:
            ordered = plane.balancer.order([i for i in found if i.key not in tried], plane.clock())
            if not ordered:
                raise error
            instance = ordered[0]
            tried.add(instance.key)
            try:
                attempt = await self.dialer.dial(instance, target.app)
            except (OSError, TimeoutError, MeshError, ValueError) as exc:
                plane.balancer.eject(instance.key, plane.clock())
                plane.metrics.connect_failures.labels(NAME).inc()
                error = ProxyError(502, f"cannot reach {instance.key}: {exc}")
                log_event(log, "connect_failed", logging.WARNING, instance=instance.key,
                          error=str(exc))  # fmt: skip
                continue
            leg = attempt.leg
            connect = wire.connect_request(wire.Target(instance.service, target.port))
            leg.send([connect, outbound])
            try:
                refusal, rest = await asyncio.wait_for(attempt.reply, plane.config.connect_timeout)
            except (OSError, TimeoutError, MeshError, ValueError) as exc:
                leg.abort()  # the request may have reached the backend: never replayed
                raise ProxyError(502, f"tunnel to {instance.key} failed: {exc}") from exc
            if refusal is not None:
                leg.abort()
                plane.metrics.refusals.labels(NAME, refusal.name.lower()).inc()
                error = refusal_error(refusal, instance)
                if refusal.retryable:
                    continue
                raise error
            if client.closed:
                leg.abort()
                return
            self._join(client, attempt, instance, rest)
            return

    def _join(self, client: ProxyLeg, attempt: _Attempt, instance: Instance,
              rest: bytes) -> None:  # fmt: skip
        plane, leg = self.plane, attempt.leg
        if leg.tls.session_reused:
            plane.metrics.handshakes.labels("client", "resumed").inc()
        else:
            plane.metrics.handshakes.labels("client", "full").inc()
            session = leg.tls.session  # read once (cpython#116810)
            if session is not None and session.has_ticket:
                plane.sessions[instance.key] = session
        tunnel = Tunnel("egress", NAME, attempt.handshake.result(), (client, leg),
                        instance=instance.key)  # fmt: skip
        plane.add(tunnel)
        if rest:
            client.send([rest])
        join(client, leg)

    # -- the coordinators' VPC API --------------------------------------------------------------

    async def _vpc(self, request: Request) -> bytes:
        target = vpc_path(request.target)
        with self._admitted(request, self.catalog) as catalog:
            try:
                reply = await catalog.raw(request.method, target, request.body,
                                          vpc_headers(request.headers))  # fmt: skip
            except Unavailable as exc:
                raise ProxyError(502, str(exc)) from exc
            except MeshError as exc:
                raise ProxyError(502, f"the coordinator's answer broke off: {exc}") from exc
        log_event(log, "vpc_forwarded", logging.DEBUG, method=request.method, status=reply.status,
                  path=target.partition("?")[0], coordinator=reply.url)  # fmt: skip
        return relayed_response(reply.status, reply.headers, reply.body)

    # -- local answers ------------------------------------------------------------------------

    async def _local(self, request: Request) -> bytes:
        """``/health``, ``/gateway``, or a guest-agent call (dstack-vpc's dstack.sock fallback)."""
        if request.method == "GET" and request.target.partition("?")[0] == "/health":
            return json_response(200, {"ok": True})
        method = agent_method(request.target)
        if method is None:
            return json_response(200, {"gateway_domain": gateway_domain(self.plane.config)})
        args = agent_args(request.method, request.target, request.body)
        try:
            doc = await asyncio.to_thread(_call_agent, self.agent, method, args)
        except MeshError as exc:
            raise ProxyError(502, str(exc)) from exc
        return json_response(200, doc)


def _call_agent(endpoint: str | None, method: str, args: dict[str, Any]) -> Any:
    with AgentClient(endpoint) as agent:
        return agent.call(method, args)


def agent_endpoint(launch: Path) -> str | None:
    """The guest agent ``teemesh sidecar run --agent`` named, as the admission helper uses it."""
    from teemesh.sidecar.launch import Launch  # noqa: PLC0415

    try:
        return Launch.read(launch).agent
    except MeshError:
        return None
