"""The docker compose each dstack app runs: the user's services and the teemesh containers.

Pure: a spec in, compose text out, the same bytes every time (the text is part of what the CVMs
are measured by). Every container runs in the CVM's network (``network_mode: host``), as dstack
apps do, so the sidecar's route VIPs on loopback are the apps' too; route names reach the apps
through ``extra_hosts`` (their ``/etc/hosts``), so no DNS is involved. Values that differ between
replicas are ``${VAR}`` references to the app's environment (dstack's encrypted env): compose
fills them in, and only their names are measured.
"""

from __future__ import annotations

import re
from typing import Any

from teemesh.sidecar.dstack import (
    ENV_ADDRESS,
    ENV_GATEWAY_CERT,
    ENV_GATEWAY_KEY,
    ENV_PEER_ID,
    ENV_PLATFORM_KEY,
    ENV_VIA_GATEWAY,
    REPLICA_ENV,
)
from teemesh.spec.goyaml import dump_compose_yaml, load_compose_yaml
from teemesh.spec.model import (
    DCS_PEER_PORT,
    ETCD_CLIENT_PORT,
    ETCD_METRICS_PORT,
    ETCD_PEER_PORT,
    ClusterSpec,
)
from teemesh.spec.user_compose import (
    APP,
    SIDECAR,
    VOLUME,
    read_user_compose,
    wire_service,
)

DSTACK_SOCKET = "/var/run/dstack.sock"
"""Where dstack's guest agent listens in the CVM, and in the containers that mount it."""
STATE = "/var/lib/teemesh"
ENV_POLICY = "TEEMESH_CLUSTER_POLICY"
"""The coordinator app: the cluster policy document (JSON), as ``teemesh render`` wrote it."""
ENV_ADMIN_TOKEN = "TEEMESH_ADMIN_TOKEN"  # noqa: S105 (the variable's name, not a token)
"""The coordinator app: the admin API's bearer token (32+ characters), which the operator keeps."""
ENV_CATALOG_CLUSTER = "TEEMESH_CATALOG_CLUSTER"
ENV_CATALOG_ENDPOINTS = "TEEMESH_CATALOG_ENDPOINTS"
ENV_DCS_CLUSTER = "TEEMESH_DCS_CLUSTER"
"""etcd's ``--initial-cluster`` of the catalog and of the DCS: ``<peer id>=https://<addr>:<port>,...``."""
_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)|\$([A-Za-z_][A-Za-z0-9_]*)")
PINNED = re.compile(r"[^@\s]+@sha256:[0-9a-f]{64}")


def unpinned_images(text: str) -> list[tuple[str, str]]:
    """(service, image) for every image of a rendered compose that is not pinned by digest (a
    tag can be moved to other code; a digest cannot)."""
    doc = load_compose_yaml(text) or {}
    return [
        (name, str(service.get("image")))
        for name, service in (doc.get("services") or {}).items()
        if not PINNED.fullmatch(str(service.get("image") or ""))
    ]


def _required(name: str) -> str:
    """``${NAME:?...}``: compose refuses to start the app without it, and says which."""
    return f"${{{name}:?set {name} in the app's environment}}"


def sidecar_env(spec: ClusterSpec, role: str) -> list[str]:
    """What a sidecar of ``role`` takes from its env (``teemesh.sidecar.dstack``): the replica's
    identity, and what no measurement can hold: the simulated platform's key, the gateway's
    certificate (the gateway app) or its address (the others, with ``transport: gateway``)."""
    names = list(REPLICA_ENV)
    if spec.tee == "simulated":
        names.append(ENV_PLATFORM_KEY)
    if role == "gateway":
        names += [ENV_GATEWAY_CERT, ENV_GATEWAY_KEY]
    elif spec.transport == "gateway" and spec.gateway is not None:
        names.append(ENV_VIA_GATEWAY)
    return names


def workload_compose(spec: ClusterSpec, group: str, hosts: dict[str, str]) -> str:
    """The compose of ``group``'s app: its sidecar, its ``command`` (in the teemesh image) and
    the services of its compose file, each given the route names (``hosts``: name -> VIP)."""
    g = spec.workload_groups[group]
    services: dict[str, Any] = {SIDECAR: _sidecar_service(spec, sidecar_env(spec, "workload"))}
    extra_hosts = [f"{name}:{vip}" for name, vip in hosts.items()]
    argv = g.argv()
    if argv:
        env = {
            "TEEMESH_CLUSTER": spec.cluster,
            "TEEMESH_GROUP": group,
            **{name: _required(name) for name in REPLICA_ENV},
            "TEEMESH_SIDECAR_API": f"http://127.0.0.1:{spec.sidecar.api}",
            **{name: f"${{{name}}}" for name in sorted(g.compose_env)},
        }
        services[APP] = {
            "image": spec.image,
            "network_mode": "host",
            "restart": "always",
            "depends_on": [SIDECAR],
            "entrypoint": [_escape(a) for a in argv],
            "environment": env,
            "volumes": [f"{DSTACK_SOCKET}:{DSTACK_SOCKET}"],
            "extra_hosts": extra_hosts,
        }
    user = read_user_compose(spec.compose_text(group), group)
    for name, service in (user.get("services") or {}).items():
        services[name] = wire_service(service, group, name, extra_hosts)
    doc: dict[str, Any] = {"services": services}
    volumes = user.get("volumes") or {}
    doc["volumes"] = {VOLUME: {}} | volumes
    for key, value in user.items():  # the rest of the user's file, as written
        if key not in ("services", "volumes", "version"):
            doc[key] = value
    return dump_compose_yaml(doc)


def coordinator_compose(spec: ClusterSpec) -> str:
    """The coordinators' app: the coordinator, its catalog's etcd member (``store: etcd``),
    and with a DCS the DCS member and the sidecar that serves it."""
    state = f"{STATE}/coordinator"
    argv = [
        "coordinator", "--cluster", spec.cluster,
        "--policy-env", ENV_POLICY, *_policy_signature(spec),
        "--admin-token-env", ENV_ADMIN_TOKEN,
        "--listen", f"0.0.0.0:{spec.coordinators.port}", "--state", state,
        "--agent", DSTACK_SOCKET,
        "--name", _required(ENV_ADDRESS), "--name", _required(ENV_PEER_ID),
    ]  # fmt: skip
    own = [ENV_PEER_ID, ENV_ADDRESS]
    services: dict[str, Any] = {}
    env = [*own, ENV_POLICY, ENV_ADMIN_TOKEN]
    if spec.coordinators.store == "etcd":
        argv += ["--store", "etcd", "--etcd-endpoints", _required(ENV_CATALOG_ENDPOINTS)]
        env.append(ENV_CATALOG_ENDPOINTS)
        client = f"https://{_required(ENV_ADDRESS)}:{ETCD_CLIENT_PORT}"
        metrics = f"http://{_required(ENV_ADDRESS)}:{ETCD_METRICS_PORT}"
        member = _store_member(spec, "etcd", client, ETCD_PEER_PORT, ENV_CATALOG_CLUSTER, metrics)
        services["teemesh-catalog"] = _teemesh_service(spec, member, [*own, ENV_CATALOG_CLUSTER])
    services["teemesh-coordinator"] = _teemesh_service(spec, argv, env)
    if spec.coordinators.dcs is not None:
        client = f"http://127.0.0.1:{spec.coordinators.dcs.port}"
        member = _store_member(spec, "dcs", client, DCS_PEER_PORT, ENV_DCS_CLUSTER)
        services["teemesh-dcs"] = _teemesh_service(spec, member, [*own, ENV_DCS_CLUSTER])
        services[SIDECAR] = _sidecar_service(spec, sidecar_env(spec, "coordinator"))
    return dump_compose_yaml({"services": services, "volumes": {VOLUME: {}}})


def referenced_env(text: str) -> set[str]:
    """The variables a compose text refers to (``$NAME``, ``${NAME}``, ``${NAME:-x}``...; not
    ``$$``): what compose fills in from the app's environment, so its ``allowed_envs``."""
    return {m[1] or m[2] for m in _REFERENCE.finditer(text) if m[0] != "$$"}


def gateway_compose(spec: ClusterSpec) -> str:
    """The gateway's app: a sidecar with the public listener, its certificate from the env."""
    sidecar = _sidecar_service(spec, sidecar_env(spec, "gateway"))
    return dump_compose_yaml({"services": {SIDECAR: sidecar}, "volumes": {VOLUME: {}}})


def store_member_argv(
    cluster: str,
    store: str,
    *,
    member: str,
    address: str,
    tls_dir: str,
    agent: str,
    data_dir: str,
    client: str,
    peer_port: int,
    initial_cluster: str,
    metrics: str | None = None,
    etcd: str = "etcd",
) -> list[str]:
    """``store-member ... -- etcd ...``: one member of the coordinators' store ``store`` (its
    peer id ``member``, at ``address``), which spans the coordinator CVMs; ``store-member`` gives
    it its TLS identity, then runs etcd. On dstack the values are env references, locally the
    CVM's own."""
    peer = f"https://{address}:{peer_port}"
    return [
        "store-member", "--cluster", cluster, "--store", store,
        "--tls-dir", tls_dir, "--agent", agent, "--name", address, "--name", member,
        *(["--client-tls"] if client.startswith("https://") else []),
        "--",
        etcd, "--name", member, "--data-dir", data_dir,
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", initial_cluster, "--initial-cluster-state", "new",
        "--initial-cluster-token", f"teemesh-{cluster}-{store}",
        *(["--listen-metrics-urls", metrics] if metrics else []),
    ]  # fmt: skip


def _store_member(spec: ClusterSpec, store: str, client: str, peer_port: int, cluster_env: str,
                  metrics: str | None = None) -> list[str]:  # fmt: skip
    """A member in a dstack CVM: its name, address and peers from the env."""
    return store_member_argv(
        spec.cluster, store, member=_required(ENV_PEER_ID), address=_required(ENV_ADDRESS),
        tls_dir=f"{STATE}/{store}-tls", agent=DSTACK_SOCKET, data_dir=f"{STATE}/{store}",
        client=client, peer_port=peer_port, initial_cluster=_required(cluster_env),
        metrics=metrics,
    )  # fmt: skip


def _sidecar_service(spec: ClusterSpec, env: list[str]) -> dict[str, Any]:
    argv = ["sidecar", "dstack", "--agent", DSTACK_SOCKET, "--state", f"{STATE}/sidecar"]
    return _teemesh_service(spec, argv, env)


def _teemesh_service(spec: ClusterSpec, argv: list[str], env: list[str]) -> dict[str, Any]:
    """A container of the teemesh image (its entrypoint is ``teemesh``)."""
    return {
        "image": spec.image,
        "network_mode": "host",
        "restart": "always",
        "command": argv,
        "environment": {name: _required(name) for name in env},
        "volumes": [f"{DSTACK_SOCKET}:{DSTACK_SOCKET}", f"{VOLUME}:{STATE}"],
    }


def _escape(arg: str) -> str:
    """Compose reads ``$`` in any value as interpolation: ``$$`` keeps it for the command."""
    return arg.replace("$", "$$")


def _policy_signature(spec: ClusterSpec) -> list[str]:
    """The coordinators take their policy from the env, which the host can replace: in the
    measured command, the key whose signature it must carry (only a simulated cluster may go
    without, and ``render`` refuses that for TDX)."""
    signer = spec.coordinators.policy_signer
    return ["--unsigned-policy"] if signer is None else ["--policy-signer", signer]
