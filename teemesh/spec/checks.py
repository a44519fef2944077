"""Plan-time checks: the rules that span fields, each problem as ``path: message``.

A pure function of a well-shaped spec; it returns every problem rather than stopping at the
first, so one run of ``teemesh plan`` lists all there is to fix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from teemesh.checks import split_host_port
from teemesh.encoding import DNS_LABEL
from teemesh.spec.model import (
    DCS_PEER_PORT,
    ETCD_CLIENT_PORT,
    ETCD_METRICS_PORT,
    ETCD_PEER_PORT,
    RESERVED_GROUPS,
    ClusterSpec,
    ContrastSpec,
    Route,
    WorkloadGroup,
)

MAX_CVMS = 4096
LOOPBACK_HOST = "127.0.0.1"
"""Where a replica's backends and its sidecar's API listen."""
MAX_SERVED_ROUTES = 10_000
"""Each route takes a loopback VIP of 127.77.0.0/16 in every CVM, and a listener."""


def spec_problems(spec: ClusterSpec) -> list[str]:
    return [
        *_platform_problems(spec),
        *_coordinator_port_problems(spec),
        *_group_problems(spec),
        *_backend_problems(spec),
        *_route_problems(spec),
        *_route_count_problems(spec),
        *_compat_problems(spec),
    ]


def spec_warnings(spec: ClusterSpec) -> list[str]:
    """What is allowed but probably not meant."""
    warnings: list[str] = []
    for name, group in spec.workload_groups.items():
        if group.command is None and group.compose is None:
            warnings.append(f"workload_groups.{name}: no command and no compose: runs nothing")
    return warnings


def _platform_problems(spec: ClusterSpec) -> Iterator[str]:
    if spec.coordinators.count > 1 and spec.coordinators.store == "embedded":
        yield (
            f"coordinators.count: {spec.coordinators.count} coordinators share a catalog only "
            "with store: etcd (embedded is one SQLite file)"
        )
    if spec.transport == "gateway" and spec.gateway is None:
        yield "transport: gateway needs a gateway section"
    if spec.tee == "tdx" and not spec.os_image_hashes:
        yield "os_image_hashes: tee tdx needs the dstack OS image hashes admission accepts"
    if spec.tee == "simulated" and spec.os_image_hashes is not None:
        yield "os_image_hashes: only for tee tdx (a simulated image's hash derives from os_image)"
    if spec.sidecar.ingress == spec.sidecar.api:
        yield f"sidecar.api: port {spec.sidecar.api} is also the sidecar's ingress port"
    cvms = len(spec.cvm_slots())
    net = ipaddress.IPv4Network(spec.network)
    hosts = max(net.num_addresses - 2, 0)
    needed = cvms + 1
    if cvms > MAX_CVMS:
        yield f"workload_groups: {cvms} CVMs; at most {MAX_CVMS}"
    elif needed > hosts:
        yield (
            f"network: {net} has {hosts} host addresses; the cluster needs {needed} "
            f"(the bridge and {needed - 1} CVMs)"
        )


def _coordinator_port_problems(spec: ClusterSpec) -> Iterator[str]:
    """Two listeners of a coordinator CVM on one port: one on all addresses, or both on the
    CVM's address or both on loopback. The sidecar runs there only with a DCS; its ports
    against each other and the DCS's backend are the mesh rules' (``_backend_problems``)."""
    coordinators = spec.coordinators
    # (spec path or "" for a fixed port, port, where it listens, what it is, a mesh listener);
    # the coordinator counts as all addresses: on dstack it listens on the host's network
    listeners = [("coordinators.port", coordinators.port, "all", "the coordinators' port", False)]
    if coordinators.store == "etcd":
        listeners += [
            ("", ETCD_CLIENT_PORT, "address", "the catalog etcd's client port", False),
            ("", ETCD_PEER_PORT, "address", "the catalog etcd's peer port", False),
            ("", ETCD_METRICS_PORT, "address", "the catalog etcd's metrics port", False),
        ]
    if coordinators.dcs is not None:
        dcs_port = coordinators.dcs.port
        listeners += [
            ("", DCS_PEER_PORT, "address", "the DCS's peer port", False),
            ("coordinators.dcs.port", dcs_port, "loopback", "the DCS's client port", True),
            ("sidecar.ingress", spec.sidecar.ingress, "all", "the sidecar's ingress port", True),
            ("sidecar.api", spec.sidecar.api, "loopback", "the sidecar's API port", True),
        ]
    for n, (path, port, where, what, mesh) in enumerate(listeners):
        for other_path, other_port, other_where, other, other_mesh in listeners[:n]:
            if port != other_port or (mesh and other_mesh):
                continue
            if "all" not in (where, other_where) and where != other_where:
                continue
            if path:
                yield f"{path}: {port} is also {other} in the coordinator CVMs"
            elif other_path:
                yield f"{other_path}: {port} is also {what} in the coordinator CVMs"


def _group_problems(spec: ClusterSpec) -> Iterator[str]:
    for name, group in spec.workload_groups.items():
        where = f"workload_groups.{name}"
        if name in RESERVED_GROUPS:
            yield f"{where}: {name} is reserved for the platform's own CVMs"
        last = f"{name}-{group.replicas - 1}"
        if len(last) > 63:
            yield f"{where}.replicas: peer id {last} is longer than a DNS label (63)"
        for key in group.compose_env:
            if key.startswith("TEEMESH_") or key == "DSTACK_SIMULATOR_ENDPOINT":
                yield f"{where}.compose_env.{key}: set by the platform"
    owners: dict[str, str] = {}
    for slot in spec.cvm_slots():
        owner = owners.setdefault(slot.name, slot.group)
        if owner != slot.group and slot.group not in RESERVED_GROUPS:
            yield f"workload_groups.{slot.group}: peer id {slot.name} already used by {owner}"


def _backend_problems(spec: ClusterSpec) -> Iterator[str]:
    served_by: dict[str, str] = {}
    sidecar = {
        spec.sidecar.ingress: "the sidecar's ingress port",
        spec.sidecar.api: "the sidecar API",
    }
    for name, group in spec.mesh_groups().items():
        ports: dict[int, str] = {}
        for backend_name, backend in group.backends.items():
            where = _where(spec, name, "backends", backend_name)
            owner = served_by.setdefault(backend_name, name)
            if owner != name:
                yield f"{where}: backend name already used by group {owner}"
            if backend.port in sidecar:
                yield f"{where}.port: {backend.port} is {sidecar[backend.port]}"
            elif backend.port in ports:
                yield f"{where}.port: {backend.port} already used by backend {ports[backend.port]}"
            ports.setdefault(backend.port, backend_name)


def _callers(spec: ClusterSpec) -> set[str]:
    """Who may be named a caller: the workload groups, and the gateway when there is one."""
    return set(spec.workload_groups) | ({"gateway"} if spec.gateway else set())


def _route_problems(spec: ClusterSpec) -> Iterator[str]:
    callers_allowed = _callers(spec)
    cvm_names = {slot.name for slot in spec.cvm_slots()}
    declared_by: dict[str, tuple[str, str]] = {}
    vips: dict[str, str] = {}
    groups = spec.mesh_groups()
    for name, group in groups.items():
        for route_name, served in group.served_routes(name):
            where = _where(spec, name, "routes", served.declared)
            called = "route name" if served.peer is None else f"route name {route_name}"
            owner = declared_by.setdefault(route_name, (name, served.declared))
            if owner[0] != name:
                yield f"{where}: {called} already used by group {owner[0]}"
            elif owner[1] != served.declared:
                yield f"{where}: {called} is also the name of route {owner[1]}"
            if route_name in cvm_names:
                yield f"{where}: {called} is also the name of a CVM"
            if served.peer is not None and not DNS_LABEL.fullmatch(route_name):
                yield f"{where}: {called} is longer than a DNS label (63)"
        for route_name, route in group.routes.items():
            where = _where(spec, name, "routes", route_name)
            if route.per_replica and route.vip is not None:
                yield f"{where}.vip: a per_replica route has one VIP per replica, picked for it"
            yield from _route_backend_problems(groups, name, where, route)
            unknown = [c for c in route.callers or () if c not in callers_allowed]
            if unknown:
                yield f"{where}.callers: no group named {', '.join(unknown)}"
            if route.callers is not None and len(set(route.callers)) != len(route.callers):
                yield f"{where}.callers: a group is listed twice"
            if route.vip is not None:
                other = vips.setdefault(route.vip, route_name)
                if other != route_name:
                    yield f"{where}.vip: {route.vip} already used by route {other}"


def _compat_problems(spec: ClusterSpec) -> Iterator[str]:
    """The anchors' interfaces: their listeners in a replica's CVM, whom they name."""
    vpc = spec.coordinators.vpc
    if vpc is not None and vpc.allowed != "any":
        unknown = [g for g in vpc.allowed if g not in spec.workload_groups]
        if unknown:
            yield f"coordinators.vpc.allowed: no workload group named {', '.join(unknown)}"
    callers_allowed = _callers(spec)
    for name, group in spec.workload_groups.items():
        compat = group.compat
        if compat is None:
            continue
        where = f"workload_groups.{name}.compat"
        # what already listens in the replica's CVM: (what, host, port); "" is every address
        taken = [("the sidecar's ingress port", "", spec.sidecar.ingress),
                 ("the sidecar's API port", LOOPBACK_HOST, spec.sidecar.api)]  # fmt: skip
        taken += [(f"backend {n}", LOOPBACK_HOST, b.port) for n, b in group.backends.items()]
        for field, listener in (("client_proxy", compat.client_proxy), ("auth", compat.auth)):
            if listener is None:
                continue
            host, port = split_host_port(listener.listen)
            try:
                host = "" if ipaddress.ip_address(host).is_unspecified else host
            except ValueError:
                yield f"{where}.{field}.listen: {host!r} is not an IP address to listen on"
                continue
            for what, other_host, other_port in taken:
                if port == other_port and (host == other_host or "" in (host, other_host)):
                    yield f"{where}.{field}.listen: port {port} is also {what}"
            taken.append((f"compat.{field}", host, port))
        if compat.auth is not None and compat.auth.callers is not None:
            unknown = [c for c in compat.auth.callers if c not in callers_allowed]
            if unknown:
                yield f"{where}.auth.callers: no group named {', '.join(unknown)}"
        if compat.contrast is not None:
            yield from _contrast_problems(spec, name, compat.contrast, f"{where}.contrast")


CONTRAST_VARIABLES = {"ingress": "CONTRAST_INGRESS_PROXY_CONFIG",
                      "egress": "CONTRAST_EGRESS_PROXY_CONFIG",
                      "admin_port": "CONTRAST_ADMIN_PORT"}  # fmt: skip
"""A spec's ``compat.contrast`` fields, and the variables of Contrast's sidecar they stand for."""


def contrast_environment(contrast: ContrastSpec) -> dict[str, str]:
    """The ``CONTRAST_*`` variables that say what ``contrast`` says."""
    texts = {field: getattr(contrast, field) for field in CONTRAST_VARIABLES}
    return {CONTRAST_VARIABLES[f]: str(t) for f, t in texts.items() if t is not None}


def _contrast_problems(
    spec: ClusterSpec, name: str, contrast: ContrastSpec, where: str
) -> Iterator[str]:
    """Contrast's grammar, by the sidecar's own parser; then what the sidecar would refuse
    with the rest of its configuration (ports it already takes, open ports of backends with
    callers, egress listeners on a route's VIP), as each replica's sidecar will check it."""
    from teemesh.config import ConfigError  # noqa: PLC0415
    from teemesh.sidecar import config as sidecar  # noqa: PLC0415
    from teemesh.sidecar.contrast import from_environment, proxy_problems  # noqa: PLC0415

    try:
        proxy = from_environment(contrast_environment(contrast))
    except ConfigError as exc:
        fields = {var: field for field, var in CONTRAST_VARIABLES.items()}
        for problem in exc.problems:
            var, sep, rest = problem.partition(": ")
            field = fields.get(var) if sep else None
            yield f"{where}.{field}: {rest}" if field else f"{where}: {problem}"
        return
    if proxy is None:
        return
    from teemesh.spec.plan import sidecar_routes  # noqa: PLC0415 (plan imports this module)

    group = spec.workload_groups[name]
    for body in spec.mesh_groups().values():
        if any(route.backend not in body.backends for route in body.routes.values()):
            return  # reported with the routes
    routes = sidecar_routes(spec)  # as every sidecar has them: their VIPs are the plan's
    compat = group.compat
    assert compat is not None
    config = sidecar.SidecarConfig(
        cluster=spec.cluster, group=name, peer_id=f"{name}-0", coordinators=("https://x",),
        coordinator_policy={}, address="192.0.2.1",  # a CVM's address: any but loopback
        ingress=f"0.0.0.0:{spec.sidecar.ingress}", api=f"{LOOPBACK_HOST}:{spec.sidecar.api}",
        backends={n: sidecar.Backend(port=b.port) for n, b in group.backends.items()},
        routes=routes, contrast=proxy,
        auth=None if compat.auth is None else sidecar.AuthService(listen=compat.auth.listen),
        client_proxy=None if compat.client_proxy is None else sidecar.ClientProxy(
            listen=compat.client_proxy.listen),
    )  # fmt: skip
    for problem in proxy_problems(config):
        yield f"{where}: {problem.removeprefix('contrast: ')}"


def _route_count_problems(spec: ClusterSpec) -> Iterator[str]:
    served = sum(len(g.served_routes(n)) for n, g in spec.mesh_groups().items())
    if served > MAX_SERVED_ROUTES:
        yield (
            f"workload_groups: {served} routes (a per_replica route counts once per replica); "
            f"at most {MAX_SERVED_ROUTES}"
        )


def _route_backend_problems(
    groups: dict[str, WorkloadGroup], group: str, where: str, route: Route
) -> Iterator[str]:
    """A route is declared by the group that serves it, on its backend's port."""
    backend = groups[group].backends.get(route.backend)
    if backend is None:
        serving = [g for g, body in groups.items() if route.backend in body.backends]
        if serving == ["coordinator"]:
            yield (f"{where}.backend: {route.backend} is the coordinators' DCS, served only "
                   "by its own route (coordinators.dcs.route)")  # fmt: skip
            return
        yield (
            f"{where}.backend: {route.backend} is served by group {serving[0]}: declare the "
            "route there (a route is declared by the group that serves it)"
            if serving
            else f"{where}.backend: group {group} has no backend {route.backend}"
        )
        return
    if route.port is not None and route.port != backend.port:
        yield (
            f"{where}.port: {route.port} but backend {route.backend} serves on "
            f"{backend.port} (a route listens on its backend's port)"
        )
    if route.role is not None and backend.owner != "workload":
        yield (
            f"{where}.role: roles are tags the workload sets, so backend "
            f"{route.backend} needs owner: workload"
        )


def _where(spec: ClusterSpec, group: str, kind: str, name: str) -> str:
    """Where a mesh group's backend or route is in the spec: ``coordinators.dcs`` (both its
    backend and its route), or a workload group's."""
    if group not in spec.workload_groups:
        return "coordinators.dcs"
    return f"workload_groups.{group}.{kind}.{name}"
