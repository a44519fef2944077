"""Import the anchor's Terraform (``locals { workload_groups = {...} }``) as a cluster spec.

The anchor (Dstack-TEE/service-mesh) describes a cluster in ``cluster.tf`` locals; the shape read
here is its predecessor's, which is what could be verified (see ``research/service-mesh.md``):

    locals {
      cluster_name         = "demo"                 # or: cluster
      coordinator_replicas = 3                      # or: coordinators = {count, store}
      kms_replicas         = 1
      gateway_base_domain  = "example.com"          # a gateway (gateway_domain works too)
      transport            = "direct"
      workload_groups = {
        api = {
          replicas     = 2
          compose      = file("${path.module}/api/docker-compose.yaml")   # or a plain path
          compose_env  = { LOG_LEVEL = "info" }     # or: env
          command      = "python -m app"            # the spec's own field, for local runs
          public       = true                       # every backend public; or public_ports
          backends     = { api = { port = 8080 } }  # the spec's own shape, or:
          services     = [                          # the anchor's flat list, one per route:
            { name = "postgres-master",  port = 5432, subset = "master" },
            { name = "postgres-replica", port = 5432, subset = "replica" },
          ]
          routes       = { api = { backend = "api" } }   # or a list of {name = ..., ...}
        }
      }
    }

Entries of ``services`` that share a port are one backend (the anchor's collapse): named by
their ``parent``, else by the entry without a subset, else by the cluster name (Patroni's
scope), with one owner and one parent. ``var.X`` and ``local.X`` resolve to variable defaults
and other locals; any other expression is refused. Phala Cloud settings (size, region, disk...)
have no place in the spec and are skipped with a note; anything else unknown is an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from teemesh.config import ConfigError

PHALA_ONLY = frozenset(
    {"size", "instance_type", "region", "disk_size", "storage_fs", "kms", "listed", "image",
     "public_logs", "public_sysinfo", "public_tcbinfo", "wait_for_ready", "vcpu", "memory",
     "env_keys", "node_id", "teepod_id", "gpu", "gpus", "members", "depends_on"}
)  # fmt: skip
"""Per-CVM settings of the Phala provider, skipped with a note."""
GROUP_FIELDS = frozenset(
    {"replicas", "command", "compose", "compose_env", "env", "public", "public_ports",
     "backends", "services", "routes"}
)  # fmt: skip
SERVICE_FIELDS = frozenset(
    {"name", "port", "subset", "role", "parent", "owner", "callers", "health", "public"}
)
_REFERENCE = re.compile(r"\$\{(var|local)\.([A-Za-z_][A-Za-z0-9_-]*)\}")
_INTERPOLATION = re.compile(r"(?<!\$)\$\{")
_FILE = re.compile(r'\$\{file\("([^"]*)"\)\}')
_MAX_DEPTH = 8


class _Importer:
    def __init__(self, tree: dict[str, Any]) -> None:
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.locals: dict[str, Any] = {}
        for block in tree.get("locals", []):
            if isinstance(block, dict):
                self.locals.update(block)
        self.variables: dict[str, Any] = {}
        for block in tree.get("variable", []):
            for name, body in (block if isinstance(block, dict) else {}).items():
                if isinstance(body, dict) and "default" in body:
                    self.variables[name] = body["default"]

    def value(self, value: Any, where: str, depth: int = 0) -> Any:
        """``value`` with references resolved; a problem (and None) for other expressions."""
        if isinstance(value, dict):
            return {str(k): self.value(v, f"{where}.{k}", depth) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, f"{where}.{i}", depth) for i, v in enumerate(value)]
        if isinstance(value, str) and _INTERPOLATION.search(value):
            return self._expression(value, where, depth)
        if isinstance(value, str):
            return value.replace("$${", "${")  # HCL's escape for a literal ${
        return value

    def _expression(self, text: str, where: str, depth: int) -> Any:
        reference = _REFERENCE.fullmatch(text)
        if reference is None or depth >= _MAX_DEPTH:
            self.problems.append(f"{where}: unsupported expression {text}: give a literal value")
            return None
        kind, name = reference.groups()
        scope = self.variables if kind == "var" else self.locals
        if name not in scope:
            what = "variable without a default" if kind == "var" else "local"
            self.problems.append(f"{where}: {kind}.{name}: no such {what}")
            return None
        return self.value(scope[name], where, depth + 1)

    def local(self, *names: str) -> Any:
        for name in names:
            if name in self.locals:
                return self.value(self.locals[name], name)
        return None


def import_hcl(
    text: str,
    *,
    source: str = "cluster.tf",
    tee: str = "simulated",
    os_image_hashes: tuple[str, ...] = (),
    relative_to: Path | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The spec document the Terraform ``text`` describes, and notes on what was skipped.

    ``relative_to`` rebases compose paths (relative to the .tf file's folder, ``Path(source)``'s
    parent) onto the folder the spec will be written to. Raises ConfigError with every problem.
    """
    import hcl2  # noqa: PLC0415 (lark is heavy; only this command needs it)

    options = hcl2.SerializationOptions(
        strip_string_quotes=True, with_comments=False, explicit_blocks=False,
        preserve_heredocs=False,
    )  # fmt: skip
    try:
        tree = hcl2.loads(text, serialization_options=options)
    except Exception as exc:  # lark's errors share no base class with hcl2's own
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(source, [f"not valid HCL: {first}"]) from exc
    imp = _Importer(tree if isinstance(tree, dict) else {})
    groups = imp.locals.get("workload_groups")
    if isinstance(groups, str):  # workload_groups = local.other: resolved, file() and all
        groups = imp.value(groups, "workload_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(source, ["locals: no workload_groups = { <group> = {...} } found"])
    folder = Path(source).parent
    doc: dict[str, Any] = {"cluster": imp.local("cluster_name", "cluster"), "tee": tee}
    if doc["cluster"] is None:
        doc["cluster"] = "demo"
        imp.notes.append("cluster: demo (the locals name no cluster_name)")
    if tee == "tdx":
        doc["os_image_hashes"] = list(os_image_hashes)
    coordinators = imp.local("coordinators")
    replicas = imp.local("coordinator_replicas")
    if isinstance(coordinators, dict):
        doc["coordinators"] = coordinators
    elif replicas is not None:
        doc["coordinators"] = {"count": replicas}
        if isinstance(replicas, int) and replicas > 1:
            doc["coordinators"]["store"] = "etcd"
            imp.notes.append(f"coordinators.store: etcd, so {replicas} coordinators share one "
                             "catalog (the anchor's Consul servers)")  # fmt: skip
    if (kms := imp.local("kms_replicas")) is not None:
        doc["kms"] = {"count": kms}
    if domain := imp.local("gateway_base_domain", "gateway_domain"):
        doc["gateway"] = {"base_domain": domain}
    if transport := imp.local("transport"):
        doc["transport"] = transport
    doc["workload_groups"] = {
        str(name): _group(imp, f"workload_groups.{name}", body, doc["cluster"], folder, relative_to)
        for name, body in groups.items()
    }
    if imp.problems:
        raise ConfigError(source, imp.problems)
    return doc, imp.notes


def _group(
    imp: _Importer, where: str, body: Any, cluster: Any, folder: Path, relative_to: Path | None
) -> dict[str, Any]:
    if not isinstance(body, dict):
        imp.problems.append(f"{where}: expected an object {{ replicas = ..., ... }}")
        return {}
    out: dict[str, Any] = {}
    for key in body:
        if key in PHALA_ONLY:
            imp.notes.append(f"{where}.{key}: a Phala Cloud setting the spec has no use for")
        elif key not in GROUP_FIELDS:
            known = ", ".join(sorted(GROUP_FIELDS))
            imp.problems.append(f"{where}.{key}: unsupported field (known: {known})")
    for key in ("replicas", "command", "backends"):
        if key in body:
            out[key] = imp.value(body[key], f"{where}.{key}")
    env = body.get("compose_env", body.get("env"))
    if env is not None:
        out["compose_env"] = imp.value(env, f"{where}.compose_env")
    if "compose" in body:
        out["compose"] = _compose_path(
            imp, f"{where}.compose", body["compose"], folder, relative_to
        )
    routes = imp.value(body.get("routes", {}), f"{where}.routes")
    out["routes"] = _routes(imp, f"{where}.routes", routes)
    services = imp.value(body.get("services", []), f"{where}.services")
    if services:
        backends, more = _services(imp, f"{where}.services", services, cluster)
        out["backends"] = _merge(imp, f"{where}.services", out.get("backends") or {}, backends)
        out["routes"] = _merge(imp, f"{where}.services", out["routes"], more)
    public_ports = imp.value(body.get("public_ports", []), f"{where}.public_ports")
    public_all = imp.value(body.get("public", False), f"{where}.public") is True
    if isinstance(out.get("backends"), dict):
        for backend in out["backends"].values():
            if isinstance(backend, dict) and (
                public_all
                or (isinstance(public_ports, list) and backend.get("port") in public_ports)
            ):
                backend["public"] = True
    order = ("replicas", "command", "compose", "compose_env", "backends", "routes")
    return {k: out[k] for k in order if out.get(k) not in ({}, None)}


def _merge(imp: _Importer, where: str, given: Any, derived: dict[str, Any]) -> dict[str, Any]:
    """What ``services`` derives, added to what the group declares itself."""
    if not isinstance(given, dict):
        imp.problems.append(f"{where}: cannot add to backends or routes that are not a map")
        return derived
    for name in given.keys() & derived.keys():
        imp.problems.append(f"{where}: {name} is declared twice")
    return {**given, **derived}


def _compose_path(
    imp: _Importer, where: str, value: Any, folder: Path, relative_to: Path | None
) -> str | None:
    if isinstance(value, str) and (match := _FILE.fullmatch(value)):
        value = match.group(1)
    if isinstance(value, str):
        value = value.replace("${path.module}/", "").replace("${path.root}/", "")
    path = imp.value(value, where)
    if not isinstance(path, str):
        if path is not None:
            imp.problems.append(f'{where}: expected a file path or file("...")')
        return None
    if relative_to is None:
        return path
    return os.path.relpath(folder / path, relative_to)


def _routes(imp: _Importer, where: str, routes: Any) -> dict[str, Any]:
    if isinstance(routes, dict):
        items = list(routes.items())
    elif isinstance(routes, list):
        items = []
        for i, entry in enumerate(routes):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                imp.problems.append(f"{where}.{i}: expected {{ name = ..., backend = ... }}")
                continue
            if any(entry["name"] == name for name, _ in items):
                imp.problems.append(f"{where}.{i}.name: {entry['name']} is listed twice")
            items.append((entry["name"], {k: v for k, v in entry.items() if k != "name"}))
    else:
        imp.problems.append(f"{where}: expected a map of routes or a list of them")
        return {}
    out: dict[str, Any] = {}
    for name, route in items:
        renamed = route
        if isinstance(route, dict):  # the anchor's subset is the spec's role
            renamed = {("role" if k == "subset" else k): v for k, v in route.items()}
        out[str(name)] = renamed
    return out


def _services(
    imp: _Importer, where: str, services: Any, cluster: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The anchor's flat services list: one backend per port, one route per entry."""
    backends: dict[str, Any] = {}
    routes: dict[str, Any] = {}
    for port, entries in _entries_by_port(imp, where, services).items():
        parent, backend = _collapse(imp, f"{where}.{entries[0][0]}", port, entries, cluster)
        backends[parent] = backend
        for i, entry in entries:
            if entry["name"] in routes:
                imp.problems.append(f"{where}.{i}.name: {entry['name']} is listed twice")
            route: dict[str, Any] = {"backend": parent}
            if _role(entry) is not None:
                route["role"] = _role(entry)
            if entry.get("callers") is not None:
                route["callers"] = entry["callers"]
            routes[entry["name"]] = route
    return backends, routes


def _entries_by_port(
    imp: _Importer, where: str, services: Any
) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    if not isinstance(services, list):
        imp.problems.append(f"{where}: expected a list of {{ name, port, subset }}")
        return {}
    by_port: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for i, entry in enumerate(services):
        if not isinstance(entry, dict):
            imp.problems.append(f"{where}.{i}: expected {{ name = ..., port = ..., subset = ... }}")
            continue
        bad = sorted(entry.keys() - SERVICE_FIELDS)
        bad += [k for k in ("name", "port") if k not in entry]
        bad += [k for k in ("name", "subset", "role", "parent", "owner")
                if entry.get(k) is not None and not isinstance(entry[k], str)]  # fmt: skip
        if not isinstance(entry.get("port"), int) or isinstance(entry.get("port"), bool):
            bad.append("port")
        for key in dict.fromkeys(bad):
            problem = "unsupported field" if key not in SERVICE_FIELDS else "missing or invalid"
            imp.problems.append(f"{where}.{i}.{key}: {problem}")
        if not bad:
            by_port.setdefault(entry["port"], []).append((i, entry))
    return by_port


def _collapse(
    imp: _Importer, here: str, port: int, entries: list[tuple[int, dict[str, Any]]], cluster: Any
) -> tuple[str, dict[str, Any]]:
    """The one backend behind the entries at ``port``: one parent, one owner, one health."""
    plain = [e["name"] for _, e in entries if _role(e) is None]
    parents = sorted({e["parent"] for _, e in entries if e.get("parent") is not None})
    owners = sorted({e["owner"] for _, e in entries if e.get("owner") is not None})
    healths = [e["health"] for _, e in entries if e.get("health") is not None]
    if len(parents) > 1:
        imp.problems.append(f"{here}: one parent per backend: port {port} has {parents}")
    if not parents and len(plain) > 1:
        imp.problems.append(
            f"{here}: one parent per backend: {plain} at port {port} all lack a subset; set parent"
        )
    if len(owners) > 1:
        imp.problems.append(f"{here}: one owner per backend: port {port} has {owners}")
    if any(h != healths[0] for h in healths):
        imp.problems.append(f"{here}.health: the entries at port {port} disagree")
    backend: dict[str, Any] = {"port": port}
    if owners or any(_role(e) is not None for _, e in entries):
        backend["owner"] = owners[0] if owners else "workload"  # roles are the workload's tags
    if healths:
        backend["health"] = healths[0]
    if any(e.get("public") is True for _, e in entries):
        backend["public"] = True
    return str(parents[0] if parents else plain[0] if plain else cluster), backend


def _role(entry: dict[str, Any]) -> Any:
    return entry.get("subset", entry.get("role"))
