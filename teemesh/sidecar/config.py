"""A sidecar's configuration: who it is, whom it trusts, what it serves and which routes it offers.

One typed, frozen model, read once; every problem is reported together with its path. On dstack
this file is part of the measured compose, so the routes' ``callers`` (who may call a backend)
are attested along with the code.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from teemesh.attest.policy import Policy, with_platform_key
from teemesh.config import ConfigError, Frozen, parse_model, read_yaml
from teemesh.coordinator.policy import Label
from teemesh.coordinator.records import Address
from teemesh.errors import InputError
from teemesh.net.attested_https import https_target

VIP_NETWORK = ipaddress.ip_network("127.77.0.0/16")
"""Where route VIPs are drawn from when the configuration gives none."""
FIRST_VIP = 10


def _https(url: str) -> str:
    try:
        https_target(url)
    except InputError as exc:  # not a ValueError: pydantic would let it escape, path and all
        raise ValueError(exc.problem) from exc
    return url.rstrip("/")


def _loopback(vip: str) -> str:
    if ipaddress.ip_address(vip) not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"{vip} is not a loopback address (127.0.0.0/8)")
    return vip


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


HttpsUrl = Annotated[str, AfterValidator(_https)]
Vip = Annotated[str, AfterValidator(_loopback)]
HostPort = Annotated[str, AfterValidator(_host_port)]
Port = Annotated[int, Field(ge=1, le=65535)]


class HealthCheck(Frozen):
    """A TCP connect to the backend, or an HTTP GET of ``http`` expecting 2xx."""

    http: str | None = Field(None, pattern=r"^/[!-~]*$", max_length=1024)
    interval: float = Field(2.0, ge=0.1, le=300)
    timeout: float = Field(1.0, ge=0.05, le=60)
    rise: int = Field(1, ge=1, le=10)
    fall: int = Field(2, ge=1, le=10)


class Backend(Frozen):
    """A service this CVM serves on ``<host>:<port>``."""

    port: Port
    host: Address = "127.0.0.1"
    """Where the sidecar reaches it: loopback by default, or a local container's address."""
    owner: Literal["platform", "workload"] = "platform"
    """platform: the sidecar registers it and checks its health; workload: the workload sets
    its tags and health through the sidecar's local API (Patroni's roles)."""
    health: HealthCheck | None = None
    """Default: a TCP check for platform-owned backends, none for workload-owned ones."""
    tags: dict[Label, str] = Field(default_factory=dict)

    def health_check(self) -> HealthCheck | None:
        return self.health or (HealthCheck() if self.owner == "platform" else None)


class Route(Frozen):
    """A name the workload dials: ``<route>:<port>`` reaches an instance of ``backend``."""

    backend: Label
    port: Port
    role: Label | None = None
    """Only instances tagged ``role=<role>`` (a Patroni master or replica)."""
    callers: tuple[Label, ...] | None = None
    """Groups allowed to call the backend through this route; None: every admitted group."""
    vip: Vip | None = None


class SidecarConfig(Frozen):
    cluster: Label
    group: Label
    peer_id: Label
    coordinators: tuple[HttpsUrl, ...] = Field(min_length=1)
    coordinator_policy: Policy
    """What a coordinator's RA-TLS evidence must prove before the sidecar talks to it."""
    address: Address
    """Where other CVMs reach this one (registered in the catalog with the ingress port)."""
    ingress: HostPort = "0.0.0.0:7443"
    api: HostPort = "127.0.0.1:7001"
    """The local API: tags and health for workload-owned backends, status, metrics."""
    backends: dict[Label, Backend] = Field(default_factory=dict)
    routes: dict[Label, Route] = Field(default_factory=dict)
    max_connections: int = Field(10000, ge=1, le=1_000_000)
    idle_timeout: float = Field(3600, ge=1, le=7 * 24 * 3600)
    connect_timeout: float = Field(3, ge=0.1, le=60)
    eject_seconds: float = Field(10, ge=0.1, le=3600)
    drain_seconds: float = Field(10, ge=0, le=3600)

    @model_validator(mode="after")
    def _listeners_unique(self) -> SidecarConfig:
        problems: list[InitErrorDetails] = []

        def problem(name: str, message: str) -> None:
            error = PydanticCustomError("route", "{message}", {"message": message})
            problems.append(InitErrorDetails(type=error, loc=("routes", name), input=None))

        seen: dict[tuple[str, int], str] = {}
        vips = route_vips(self.routes)
        for name, route in self.routes.items():
            where = (vips[name], route.port)
            if where in seen:
                problem(name, f"listens on {where[0]}:{where[1]} like route {seen[where]}")
            seen.setdefault(where, name)
            local = self.backends.get(route.backend)
            if local is not None and local.port != route.port:
                serves = f"backend {route.backend} serves on {local.port}"
                problem(name, f"port {route.port} but {serves}")
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    @property
    def ingress_port(self) -> int:
        return int(self.ingress.rpartition(":")[2])

    def vips(self) -> dict[str, str]:
        return route_vips(self.routes)

    def callers_of(self, backend: str) -> frozenset[str] | None:
        """Groups allowed to call ``backend``: the union over its routes; None: any group."""
        routes = [r for r in self.routes.values() if r.backend == backend]
        if not routes or any(r.callers is None for r in routes):
            return None
        return frozenset(group for r in routes for group in r.callers or ())


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
    """Read a sidecar configuration; the coordinator policy's ``platform_key`` may be a path."""
    doc: Any = read_yaml(path)
    if not isinstance(doc, dict):
        raise ConfigError(str(path), ["(top level): expected a mapping"])
    policy = doc.get("coordinator_policy")
    if isinstance(policy, dict):
        doc = {**doc, "coordinator_policy": with_platform_key(policy, path)}
    return parse_model(SidecarConfig, doc, source=str(path))
