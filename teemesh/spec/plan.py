"""The plan: every CVM with its name and address, every route with its VIP. Pure and
deterministic, so each CVM, computing it from the same spec, agrees with every other."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any

from teemesh.config import ConfigError
from teemesh.errors import InputError
from teemesh.sidecar.config import Route as SidecarRoute
from teemesh.sidecar.config import route_vips
from teemesh.spec.checks import spec_problems, spec_warnings
from teemesh.spec.model import ClusterSpec, Role


@dataclass(frozen=True)
class Cvm:
    name: str
    """Also its peer id: ``<group>-<index>``, or ``kms-0``, ``coordinator-0``, ``gateway-0``."""
    role: Role
    group: str
    index: int
    address: str


@dataclass(frozen=True)
class PlannedRoute:
    name: str
    group: str
    """The group that declares and serves it."""
    backend: str
    port: int
    vip: str
    role: str | None
    callers: tuple[str, ...] | None
    """As the spec says; ``callers_with_gateway`` is what the serving sidecars enforce."""
    public: bool
    peer: str | None = None
    """The one replica it reaches (a ``per_replica`` route), else None."""

    def callers_with_gateway(self, gateway: bool) -> tuple[str, ...] | None:
        """A public backend is callable by the gateway, whatever else ``callers`` restricts."""
        if self.callers is None or not (self.public and gateway) or "gateway" in self.callers:
            return self.callers
        return (*self.callers, "gateway")


@dataclass(frozen=True)
class Plan:
    spec: ClusterSpec
    bridge: str
    """The host side of the cluster network (the first address)."""
    cvms: tuple[Cvm, ...]
    routes: tuple[PlannedRoute, ...]
    warnings: tuple[str, ...]

    @property
    def cluster(self) -> str:
        return self.spec.cluster

    def cvm(self, name: str) -> Cvm:
        """The CVM named ``name``; every command that takes a CVM takes these names."""
        for cvm in self.cvms:
            if cvm.name == name:
                return cvm
        known = ", ".join(c.name for c in self.cvms[:20])
        raise InputError(f"no CVM named {name!r} (the cluster has {known})", field="CVM")

    def of_role(self, role: str) -> tuple[Cvm, ...]:
        return tuple(c for c in self.cvms if c.role == role)

    def replicas(self, group: str) -> tuple[Cvm, ...]:
        """The CVMs of a mesh group: a workload group's replicas, or the coordinators (which
        serve the DCS as the group ``coordinator``)."""
        return tuple(c for c in self.cvms if c.group == group and c.role != "gateway")

    def coordinator_urls(self) -> list[str]:
        port = self.spec.coordinators.port
        return [f"https://{c.address}:{port}" for c in self.of_role("coordinator")]

    def kms_urls(self) -> list[str]:
        return [f"https://{c.address}:{self.spec.kms.port}" for c in self.of_role("kms")]

    def hosts_lines(self) -> str:
        """``/etc/hosts`` lines naming every CVM by its address (route names are the sidecar's)."""
        return "".join(f"{c.address} {c.name}\n" for c in self.cvms)

    def to_json(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "cluster": spec.cluster,
            "tee": spec.tee,
            "os_image": spec.os_image_name,
            "network": spec.network,
            "bridge": self.bridge,
            "transport": spec.transport,
            "coordinators": spec.coordinators.model_dump(mode="json"),
            "kms": spec.kms.model_dump(mode="json"),
            "gateway": spec.gateway.model_dump(mode="json") if spec.gateway else None,
            "cvms": [asdict(c) for c in self.cvms],
            "routes": [asdict(r) for r in self.routes],
            "warnings": list(self.warnings),
        }


def plan_cluster(spec: ClusterSpec) -> Plan:
    """Allocate names, addresses and VIPs; refuses (ConfigError) a spec that fails its checks."""
    problems = spec_problems(spec)
    if problems:
        raise ConfigError(spec.cluster, problems)
    hosts = ipaddress.IPv4Network(spec.network).hosts()
    bridge = str(next(hosts))
    cvms = tuple(
        Cvm(slot.name, slot.role, slot.group, slot.index, str(next(hosts)))
        for slot in spec.cvm_slots()
    )
    return Plan(spec, bridge, cvms, _routes(spec), tuple(spec_warnings(spec)))


def sidecar_routes(spec: ClusterSpec) -> dict[str, SidecarRoute]:
    """Every route of the cluster in declaration order, as the sidecar's configuration has it."""
    routes: dict[str, SidecarRoute] = {}
    for group_name, group in spec.mesh_groups().items():
        for name, (_, route, peer) in group.served_routes(group_name):
            port = group.backends[route.backend].port
            routes[name] = SidecarRoute(
                backend=route.backend, port=port, role=route.role, peer=peer,
                callers=route.callers, vip=route.vip,
            )  # fmt: skip
    return routes


def _routes(spec: ClusterSpec) -> tuple[PlannedRoute, ...]:
    vips = route_vips(sidecar_routes(spec))
    return tuple(
        PlannedRoute(
            name=name,
            group=group_name,
            backend=route.backend,
            port=group.backends[route.backend].port,
            vip=vips[name],
            role=route.role,
            callers=route.callers,
            public=group.backends[route.backend].public,
            peer=peer,
        )
        for group_name, group in spec.mesh_groups().items()
        for name, (_, route, peer) in group.served_routes(group_name)
    )
