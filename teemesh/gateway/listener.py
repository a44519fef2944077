"""The gateway's public listener: each connection's ClientHello says where it goes.

A connection is held, unread by TLS, until its ClientHello is whole (``clienthello``); the SNI
then names an app or instance and a port (``sni``, or TXT records for a custom domain). Only the
backends the spec marks public are reachable, and every way in enters the mesh as a tunnel
under the gateway's own SVID, so CVM ports stay closed:

- terminated (``<id>-<port>``, ``g`` for HTTP/2): TLS ends here with the wildcard certificate,
  and the plaintext goes through a tunnel to the backend;
- passthrough (``s``, custom domains): the raw bytes, ClientHello first, go through a tunnel to
  a backend that serves its own TLS;
- the gateway transport (``<instance_id>-<ingress port>s``): a sidecar's own mTLS, passed to
  that instance's ingress as is; the mesh authenticates end to end.

A name that leads nowhere gets a TLS ``unrecognized_name`` alert and a close; bytes that are not
a ClientHello, or none within the timeout, a close. Never a hang.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Coroutine
from typing import Any, Protocol

from teemesh.checks import split_host_port
from teemesh.errors import InputError, MeshError
from teemesh.gateway.clienthello import ClientHello, parse_client_hello
from teemesh.gateway.resolve import DnsResolver, Resolver, StaticResolver
from teemesh.gateway.sni import Destination, Mode, route_sni
from teemesh.logs import log_event
from teemesh.net.relay import Leg, TcpLeg, TlsLeg, join
from teemesh.sidecar.config import GatewaySettings, Route
from teemesh.sidecar.egress import AcceptedLeg, EgressListener
from teemesh.sidecar.plane import Plane
from teemesh.sidecar.routing import Instance, live_instances_of

log = logging.getLogger("teemesh.gateway")
UNRECOGNIZED_NAME = bytes([21, 3, 3, 0, 2, 2, 112])
"""A fatal TLS alert record, ``unrecognized_name``: the client learns the name leads nowhere."""
MAX_LOCAL_REQUEST = 16 * 1024


class Refusal(Exception):
    """Why a public connection goes nowhere; ``reason`` is its metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class GatewayTarget(EgressListener):
    """Tunnels to one public backend of one app, or of one instance."""

    def __init__(self, plane: Plane, dest: Destination, backend: str, by_instance: bool) -> None:
        super().__init__(plane, f"{dest.id}-{dest.port}", Route(backend, dest.port))
        self.id = dest.id
        self.by_instance = by_instance

    def candidates(self) -> list[Instance]:
        serving = super().candidates()
        if self.by_instance:
            return [i for i in serving if i.instance_id == self.id]
        return [i for i in serving if i.app_id == self.id]


class GatewayListener:
    def __init__(
        self,
        plane: Plane,
        settings: GatewaySettings,
        resolver: Resolver,
        contexts: dict[Mode, ssl.SSLContext],
    ) -> None:
        self.plane = plane
        self.settings = settings
        self.resolver = resolver
        self.contexts = contexts
        self.public = {(b.group, b.port): b.backend for b in settings.public}
        self.targets: dict[tuple[str, int], GatewayTarget] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, plane: Plane, settings: GatewaySettings) -> GatewayListener:
        resolver: Resolver
        if settings.txt_records is not None:
            resolver = StaticResolver.from_file(settings.txt_records)
        else:
            servers = [split_host_port(s) for s in settings.nameservers] or None
            resolver = DnsResolver(servers)
        return cls(plane, settings, resolver, server_contexts(settings))

    def __call__(self) -> TcpLeg:
        return AcceptedLeg(self._accepted)

    # -- the ClientHello ------------------------------------------------------------------

    def _accepted(self, client: TcpLeg) -> None:
        buffer = bytearray()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(
            self.settings.client_hello_timeout, self._refuse, client, "timeout", None
        )
        client.on_close = lambda _leg, _exc: timer.cancel()

        def received(chunks: list[bytes]) -> None:
            buffer.extend(b"".join(chunks))
            try:
                hello = parse_client_hello(bytes(buffer))
            except InputError as exc:
                timer.cancel()
                self._refuse(client, "not_a_client_hello", str(exc))
                return
            if hello is None:
                return
            timer.cancel()
            client.sink = None
            client.on_close = None
            client.hold([bytes(buffer)])  # later bytes are held behind it until joined
            self._spawn(self._route(client, hello))

        client.sink = received

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _refuse(
        self, client: TcpLeg, reason: str, message: str | None, alert: bool = False
    ) -> None:
        self.plane.metrics.refusals.labels("gateway", reason).inc()
        if message is not None:
            log_event(log, "refused", logging.INFO, reason=reason, error=message)
        if alert and client.transport is not None:
            client.transport.write(UNRECOGNIZED_NAME)
            client.close()
        else:
            client.abort()

    # -- where it goes ---------------------------------------------------------------------

    async def _route(self, client: TcpLeg, hello: ClientHello) -> None:
        try:
            dest = await self._destination(hello)
            if dest.reserved:
                self._terminate(client, dest, LocalAnswer(self._local_answer(dest)))
                return
            instances, by_instance = self._instances_of(dest)
            if dest.mode is Mode.PASSTHROUGH and dest.port == instances[0].port:
                if not by_instance:
                    raise Refusal("not_public", f"{dest.id}: a mesh port is reached by "
                                                "instance id only")  # fmt: skip
                await self._to_ingress(client, instances[0])
                return
            target = self._target(dest, instances[0], by_instance)
        except Refusal as exc:
            self._refuse(client, exc.reason, str(exc), alert=True)
            return
        if dest.mode is Mode.PASSTHROUGH:
            target.attach(client)
        else:
            self._terminate(client, dest, target)

    async def _destination(self, hello: ClientHello) -> Destination:
        if hello.server_name is None:
            raise Refusal("no_sni", "the ClientHello names no server (SNI)")
        try:
            routed = route_sni(hello.server_name, [self.settings.base_domain])
            if isinstance(routed, Destination):
                return routed
            address = await self.resolver.lookup(routed.name)
        except MeshError as exc:  # a malformed name or TXT record, a DNS failure
            raise Refusal("bad_name", f"{hello.server_name}: {exc}") from exc
        if address is None:
            raise Refusal("unknown_domain", f"{routed.name}: no app address record")
        return Destination(address.app_id, address.port, Mode.PASSTHROUGH)

    def _instances_of(self, dest: Destination) -> tuple[list[Instance], bool]:
        """The catalog entries of the instance, or else of the app, ``dest`` names; True when
        it names an instance."""
        found, by_instance = live_instances_of(self.plane.instances.instances.values(), dest.id)
        if not found:
            raise Refusal("unknown_app", f"no live app or instance {dest.id}")
        return found, by_instance

    def _target(self, dest: Destination, instance: Instance, by_instance: bool) -> GatewayTarget:
        backend = self.public.get((instance.group, dest.port))
        if backend is None:
            raise Refusal("not_public", f"{dest.id}: port {dest.port} of {instance.group} is "
                                        "not public")  # fmt: skip
        key = (dest.id, dest.port)  # an id's group, so the backend at a port, never changes
        target = self.targets.get(key)
        if target is None:
            target = self.targets[key] = GatewayTarget(self.plane, dest, backend, by_instance)
        return target

    async def _to_ingress(self, client: TcpLeg, instance: Instance) -> None:
        """The gateway transport: raw bytes to a mesh peer's ingress, which checks the caller."""
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(TcpLeg, instance.address, instance.port),
                self.plane.config.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self._refuse(client, "unreachable", f"{instance.key}: {exc}")
            return
        if client.closed:
            upstream.abort()
            return
        self.plane.metrics.connections.labels("gateway", "mesh").inc()
        self.plane.sweeper.add(client, upstream)
        join(client, upstream)

    def _terminate(self, client: TcpLeg, dest: Destination, then: Attachable) -> None:
        """TLS ends here: the held ClientHello, then the rest, go to a server-side TLS leg."""
        transport = client.transport
        if transport is None or client.closed:
            return
        context = self.contexts[Mode.H2 if dest.mode is Mode.H2 and not dest.reserved
                                else Mode.TERMINATE]  # fmt: skip
        tls = TlsLeg(context, server_side=True, on_handshake=then.attach,
                     on_failure=lambda _leg, exc: self._handshake_failed(exc))  # fmt: skip
        held = client.take_held()
        client.sink = None
        transport.set_protocol(tls)
        tls.connection_made(transport)
        if held:
            tls.data_received(b"".join(held))

    def _handshake_failed(self, exc: BaseException) -> None:
        self.plane.metrics.handshakes.labels("gateway", "failed").inc()
        log_event(log, "handshake_failed", logging.INFO, error=str(exc))

    def _local_answer(self, dest: Destination) -> bytes:
        if dest.id == "health":
            return b"ok\n"
        doc = {
            "base_domain": self.settings.base_domain,
            "public": [f"{g}:{p} ({b})" for (g, p), b in sorted(self.public.items())],
            "instances": len(self.plane.instances.instances),
        }
        return json.dumps(doc, indent=1).encode() + b"\n"


class Attachable(Protocol):
    """What takes a terminated connection once its TLS handshake is done."""

    def attach(self, client: Leg) -> None: ...


class LocalAnswer:
    """The gateway's own answer (``health``, ``gateway``): one HTTP/1.1 response, then close."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def attach(self, client: Leg) -> None:
        request = bytearray()

        def received(chunks: list[bytes]) -> None:
            request.extend(b"".join(chunks))
            if b"\r\n\r\n" in request or len(request) > MAX_LOCAL_REQUEST:
                client.sink = None
                client.send([_http_response(self.body)])
                client.send_eof()

        client.sink = received
        held = client.take_held()
        if held:
            received(held)


def _http_response(body: bytes) -> bytes:
    kind = "application/json" if body.startswith(b"{") else "text/plain"
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


def check_settings(settings: GatewaySettings) -> None:
    """What ``from_settings`` will load, loaded once now: InputError names what is wrong."""
    server_contexts(settings)
    if settings.txt_records is not None:
        StaticResolver.from_file(settings.txt_records)


def server_contexts(settings: GatewaySettings) -> dict[Mode, ssl.SSLContext]:
    """The wildcard certificate's contexts: HTTP/1.1, and ALPN h2 for ``g`` names."""
    from teemesh.net.tls import tls_context  # noqa: PLC0415

    try:
        if os.stat(settings.key).st_mode & 0o077:
            raise InputError(f"{settings.key} may be read by others: chmod 600 it",
                             field="gateway.key")  # fmt: skip
        with open(settings.certificate) as cert, open(settings.key) as key:
            identity = (cert.read(), key.read())
        contexts = {}
        for mode, alpn in ((Mode.TERMINATE, ["http/1.1"]), (Mode.H2, ["h2"])):
            context = tls_context(server=True, identity=identity)
            context.set_alpn_protocols(alpn)
            contexts[mode] = context
    except (OSError, ssl.SSLError) as exc:
        raise InputError(f"cannot load the gateway certificate: {exc}",
                         field="gateway.certificate") from exc  # fmt: skip
    return contexts
