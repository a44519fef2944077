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
from teemesh.spec.compose import (
    coordinator_compose,
    gateway_compose,
    referenced_env,
    workload_compose,
)
from teemesh.spec.model import ClusterSpec, ContrastSpec
from teemesh.spec.plan import Cvm, Plan, plan_cluster, sidecar_routes

SYSTEM_ROLES = ("coordinator", "kms", "gateway")


def app_compose_json(doc: dict[str, Any]) -> bytes:
    """dstack's normalized form (sorted keys, compact, UTF-8): one byte string per document."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def group_app_compose(spec: ClusterSpec, group: str) -> bytes:
    """The exact app-compose.json bytes the CVMs of ``group`` are measured by."""
    return AppComposes(plan_cluster(spec)).group(group)


def system_app_compose(spec: ClusterSpec, role: str) -> bytes:
    """The app-compose of the platform's own CVMs (``coordinator``, ``kms``, ``gateway``): one
    app per role, so all replicas of a role share a compose hash (and the coordinators derive
    the same mesh CA key). The KMS's has no compose: on dstack the KMS is dstack's own, and
    the local one stands in for it."""
    return AppComposes(plan_cluster(spec)).system(role)


class AppComposes:
    """The app-composes of one plan, each made once: every group's pins the coordinators' hash,
    and a policy, the app ids or a cluster's launch need them all."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._made: dict[str, bytes] = {}

    def group(self, group: str) -> bytes:
        if group not in self._made:
            self._made[group] = self._group(group)
        return self._made[group]

    def system(self, role: str) -> bytes:
        if role not in SYSTEM_ROLES:
            raise InputError(f"expected one of {', '.join(SYSTEM_ROLES)}", field="role")
        key = f"role:{role}"
        if key not in self._made:
            self._made[key] = self._system(role)
        return self._made[key]

    def _group(self, group: str) -> bytes:
        spec = self.plan.spec
        g = spec.workload_groups[group]
        if g.compose is not None and spec.compose_text(group) is None:
            raise InputError("its compose file was not read (use load_spec)", field=group)
        text = workload_compose(spec, group, _hosts(self.plan))
        mesh = {"cluster": spec.cluster, "group": group,
                "sidecar": _sidecar_section(self, "workload", group)}  # fmt: skip
        public = any(b.public for b in g.backends.values())
        envs = sorted(referenced_env(text) | set(g.compose_env))
        return app_compose_json(
            _dstack_fields(spec, f"{spec.cluster}-{group}", text, envs)
            | {"gateway_enabled": public and spec.gateway is not None, "teemesh": mesh}
        )

    def _system(self, role: str) -> bytes:
        spec = self.plan.spec
        if role == "kms":
            doc = _dstack_fields(spec, f"{spec.cluster}-{role}", "", [])
            doc["kms_enabled"] = False  # the KMS keeps its own root keys
            return app_compose_json(doc | {"teemesh": {"cluster": spec.cluster, "role": role}})
        mesh: dict[str, Any] = {"cluster": spec.cluster, "role": role}
        if role == "coordinator":
            text = coordinator_compose(spec)
            mesh["store"] = spec.coordinators.store
            if spec.coordinators.dcs is not None:  # its sidecar serves the DCS route
                mesh["sidecar"] = _sidecar_section(self, "coordinator", "coordinator")
        else:
            text = gateway_compose(spec)
            mesh["sidecar"] = _sidecar_section(self, "gateway", "gateway")
        doc = _dstack_fields(spec, f"{spec.cluster}-{role}", text, sorted(referenced_env(text)))
        return app_compose_json(doc | {"teemesh": mesh})


def _hosts(plan: Plan) -> dict[str, str]:
    """Route name -> VIP: every app container's extra hosts."""
    return {r.name: r.vip for r in plan.routes}


def _dstack_fields(spec: ClusterSpec, name: str, compose: str, envs: list[str]) -> dict[str, Any]:
    """dstack's own settings. A pinned KMS goes in too: the guest then refuses, before any key
    is used, to take its disk and env keys from another KMS (admission checks it again)."""
    pin = {"key_provider_id": spec.kms.key_provider_id} if spec.kms.key_provider_id else {}
    return pin | {
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


def cluster_policy(
    plan: Plan, platform_key: str | None = None, *, composes: AppComposes | None = None
) -> dict[str, Any]:
    """The ``ClusterPolicy`` document the coordinators admit by: per group its compose hash, the
    OS image, its peer ids (exactly its CVMs' names) and the services it may register.

    ``platform_key`` (PEM text, or a path next to the policy file) pins the simulated platform;
    a ``tee: simulated`` policy is loadable only with it, so ``plan`` shows the rest.
    ``composes``: the plan's, when the caller has them already."""
    spec = plan.spec
    apps = composes or AppComposes(plan)
    groups: dict[str, Any] = {}
    for name, group in spec.workload_groups.items():
        groups[name] = _attested(spec, apps.group(name)) | {
            "peer_ids": [c.name for c in plan.replicas(name)],
            "services": list(group.backends),
        }
    if spec.coordinators.dcs is not None:  # their sidecars serve the DCS
        groups["coordinator"] = _attested(spec, apps.system("coordinator")) | {
            "peer_ids": [c.name for c in plan.of_role("coordinator")],
            "services": [spec.coordinators.dcs.route],
        }
    if spec.gateway is not None:
        groups["gateway"] = _attested(spec, apps.system("gateway")) | {
            "peer_ids": [c.name for c in plan.of_role("gateway")],
            "services": [],
        }
    doc: dict[str, Any] = {"cluster": spec.cluster, "tee": spec.tee}
    if platform_key is not None:
        doc["platform_key"] = platform_key
    vpc = spec.coordinators.vpc
    if vpc is not None:
        allowed = "any" if vpc.allowed == "any" else [_app_id(apps.group(g)) for g in vpc.allowed]
        doc["vpc"] = {"allowed_apps": allowed}
    return doc | {"groups": groups}


def _attested(spec: ClusterSpec, app_compose: bytes | None) -> dict[str, Any]:
    """What an app's CVMs must show: its compose hash (None: left to the caller), the OS image,
    the KMS its keys come from, and a TCB status the cluster accepts."""
    hashes = {} if app_compose is None else {"compose_hashes": [compose_hash(app_compose).hex()]}
    return hashes | {
        "os_images": os_image_hashes(spec),
        "key_providers": [key_provider(spec)],
        "allowed_tcb_statuses": list(spec.allowed_tcb_statuses),
    }


def key_provider(spec: ClusterSpec) -> dict[str, str]:
    """The key provider the CVMs measure: the cluster's KMS (by its root key when the spec pins
    it), or ``none`` without one."""
    if spec.kms.count == 0:
        return {"name": "none"}
    pinned = spec.kms.key_provider_id
    return {"name": "kms"} | ({"id": pinned} if pinned else {})


def app_ids(spec: ClusterSpec) -> dict[str, str]:
    """Every app's id where the platform derives it from the compose hash: each workload group
    and the platform's own roles. The coordinators' is the one dstack-vpc apps call the VPC
    server (``x-dstack-target-app``)."""
    apps = AppComposes(plan_cluster(spec))
    ids = {name: _app_id(apps.group(name)) for name in spec.workload_groups}
    return ids | {role: _app_id(apps.system(role)) for role in system_apps(spec)}


def system_apps(spec: ClusterSpec) -> list[str]:
    """The platform's own apps that join the mesh (and are rendered for dstack): the
    coordinators, and the gateway when there is one (the KMS is dstack's own there)."""
    return ["coordinator", *(["gateway"] if spec.gateway is not None else [])]


def coordinator_attest_policy(
    plan: Plan, platform_key: str | None = None, *, composes: AppComposes | None = None
) -> dict[str, Any]:
    """The attestation policy a sidecar pins its coordinators with (their compose and image)."""
    doc: dict[str, Any] = {"tee": plan.spec.tee}
    if platform_key is not None:
        doc["platform_key"] = platform_key
    return doc | _attested(plan.spec, (composes or AppComposes(plan)).system("coordinator"))


def app_id(spec: ClusterSpec, group: str) -> str:
    """The dstack app id of ``group`` where the platform derives it from the compose hash (the
    simulated agent does; on dstack the KMS may assign another): the gateway's ``<id>``."""
    return _app_id(group_app_compose(spec, group))


def _app_id(app_compose: bytes) -> str:
    return default_app_id(compose_hash(app_compose)).hex()


def public_endpoints(plan: Plan) -> list[dict[str, Any]]:
    """Each public backend and the gateway name that reaches it (TLS terminated)."""
    spec = plan.spec
    if spec.gateway is None:
        return []
    apps = AppComposes(plan)
    out = []
    for entry in _public_backends(plan):
        app = _app_id(apps.group(entry["group"]))
        host = f"{app}-{entry['port']}.{spec.gateway.base_domain}"
        out.append(entry | {"app_id": app, "host": host})
    return out


def _public_backends(plan: Plan) -> list[dict[str, Any]]:
    """Each backend the spec marks public: what the gateway may reach."""
    return [
        {"group": name, "backend": backend, "port": b.port}
        for name, group in plan.spec.workload_groups.items()
        for backend, b in group.backends.items()
        if b.public
    ]


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
        "public": _public_backends(plan),
        "txt_records": txt_records,
    }


def runs_sidecar(spec: ClusterSpec, role: str) -> bool:
    """Workload and gateway CVMs run a sidecar; coordinator CVMs too when they serve a DCS."""
    return role in ("workload", "gateway") or (
        role == "coordinator" and spec.coordinators.dcs is not None
    )


def sidecar_section(plan: Plan, role: str, group: str) -> dict[str, Any]:
    """What every sidecar of one app is configured with, measured in its app-compose (see
    ``_sidecar_section``)."""
    return _sidecar_section(AppComposes(plan), role, group)


def _sidecar_section(apps: AppComposes, role: str, group: str) -> dict[str, Any]:
    """What every sidecar of one app is configured with, measured in its app-compose: the
    cluster's routes with their VIPs and callers, the app's backends and interfaces, and how it
    pins its coordinators (by compose hash, except in the coordinators' own app, whose sidecar
    pins its own: the hash of a document cannot be in it). ``teemesh sidecar dstack`` completes it
    with the replica's own settings (``teemesh.sidecar.dstack``), ``sidecar_config`` here."""
    plan = apps.plan
    spec = plan.spec
    mesh_group = spec.mesh_groups().get(group) if role != "gateway" else None
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
        for name, b in (mesh_group.backends.items() if mesh_group else ())
    }
    extra: dict[str, Any] = {}
    compat = spec.workload_groups[group].compat if role == "workload" else None
    if compat is not None:
        extra |= compat.model_dump(mode="json", exclude_none=True, exclude={"contrast"})
        if compat.contrast is not None:  # the sidecar's file form: the checked entries
            extra["contrast"] = _contrast_section(compat.contrast)
    if role == "gateway" and spec.gateway is not None:
        extra["gateway"] = {
            "base_domain": spec.gateway.base_domain,
            "listen": f"0.0.0.0:{spec.gateway.port}",
            "public": _public_backends(plan),
        }
    elif spec.transport == "gateway" and spec.gateway is not None:
        extra["via_gateway"] = {"base_domain": spec.gateway.base_domain}
    pin = {"tee": spec.tee} | _attested(
        spec, None if role == "coordinator" else apps.system("coordinator")
    )
    return extra | {
        "cluster": spec.cluster,
        "group": group,
        "coordinator_policy": pin,
        "ingress": f"0.0.0.0:{spec.sidecar.ingress}",
        "api": f"127.0.0.1:{spec.sidecar.api}",
        "backends": backends,
        "routes": routes,
    }


def sidecar_config(
    plan: Plan,
    cvm: Cvm | str,
    coordinator_urls: list[str],
    coordinator_policy: dict[str, Any],
    *,
    gateway: dict[str, Any] | None = None,
    composes: AppComposes | None = None,
) -> dict[str, Any]:
    """The sidecar configuration document of a workload, gateway or DCS-serving coordinator CVM:
    its app's measured ``sidecar_section`` and the CVM's own settings (``composes``: the plan's,
    when the caller has them, as a launch of many CVMs does).

    ``coordinator_urls`` are usually ``plan.coordinator_urls()``, and ``coordinator_policy``
    ``coordinator_attest_policy(plan, platform_key)``. The gateway CVM's sidecar needs
    ``gateway`` (``gateway_settings``); with ``transport: gateway`` the workloads' sidecars reach
    each other through it."""
    if isinstance(cvm, str):
        cvm = plan.cvm(cvm)
    spec = plan.spec
    if not runs_sidecar(spec, cvm.role):
        raise InputError(f"{cvm.name} is a {cvm.role} CVM, which runs no sidecar", field="CVM")
    section = _sidecar_section(composes or AppComposes(plan), cvm.role, cvm.group)
    if cvm.role == "gateway":
        if gateway is None:
            raise InputError("the gateway CVM's sidecar needs its gateway settings", field="CVM")
        section["gateway"] = gateway
    elif "via_gateway" in section:
        way_in = plan.of_role("gateway")[0]
        assert spec.gateway is not None
        section["via_gateway"] |= {"address": f"{way_in.address}:{spec.gateway.port}"}
    return section | {
        "peer_id": cvm.name,
        "coordinators": list(coordinator_urls),
        "coordinator_policy": dict(coordinator_policy),
        "address": cvm.address,
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
