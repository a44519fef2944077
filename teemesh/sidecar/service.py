"""The sidecar process: admission, catalog watches, listeners, registration, local API, drain.

Start order matters for safety: nothing listens for mesh traffic before the CVM is admitted and
the revocation list is loaded, so the first tunnel is already checked against it. Shutdown runs
the other way: leave the catalog, stop accepting, let open tunnels finish, then close them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from teemesh.checks import Health, split_host_port
from teemesh.coordinator.catalog_client import CatalogClient
from teemesh.encoding import DNS_LABEL
from teemesh.errors import InputError, MeshError
from teemesh.logs import log_event
from teemesh.sidecar import api
from teemesh.sidecar.admission import Admission, Svid
from teemesh.sidecar.config import SidecarConfig, hosts_lines
from teemesh.sidecar.egress import EgressListener
from teemesh.sidecar.hosts import write_hosts
from teemesh.sidecar.ingress import IngressListener
from teemesh.sidecar.metrics import Metrics
from teemesh.sidecar.plane import Plane
from teemesh.sidecar.registration import Registrar

if TYPE_CHECKING:
    from teemesh.sidecar.contrast_proxy import ContrastListeners

log = logging.getLogger("teemesh.sidecar")
WATCH_RETRY = 1.0
HEALTH_VALUES = get_args(Health)


class Sidecar:
    def __init__(
        self,
        config: SidecarConfig,
        launch: Path,
        *,
        hosts_file: Path | None = None,
    ) -> None:
        """``launch``: the file the admission helper reads (``teemesh.sidecar.launch``)."""
        self.config = config
        self.metrics = Metrics()
        self.plane = Plane(config, self.metrics)
        self.hosts_file = hosts_file
        self.admission = Admission(
            launch, len(config.coordinators), metrics=self.metrics, on_svid=self._use_svid
        )
        self.catalog: CatalogClient | None = None
        self.registrar: Registrar | None = None
        self.registrar_task: asyncio.Task[None] | None = None
        self.api_server: asyncio.Server | None = None
        self.servers: list[asyncio.Server] = []
        """The mesh listeners: ingress and one per route."""
        self.tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()
        self._instances_loaded = asyncio.Event()
        self._revocations_loaded = asyncio.Event()
        self.contrast: ContrastListeners | None = None
        """Contrast's sidecar listeners (``config.contrast``), once admitted."""

    def _use_svid(self, svid: Svid) -> None:
        self.plane.use_identity(svid.identity, svid.ca_certificate)
        if self.contrast is not None:
            self.contrast.use_identity(svid.identity)
        if self.catalog is not None:
            self.catalog.use_svid(svid.identity)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Returns once the sidecar serves: admitted, catalog loaded, listeners open."""
        config = self.config
        self.api_server = await api.serve_api(*split_host_port(config.api), self.handle_api)
        self._spawn(self.admission.run())
        await self.admission.admitted.wait()
        svid = self.admission.svid
        assert svid is not None
        self.catalog = CatalogClient(config.coordinators, self.admission.pins, svid.identity)
        plane = self.plane
        self._spawn(
            self._watch(
                "revocations/",
                plane.load_revocations,
                plane.revocation_events,
                self._revocations_loaded,
            )
        )
        self._spawn(self._watch("instances/", plane.load_instances, plane.instance_events,
                                self._instances_loaded))  # fmt: skip
        await self._revocations_loaded.wait()
        await self._instances_loaded.wait()
        loop = asyncio.get_running_loop()
        host, port = split_host_port(config.ingress)
        self.servers.append(
            await loop.create_server(IngressListener(self.plane), host, port, backlog=1024)
        )
        for name, vip in config.vips().items():
            route = config.routes[name]
            listener = EgressListener(self.plane, name, route)
            self.servers.append(await loop.create_server(listener, vip, route.port, backlog=1024))
        if config.gateway is not None:
            # imported here: only the gateway's sidecar needs SNI routing and DNS
            from teemesh.gateway.listener import GatewayListener  # noqa: PLC0415

            public = GatewayListener.from_settings(self.plane, config.gateway)
            host, port = split_host_port(config.gateway.listen)
            self.servers.append(await loop.create_server(public, host, port, backlog=1024))
        if config.auth is not None:
            host, port = split_host_port(config.auth.listen)
            self.servers.append(await api.serve_http(host, port, self.handle_auth))
        if config.client_proxy is not None:
            # imported here: only a sidecar offering dstack-vpc's client proxy needs it
            from teemesh.sidecar.clientproxy import ClientProxyListener, agent_endpoint  # noqa: PLC0415

            proxy = ClientProxyListener(self.plane, agent_endpoint(self.admission.launch),
                                        self.catalog)  # fmt: skip
            host, port = split_host_port(config.client_proxy.listen)
            self.servers.append(await loop.create_server(proxy, host, port, backlog=1024))
        if config.contrast is not None:
            # imported here: only a sidecar given Contrast's EDG_/CONTRAST_ settings runs these
            from teemesh.sidecar.contrast_proxy import ContrastListeners  # noqa: PLC0415

            current = self.admission.svid or svid  # renewed meanwhile: the newer identity
            self.contrast = ContrastListeners(self.plane, config, current.identity)
            self.servers += await self.contrast.start(self.ready.is_set)
        if self.hosts_file is not None:
            write_hosts(self.hosts_file, hosts_lines(config))
        self.registrar = Registrar(config, self.catalog, self.metrics)
        self.registrar_task = asyncio.get_running_loop().create_task(self.registrar.run())
        self.ready.set()
        log_event(log, "serving", peer=f"{config.group}/{config.peer_id}", ingress=config.ingress,
                  routes=config.vips())  # fmt: skip

    async def handle_auth(self, request: api.Request) -> api.Response:
        """dstack-vpc's auth service (``auth``), judged by this moment's CA and revocations."""
        # imported here: only a sidecar that answers nginx parses certificates (cryptography)
        from teemesh.sidecar.authservice import Trust, decide  # noqa: PLC0415

        auth, plane = self.config.auth, self.plane
        assert auth is not None
        callers = None if auth.callers is None else frozenset(auth.callers)
        trust = Trust(self.config.cluster, plane.ca_pem.encode(), plane.wall_clock(),
                      frozenset(plane.revoked), callers)  # fmt: skip
        decision = decide(request.method, request.path, request.headers, trust)
        if decision.status in (401, 403):
            log_event(log, "auth_refused", status=decision.status, reason=decision.reason)
        body = decision.reason.encode() + b"\n"
        return api.Response(decision.status, "text/plain", body, decision.headers)

    def _spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    async def _watch(
        self,
        prefix: str,
        load: Callable[[dict[str, Any]], None],
        apply: Callable[[tuple[dict[str, Any], ...]], None],
        loaded: asyncio.Event,
    ) -> None:
        """Keep the plane's view of ``prefix`` current, for ever (across failovers)."""
        assert self.catalog is not None
        while True:
            try:
                async for update in self.catalog.watch(prefix):
                    if update.snapshot is not None:
                        load(update.snapshot)
                        loaded.set()
                    else:
                        apply(update.events)
            except MeshError as exc:  # our certificate was refused: await renewal
                log_event(log, "watch_failed", logging.WARNING, prefix=prefix, error=str(exc))
            await asyncio.sleep(WATCH_RETRY)

    async def stop(self) -> None:
        """Graceful: deregister, stop accepting, drain open tunnels, then stop everything."""
        if self.registrar is not None and self.registrar_task is not None:
            self.registrar_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.registrar_task
            await self.registrar.deregister_all()
        for server in self.servers:
            server.close()
        await self.plane.drain(self.config.drain_seconds)
        if self.api_server is not None:
            self.api_server.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        log_event(log, "stopped")

    # -- local API ---------------------------------------------------------------------------

    async def handle_api(self, method: str, path: str, doc: Any) -> api.Reply:
        if method == "GET" and path == "/health":
            ok = self.ready.is_set() and self.admission.state in ("admitted", "renewing")
            return api.json_reply(200 if ok else 503, {"ready": ok})
        if method == "GET" and path == "/metrics":
            return 200, "text/plain; version=0.0.4", self.metrics.render()
        if method == "GET" and path == "/v1/status":
            return api.json_reply(200, self.status())
        if method == "POST" and path == "/v1/admission/renew":
            self.admission.renew_now()
            return api.json_reply(202, self.admission.status())
        if method == "POST" and path.startswith("/v1/backends/"):
            return self._set_backend(path.removeprefix("/v1/backends/"), doc)
        return api.json_reply(404, {"error": f"no such endpoint: {method} {path}"})

    def _set_backend(self, name: str, doc: Any) -> api.Reply:
        if self.registrar is None:
            return api.json_reply(503, {"error": "the sidecar is not serving yet"})
        state = self.registrar.backends.get(name)
        if state is None:
            return api.json_reply(404, {"error": f"no backend {name!r} on this CVM"})
        if not isinstance(doc, dict) or set(doc) - {"role", "tags", "health"}:
            raise InputError("expected {role, tags, health}", field="body")
        role, tags, health = doc.get("role"), doc.get("tags") or {}, doc.get("health")
        if role is not None and not (isinstance(role, str) and DNS_LABEL.fullmatch(role)):
            raise InputError("role must be a DNS label or null", field="role")
        if not isinstance(tags, dict) or not all(
            isinstance(k, str) and DNS_LABEL.fullmatch(k) and isinstance(v, str)
            for k, v in tags.items()
        ):
            raise InputError("tags must map labels to strings", field="tags")
        if health is not None and health not in HEALTH_VALUES:
            raise InputError(f"health must be one of {', '.join(HEALTH_VALUES)}", field="health")
        if health is not None and state.backend.owner != "workload":
            raise InputError(f"{name} is platform-owned: its health is probed", field="health")
        changed = self.registrar.set_workload_state(
            name, role=role, clear_role="role" in doc and role is None, tags=tags, health=health
        )
        return api.json_reply(200, changed.to_json())

    def status(self) -> dict[str, Any]:
        config, plane = self.config, self.plane
        routes = []
        for name, vip in config.vips().items():
            route = config.routes[name]
            serving = plane.instances.serving(route)
            routes.append({
                "name": name, "listen": f"{vip}:{route.port}", "backend": route.backend,
                "role": route.role, "instances": sorted(i.peer_id for i in serving),
            })  # fmt: skip
        tunnels: dict[str, int] = {"egress": 0, "ingress": 0}
        for tunnel in plane.tunnels:
            tunnels[tunnel.direction] += 1
        backends = [s.to_json() for s in self.registrar.backends.values()] if self.registrar else []
        return {
            "peer": f"{config.group}/{config.peer_id}",
            "cluster": config.cluster,
            "ready": self.ready.is_set(),
            "admission": self.admission.status(),
            "ingress": config.ingress,
            "routes": routes,
            "backends": backends,
            "tunnels": tunnels,
            "revoked_serials": len(plane.revoked),
            "gateway": None
            if config.gateway is None
            else {
                "listen": config.gateway.listen,
                "base_domain": config.gateway.base_domain,
                "public": [f"{b.group}/{b.backend}:{b.port}" for b in config.gateway.public],
            },
            "time": int(time.time()),
        }
