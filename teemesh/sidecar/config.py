"""A sidecar's configuration: who it is, whom it trusts, what it serves and which routes it offers.

Frozen dataclasses, so the data plane holds them without pydantic; ``load_sidecar_config`` (run
by the CLI) validates a file against these very classes and reports every problem with its
path. On dstack this file is part of the measured compose, so the routes' ``callers`` (who may
call a backend) are attested along with the code.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le, MaxLen, MinLen

from teemesh.checks import (
    STRICT,
    Address,
    Check,
    Domain,
    HostPort,
    Label,
    Loopback,
    LoopbackHostPort,
    Port,
    split_host_port,
)
from teemesh.errors import InputError
from teemesh.net.tls import https_target
from teemesh.sidecar.contrast import ContrastProxy, contrast_from_json, proxy_problems

VIP_NETWORK = ipaddress.ip_network("127.77.0.0/16")
"""Where route VIPs are drawn from when the configuration gives none."""
FIRST_VIP = 10


def _https(url: str) -> str:
    try:
        https_target(url)
    except InputError as exc:  # not a ValueError: pydantic would let it escape, path and all
        raise ValueError(exc.problem) from exc
    return url.rstrip("/")


def _http_path(path: str) -> str:
    if not (path.startswith("/") and all("!" <= c <= "~" for c in path)):
        raise ValueError(f"expected an HTTP path like /health, got {path!r}")
    return path


HttpsUrl = Annotated[str, Check(_https)]


@dataclass(frozen=True)
class HealthCheck:
    """A TCP connect to the backend, or an HTTP GET of ``http`` expecting 2xx."""

    __pydantic_config__ = STRICT
    http: Annotated[str, MaxLen(1024), Check(_http_path)] | None = None
    interval: Annotated[float, Ge(0.1), Le(300)] = 2.0
    timeout: Annotated[float, Ge(0.05), Le(60)] = 1.0
    rise: Annotated[int, Ge(1), Le(10)] = 1
    fall: Annotated[int, Ge(1), Le(10)] = 2


@dataclass(frozen=True)
class Backend:
    """A service this CVM serves on ``<host>:<port>``."""

    __pydantic_config__ = STRICT
    port: Port
    host: Address = "127.0.0.1"
    """Where the sidecar reaches it: loopback by default, or a local container's address."""
    owner: Literal["platform", "workload"] = "platform"
    """platform: the sidecar registers it and checks its health; workload: the workload sets
    its tags and health through the sidecar's local API (Patroni's roles)."""
    health: HealthCheck | None = None
    """Default: a TCP check for platform-owned backends, none for workload-owned ones."""
    tags: dict[Label, str] = field(default_factory=dict)

    def health_check(self) -> HealthCheck | None:
        return self.health or (HealthCheck() if self.owner == "platform" else None)


@dataclass(frozen=True)
class Route:
    """A name the workload dials: ``<route>:<port>`` reaches an instance of ``backend``."""

    __pydantic_config__ = STRICT
    backend: Label
    port: Port
    role: Label | None = None
    """Only instances tagged ``role=<role>`` (a Patroni master or replica)."""
    peer: Label | None = None
    """Only the instance with this peer id: one replica by name (a Patroni member's REST API,
    which the other members call)."""
    callers: tuple[Label, ...] | None = None
    """Groups allowed to call the backend through this route; None: every admitted group."""
    vip: Loopback | None = None


@dataclass(frozen=True)
class PublicBackend:
    """A backend the gateway may reach: ``<app id of group>-<port>.<base domain>``."""

    __pydantic_config__ = STRICT
    group: Label
    backend: Label
    port: Port


@dataclass(frozen=True)
class GatewaySettings:
    """This sidecar is the cluster's public gateway: dstack's SNI names, mapped onto the mesh."""

    __pydantic_config__ = STRICT
    base_domain: Domain
    certificate: str
    """PEM file: the certificate chain for ``*.<base_domain>`` (terminated names)."""
    key: str
    """PEM file: its private key (owner-only)."""
    listen: HostPort = "0.0.0.0:443"
    public: tuple[PublicBackend, ...] = ()
    txt_records: str | None = None
    """A YAML file of TXT records for custom domains (the local platform); else DNS."""
    nameservers: tuple[HostPort, ...] = ()
    """DNS servers for the TXT lookups of custom domains (default: the system's)."""
    client_hello_timeout: Annotated[float, Ge(0.1), Le(300)] = 10


@dataclass(frozen=True)
class ViaGateway:
    """The gateway transport: tunnels to peers go through a gateway's TLS passthrough, named
    ``<instance_id>-<ingress port>s.<base_domain>``; the mesh mTLS stays end to end."""

    __pydantic_config__ = STRICT
    address: HostPort
    base_domain: Domain


@dataclass(frozen=True)
class AuthService:
    """dstack-vpc's auth service for nginx's ``auth_request``: who a client certificate is."""

    __pydantic_config__ = STRICT
    listen: HostPort = "127.0.0.1:8092"
    callers: tuple[Label, ...] | None = None
    """Groups let through (others get 403); None: every group of the cluster."""


@dataclass(frozen=True)
class ClientProxy:
    """dstack-vpc's client proxy: plain HTTP routed by ``x-dstack-target-*`` headers into the
    mesh (``teemesh.sidecar.clientproxy``); the port picks a backend through ``routes``."""

    __pydantic_config__ = STRICT
    listen: LoopbackHostPort = "127.0.0.1:8091"
    """Loopback only: whoever reaches it speaks as this CVM, in the mesh and to its agent."""


@dataclass(frozen=True)
class SidecarConfig:
    __pydantic_config__ = STRICT
    cluster: Label
    group: Label
    peer_id: Label
    coordinators: Annotated[tuple[HttpsUrl, ...], MinLen(1)]
    coordinator_policy: dict[str, Any]
    """What a coordinator's RA-TLS evidence must prove: an attestation policy, checked when
    the file is loaded; only the admission helper uses it."""
    address: Address
    """Where other CVMs reach this one (registered in the catalog with the ingress port)."""
    ingress: HostPort = "0.0.0.0:7443"
    api: HostPort = "127.0.0.1:7001"
    """The local API: tags and health for workload-owned backends, status, metrics."""
    backends: dict[Label, Backend] = field(default_factory=dict)
    routes: dict[Label, Route] = field(default_factory=dict)
    max_connections: Annotated[int, Ge(1), Le(1_000_000)] = 10000
    idle_timeout: Annotated[float, Ge(1), Le(7 * 24 * 3600)] = 3600
    connect_timeout: Annotated[float, Ge(0.1), Le(60)] = 3
    eject_seconds: Annotated[float, Ge(0.1), Le(3600)] = 10
    drain_seconds: Annotated[float, Ge(0), Le(3600)] = 10
    gateway: GatewaySettings | None = None
    via_gateway: ViaGateway | None = None
    auth: AuthService | None = None
    contrast: ContrastProxy | None = None
    """Contrast's sidecar settings (EDG_*/CONTRAST_* variables): ``sidecar.contrast``."""
    client_proxy: ClientProxy | None = None

    @property
    def ingress_port(self) -> int:
        return split_host_port(self.ingress)[1]

    def vips(self) -> dict[str, str]:
        return route_vips(self.routes)

    def callers_of(self, backend: str) -> frozenset[str] | None:
        """Groups allowed to call ``backend``: the union over its routes; None: any group."""
        routes = [r for r in self.routes.values() if r.backend == backend]
        if not routes or any(r.callers is None for r in routes):
            return None
        return frozenset(group for r in routes for group in r.callers or ())


def route_problems(config: SidecarConfig) -> list[str]:
    """What the fields' own checks cannot see: two routes on one listener, a wrong port."""
    problems: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    vips = route_vips(config.routes)
    for name, route in config.routes.items():
        where = (vips[name], route.port)
        if where in seen:
            problems.append(
                f"routes.{name}: listens on {where[0]}:{where[1]} like route {seen[where]}"
            )
        seen.setdefault(where, name)
        local = config.backends.get(route.backend)
        if local is not None and local.port != route.port:
            serves = f"backend {route.backend} serves on {local.port}"
            problems.append(f"routes.{name}: port {route.port} but {serves}")
    return problems


def route_vips(routes: dict[str, Route]) -> dict[str, str]:
    """Each route's VIP: the one it names, else the next free one of ``VIP_NETWORK`` in
    declaration order (every sidecar of a cluster has the same routes, so the same VIPs)."""
    taken = {r.vip for r in routes.values() if r.vip}
    hosts = (str(VIP_NETWORK[i]) for i in range(FIRST_VIP, VIP_NETWORK.num_addresses - 1))
    out: dict[str, str] = {}
    for name, route in routes.items():
        if route.vip:
            out[name] = route.vip
            continue
        vip = next(hosts)
        while vip in taken:
            vip = next(hosts)
        out[name] = vip
    return out


def hosts_lines(config: SidecarConfig) -> str:
    """The ``/etc/hosts`` lines that make route names resolve to their VIPs."""
    return "".join(f"{vip} {name}\n" for name, vip in config.vips().items())


def load_sidecar_config(path: Path) -> SidecarConfig:
    """Read and validate a sidecar configuration; ``coordinator_policy.platform_key`` may be a
    path next to the file (it is read in, so the result stands alone)."""
    from teemesh.config import ConfigError, read_yaml  # noqa: PLC0415

    doc: Any = read_yaml(path)
    if not isinstance(doc, dict):
        raise ConfigError(str(path), ["(top level): expected a mapping"])
    return parse_sidecar_config(doc, source=str(path), relative_to=path)


def parse_sidecar_config(
    doc: dict[str, Any], *, source: str, relative_to: Path | None = None
) -> SidecarConfig:
    """Validate a configuration document: every problem at once, each with its path."""
    # validation is the CLI's business: the data plane never imports pydantic or the policy
    from teemesh.attest.policy import Policy, with_platform_key  # noqa: PLC0415
    from teemesh.config import ConfigError, parse_model  # noqa: PLC0415

    problems: list[str] = []
    policy = doc.get("coordinator_policy")
    if isinstance(policy, dict):
        try:
            if relative_to is not None:
                policy = with_platform_key(policy, relative_to)
            parse_model(Policy, policy, source="coordinator_policy")
        except ConfigError as exc:
            problems += [_within("coordinator_policy", p) for p in exc.problems]
        doc = {**doc, "coordinator_policy": policy}
    try:
        config = parse_model(SidecarConfig, doc, source=source)
    except ConfigError as exc:
        raise ConfigError(source, exc.problems + problems) from exc
    problems += route_problems(config)
    problems += proxy_problems(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def _within(field: str, problem: str) -> str:
    top = "(top level): "
    return f"{field}: {problem[len(top) :]}" if problem.startswith(top) else f"{field}.{problem}"


def config_from_json(doc: dict[str, Any]) -> SidecarConfig:
    """Rebuild a configuration ``load_sidecar_config`` validated, from its JSON (``asdict``)."""
    backends = {
        name: Backend(**{**b, "health": HealthCheck(**b["health"]) if b.get("health") else None})
        for name, b in doc["backends"].items()
    }
    routes = {
        name: Route(**{**r, "callers": None if r.get("callers") is None else tuple(r["callers"])})
        for name, r in doc["routes"].items()
    }
    gateway = doc.get("gateway")
    if gateway is not None:
        public = tuple(PublicBackend(**b) for b in gateway["public"])
        gateway = GatewaySettings(**{**gateway, "public": public,
                                     "nameservers": tuple(gateway["nameservers"])})  # fmt: skip
    via, auth = doc.get("via_gateway"), doc.get("auth")
    if auth is not None:
        callers = auth.get("callers")
        auth = AuthService(**{**auth, "callers": None if callers is None else tuple(callers)})
    if doc.get("client_proxy") is not None:
        doc = {**doc, "client_proxy": ClientProxy(**doc["client_proxy"])}
    fields = {**doc, "coordinators": tuple(doc["coordinators"])}
    fields = {**fields, "contrast": contrast_from_json(doc.get("contrast"))}
    return SidecarConfig(**{**fields, "backends": backends, "routes": routes, "gateway": gateway,
                            "via_gateway": None if via is None else ViaGateway(**via),
                            "auth": auth})  # fmt: skip
