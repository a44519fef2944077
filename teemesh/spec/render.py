"""Documents derived from a plan: each group's app-compose, the coordinator's admission policy,
each CVM's sidecar configuration and command environment.

The app-compose is what a group's CVMs are measured by (its sha256 is the compose hash), so the
admission policy and the platform that boots the CVMs must build it with the same function:
``group_app_compose``. It holds what decides a group's behaviour and authority (its compose
file, the names of its env, its local command, its backends and the routes it serves with their
``callers``) and nothing that differs between replicas or runs (peer ids, addresses, keys), so
replicas share one hash and adding a replica admits nothing new.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from teemesh.attest.dstack import compose_hash, default_app_id
from teemesh.attest.simulated import OsImage
from teemesh.errors import InputError
from teemesh.sidecar.contrast import from_environment
from teemesh.spec.checks import contrast_environment
from teemesh.spec.model import ClusterSpec, ContrastSpec, Route
from teemesh.spec.plan import Cvm, Plan, sidecar_routes

SYSTEM_ROLES = ("coordinator", "kms", "gateway")


def app_compose_json(doc: dict[str, Any]) -> bytes:
    """dstack's normalized form (sorted keys, compact, UTF-8): one byte string per document."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def group_app_compose(spec: ClusterSpec, group: str) -> bytes:
    """The exact app-compose.json bytes the CVMs of ``group`` are measured by."""
    g = spec.workload_groups[group]
    text = spec.compose_text(group)
    if g.compose is not None and text is None:
        raise InputError("its compose file was not read (use load_spec)", field=group)
    mesh = {
        "cluster": spec.cluster,
        "group": group,
        "command": g.argv(),
        "backends": {n: b.model_dump(mode="json") for n, b in g.backends.items()},
        "routes": {n: _measured_route(r) for n, r in g.routes.items()},
    }
    if g.compat is not None:  # only when set: specs without it keep their compose hash
        mesh["compat"] = g.compat.model_dump(mode="json", exclude_none=True)
    public = any(b.public for b in g.backends.values())
    return app_compose_json(
        _dstack_fields(spec, f"{spec.cluster}-{group}", text or "", sorted(g.compose_env))
        | {"gateway_enabled": public and spec.gateway is not None, "teemesh": mesh}
    )


def _measured_route(route: Route) -> dict[str, Any]:
    """A route as measured: not its VIP (a local address), and ``per_replica`` only when set, so
    the routes of specs written before it existed keep their compose hash (and app id)."""
    skip = {"vip"} if route.per_replica else {"vip", "per_replica"}
    return route.model_dump(mode="json", exclude=skip)


def system_app_compose(spec: ClusterSpec, role: str) -> bytes:
    """The app-compose of the platform's own CVMs (``coordinator``, ``kms``, ``gateway``): one
    app per role, so all replicas of a role share a compose hash (and the coordinators derive
    the same mesh CA key)."""
    if role not in SYSTEM_ROLES:
        raise InputError(f"expected one of {', '.join(SYSTEM_ROLES)}", field="role")
    mesh: dict[str, Any] = {"cluster": spec.cluster, "role": role}
    if role == "coordinator":
        mesh["store"] = spec.coordinators.store
        if spec.coordinators.dcs is not None:  # the route it serves, and to whom
            mesh["dcs"] = spec.coordinators.dcs.model_dump(mode="json", exclude={"vip"})
    doc = _dstack_fields(spec, f"{spec.cluster}-{role}", "", [])
    if role == "kms":
        doc["kms_enabled"] = False  # the KMS keeps its own root keys
    return app_compose_json(doc | {"teemesh": mesh})


def _dstack_fields(spec: ClusterSpec, name: str, compose: str, envs: list[str]) -> dict[str, Any]:
    return {
        "manifest_version": 2,
        "name": name,
        "runner": "docker-compose",
        "docker_compose_file": compose,
        "allowed_envs": envs,
        "kms_enabled": spec.kms.count > 0,
        "gateway_enabled": False,
        "public_logs": False,
        "public_sysinfo": False,
        "no_instance_id": False,
    }


def os_image_hashes(spec: ClusterSpec) -> list[str]:
    if spec.tee == "simulated":
        return [OsImage(spec.os_image_name or "").os_image_hash.hex()]
    return list(spec.os_image_hashes or ())


def cluster_policy(plan: Plan, platform_key: str | None = None) -> dict[str, Any]:
    """The ``ClusterPolicy`` document the coordinators admit by: per group its compose hash, the
    OS image, its peer ids (exactly its CVMs' names) and the services it may register.

    ``platform_key`` (PEM text, or a path next to the policy file) pins the simulated platform;
    a ``tee: simulated`` policy is loadable only with it, so ``plan`` shows the rest."""
    spec = plan.spec
    images = os_image_hashes(spec)
    groups: dict[str, Any] = {}
    for name, group in spec.workload_groups.items():
        groups[name] = {
            "compose_hashes": [compose_hash(group_app_compose(spec, name)).hex()],
            "os_images": images,
            "peer_ids": [c.name for c in plan.replicas(name)],
            "services": list(group.backends),
        }
    if spec.coordinators.dcs is not None:  # their sidecars serve the DCS
        groups["coordinator"] = {
            "compose_hashes": [compose_hash(system_app_compose(spec, "coordinator")).hex()],
            "os_images": images,
            "peer_ids": [c.name for c in plan.of_role("coordinator")],
            "services": [spec.coordinators.dcs.route],
        }
    if spec.gateway is not None:
        groups["gateway"] = {
            "compose_hashes": [compose_hash(system_app_compose(spec, "gateway")).hex()],
            "os_images": images,
            "peer_ids": [c.name for c in plan.of_role("gateway")],
            "services": [],
        }
    doc: dict[str, Any] = {"cluster": spec.cluster, "tee": spec.tee}
    if platform_key is not None:
        doc["platform_key"] = platform_key
    vpc = spec.coordinators.vpc
    if vpc is not None:
        allowed = "any" if vpc.allowed == "any" else [app_id(spec, g) for g in vpc.allowed]
        doc["vpc"] = {"allowed_apps": allowed}
    return doc | {"groups": groups}


def app_ids(spec: ClusterSpec) -> dict[str, str]:
    """Every app's id where the platform derives it from the compose hash: each workload group
    and the platform's own roles. The coordinators' is the one dstack-vpc apps call the VPC
    server (``x-dstack-target-app``)."""
    ids = {name: app_id(spec, name) for name in spec.workload_groups}
    roles = ["coordinator", *(["gateway"] if spec.gateway is not None else [])]
    return ids | {r: default_app_id(compose_hash(system_app_compose(spec, r))).hex() for r in roles}


def coordinator_attest_policy(plan: Plan, platform_key: str | None = None) -> dict[str, Any]:
    """The attestation policy a sidecar pins its coordinators with (their compose and image)."""
    doc: dict[str, Any] = {"tee": plan.spec.tee}
    if platform_key is not None:
        doc["platform_key"] = platform_key
    coordinator = system_app_compose(plan.spec, "coordinator")
    return doc | {
        "compose_hashes": [compose_hash(coordinator).hex()],
        "os_images": os_image_hashes(plan.spec),
    }


def app_id(spec: ClusterSpec, group: str) -> str:
    """The dstack app id of ``group`` where the platform derives it from the compose hash (the
    simulated agent does; on dstack the KMS may assign another): the gateway's ``<id>``."""
    return default_app_id(compose_hash(group_app_compose(spec, group))).hex()


def public_endpoints(plan: Plan) -> list[dict[str, Any]]:
    """Each public backend and the gateway name that reaches it (TLS terminated)."""
    spec = plan.spec
    if spec.gateway is None:
        return []
    out = []
    for name, group in spec.workload_groups.items():
        app = app_id(spec, name)
        for backend, b in group.backends.items():
            if b.public:
                host = f"{app}-{b.port}.{spec.gateway.base_domain}"
                out.append({"group": name, "backend": backend, "port": b.port, "app_id": app,
                            "host": host})  # fmt: skip
    return out


def gateway_settings(
    plan: Plan, *, certificate: str, key: str, txt_records: str | None = None
) -> dict[str, Any]:
    """The ``gateway`` section of the gateway CVM's sidecar: the spec's base domain and public
    backends, with the certificate files where that CVM finds them."""
    spec = plan.spec
    if spec.gateway is None:
        raise InputError("the spec has no gateway section", field="gateway")
    return {
        "base_domain": spec.gateway.base_domain,
        "certificate": certificate,
        "key": key,
        "listen": f"0.0.0.0:{spec.gateway.port}",
        "public": [
            {"group": e["group"], "backend": e["backend"], "port": e["port"]}
            for e in public_endpoints(plan)
        ],
        "txt_records": txt_records,
    }


def runs_sidecar(spec: ClusterSpec, role: str) -> bool:
    """Workload and gateway CVMs run a sidecar; coordinator CVMs too when they serve a DCS."""
    return role in ("workload", "gateway") or (
        role == "coordinator" and spec.coordinators.dcs is not None
    )


def sidecar_config(
    plan: Plan,
    cvm: Cvm | str,
    coordinator_urls: list[str],
    coordinator_policy: dict[str, Any],
    *,
    gateway: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sidecar configuration document of a workload, gateway or DCS-serving coordinator CVM.

    Every CVM gets the same routes with the same VIPs; a route's ``callers`` gain ``gateway``
    when its backend is public and the cluster has a gateway. ``coordinator_urls`` are usually
    ``plan.coordinator_urls()``, and ``coordinator_policy`` ``coordinator_attest_policy(plan,
    platform_key)``. The gateway CVM's sidecar needs ``gateway`` (``gateway_settings``); with
    ``transport: gateway`` the workloads' sidecars reach each other through it."""
    if isinstance(cvm, str):
        cvm = plan.cvm(cvm)
    spec = plan.spec
    if not runs_sidecar(spec, cvm.role):
        raise InputError(f"{cvm.name} is a {cvm.role} CVM, which runs no sidecar", field="CVM")
    group = spec.mesh_groups().get(cvm.group) if cvm.role != "gateway" else None
    planned = {r.name: r for r in plan.routes}
    has_gateway = spec.gateway is not None
    routes = {
        name: {
            "backend": route.backend,
            "port": route.port,
            "role": route.role,
            "peer": route.peer,
            "callers": _list(planned[name].callers_with_gateway(has_gateway)),
            "vip": planned[name].vip,
        }
        for name, route in sidecar_routes(spec).items()
    }
    backends = {
        name: {
            "port": b.port,
            "owner": b.owner,
            "health": b.model_dump(mode="json")["health"],
        }
        for name, b in (group.backends.items() if group else ())
    }
    extra: dict[str, Any] = {}
    compat = spec.workload_groups[cvm.group].compat if cvm.role == "workload" else None
    if compat is not None:
        extra |= compat.model_dump(mode="json", exclude_none=True, exclude={"contrast"})
        if compat.contrast is not None:  # the sidecar's file form: the checked entries
            extra["contrast"] = _contrast_section(compat.contrast)
    if cvm.role == "gateway":
        if gateway is None:
            raise InputError("the gateway CVM's sidecar needs its gateway settings", field="CVM")
        extra["gateway"] = gateway
    elif spec.transport == "gateway" and spec.gateway is not None:
        way_in = plan.of_role("gateway")[0]
        extra["via_gateway"] = {"address": f"{way_in.address}:{spec.gateway.port}",
                                "base_domain": spec.gateway.base_domain}  # fmt: skip
    return extra | {
        "cluster": spec.cluster,
        "group": cvm.group,
        "peer_id": cvm.name,
        "coordinators": list(coordinator_urls),
        "coordinator_policy": dict(coordinator_policy),
        "address": cvm.address,
        "ingress": f"0.0.0.0:{spec.sidecar.ingress}",
        "api": f"127.0.0.1:{spec.sidecar.api}",
        "backends": backends,
        "routes": routes,
    }


def _contrast_section(contrast: ContrastSpec) -> dict[str, Any] | None:
    """Contrast's settings, parsed from their own grammar (``checks`` refused a bad one), as
    the ``contrast`` section of a sidecar's configuration file."""
    proxy = from_environment(contrast_environment(contrast))
    return None if proxy is None else json.loads(json.dumps(dataclasses.asdict(proxy)))


def command_env(plan: Plan, cvm: Cvm | str) -> dict[str, str]:
    """What a workload replica's command sees besides the platform's own variables (the agent's
    ``DSTACK_SIMULATOR_ENDPOINT``, ``PATH``): its identity, its sidecar and ``compose_env``."""
    if isinstance(cvm, str):
        cvm = plan.cvm(cvm)
    if cvm.role != "workload":
        raise InputError(f"{cvm.name} is a {cvm.role} CVM, which runs no command", field="CVM")
    group = plan.spec.workload_groups[cvm.group]
    return dict(group.compose_env) | {
        "TEEMESH_CLUSTER": plan.cluster,
        "TEEMESH_GROUP": cvm.group,
        "TEEMESH_INDEX": str(cvm.index),
        "TEEMESH_PEER_ID": cvm.name,
        "TEEMESH_ADDRESS": cvm.address,
        "TEEMESH_SIDECAR_API": f"http://127.0.0.1:{plan.spec.sidecar.api}",
    }


def _list(values: tuple[str, ...] | None) -> list[str] | None:
    return None if values is None else list(values)
