"""What ``teemesh up`` starts where: every file and process of a local cluster, from its plan.

Pure: the same plan and state dir give the same launch, which is recorded in the state dir
(``launch.json``) so ``restart`` starts a CVM again exactly as ``up`` did, and ``status``
knows the cluster without reading the spec again. Processes start in stages (KMS, the other
agents, the coordinators' etcd members, coordinators, then sidecars and commands); each may name
what shows it is ready.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from teemesh.attest.dstack import compose_hash
from teemesh.checks import split_host_port
from teemesh.errors import InputError
from teemesh.spec import (
    AppComposes,
    Cvm,
    Plan,
    PlannedRoute,
    cluster_policy,
    command_env,
    coordinator_attest_policy,
    gateway_settings,
    os_image_hashes,
    public_endpoints,
    runs_sidecar,
    sidecar_config,
)
from teemesh.spec.compose import store_member_argv
from teemesh.spec.model import DCS_PEER_PORT, ETCD_CLIENT_PORT, ETCD_METRICS_PORT, ETCD_PEER_PORT

LAUNCH_FILE = "launch.json"
STAGE_KMS_AGENT, STAGE_KMS, STAGE_AGENT, STAGE_STORE, STAGE_COORDINATOR, STAGE_WORKLOAD = range(6)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEV_GATEWAY_APP_ID = "teemesh-local"
"""What the local KMS's boot authorization (``--auth-dev``, every boot allowed) names."""


class ProcessSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = {}
    cwd: str | None = None
    stage: int
    ready_socket: str | None = None
    """Ready once this Unix socket exists (removed before each start)."""
    ready_tcp: str | None = None
    """Ready once ``HOST:PORT`` accepts a connection from the host."""
    ready_http: str | None = None
    """Ready once this URL answers 200 (etcd's ``/health`` once its cluster has a leader)."""
    host_network: bool = False
    """Runs in the host's network, not the CVM's (what publishes the gateway on the host)."""


class CvmLaunch(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    role: str
    group: str
    address: str
    api: str | None = None
    """The sidecar's local API (``127.0.0.1:PORT`` inside the CVM), for workload CVMs."""
    processes: tuple[ProcessSpec, ...]


class Launch(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    version: Literal[1] = 1
    cluster: str
    spec_path: str
    state_dir: str
    plan: dict[str, Any]
    cvms: tuple[CvmLaunch, ...]
    hosts: dict[str, str]
    """Route name -> VIP: each CVM's /etc/hosts, besides the CVM names."""
    instances: dict[str, int]
    """Route name -> how many CVMs serve it when the whole cluster is up."""
    public: tuple[str, ...] = ()
    """The gateway's URLs for the public backends, as published on this machine."""
    rendered: str | None = None
    """The ``teemesh render`` folder the CVMs run (``up --rendered``): ``restart`` measures its
    bytes again, as ``up`` did."""

    def cvm(self, name: str) -> CvmLaunch:
        for cvm in self.cvms:
            if cvm.name == name:
                return cvm
        known = ", ".join(c.name for c in self.cvms)
        raise InputError(f"cluster {self.cluster} has no CVM {name!r}; its CVMs: {known}")


@dataclass(frozen=True)
class RenderedApps:
    """What ``teemesh render`` wrote into ``folder``, run as it is: the user checks locally the
    very files they upload. ``app_composes``: app name -> its app-compose.json bytes (only the
    apps with a folder there); ``policy``: its cluster-policy.json, which cannot hold the local
    platform key (``launch_files`` adds it)."""

    folder: str
    app_composes: Mapping[str, bytes]
    policy: Mapping[str, Any]


def app_of(role: str, group: str) -> str | None:
    """The rendered app a CVM belongs to (its folder's name), or None for the KMS: dstack runs
    its own KMS, so render writes none."""
    if role == "kms":
        return None
    return group if role == "workload" else role


def app_compose(composes: AppComposes, cvm: Cvm, rendered: RenderedApps | None = None) -> bytes:
    """The bytes ``cvm`` is measured by: its app's rendered bytes when there are some, else
    what the spec renders."""
    app = app_of(cvm.role, cvm.group)
    if rendered is not None and app is not None and app in rendered.app_composes:
        return rendered.app_composes[app]
    if cvm.role == "workload":
        return composes.group(cvm.group)
    return composes.system(cvm.role)


def admission_policy(
    plan: Plan,
    platform_pub: str,
    rendered: RenderedApps | None = None,
    *,
    composes: AppComposes | None = None,
) -> dict[str, Any]:
    """The coordinators' cluster policy: the rendered one (with this cluster's platform key,
    which render cannot know), else the spec's."""
    if rendered is None:
        return cluster_policy(plan, platform_pub, composes=composes)
    rest = {k: v for k, v in rendered.policy.items() if k != "platform_key"}
    head = {k: rest.pop(k) for k in ("cluster", "tee") if k in rest}
    return head | {"platform_key": platform_pub} | rest  # where cluster_policy puts it


def rendered_drift(plan: Plan, rendered: RenderedApps) -> list[str]:
    """The rendered apps whose bytes differ from what the spec renders now (edited, or rendered
    from another version of the spec): their CVMs are measured with the rendered bytes."""
    apps = {app_of(c.role, c.group): c for c in plan.cvms}
    composes = AppComposes(plan)
    return [
        app
        for app, data in rendered.app_composes.items()
        if app in apps and data != app_compose(composes, apps[app])
    ]


def cvm_dir(state_dir: Path, cvm: str) -> Path:
    return state_dir / "cvms" / cvm


def agent_socket(state_dir: Path, cvm: str) -> Path:
    return cvm_dir(state_dir, cvm) / "agent.sock"


def unsupported(plan: Plan) -> list[str]:
    """What this platform cannot run yet, said before anything is made."""
    spec = plan.spec
    problems = []
    if spec.tee != "simulated":
        problems.append(f"tee: the local platform simulates the TEE; got {spec.tee!r}")
    if spec.kms.count == 0 and spec.coordinators.count > 1:
        problems.append("kms: several coordinators share their CA key through a KMS; add one")
    return problems


def launch_files(
    plan: Plan, state_dir: Path, platform_pub: str, rendered: RenderedApps | None = None
) -> dict[Path, tuple[bytes, bool]]:
    """Every file ``up`` writes before starting anything: path -> (bytes, secret). With
    ``rendered``, its apps' CVMs are measured by its bytes and the coordinators admit by its
    policy; the rest (the KMS, sidecar configurations, pins) comes from the plan."""
    spec = plan.spec
    composes = AppComposes(plan)
    policy = admission_policy(plan, platform_pub, rendered, composes=composes)
    files: dict[Path, tuple[bytes, bool]] = {
        state_dir / "cluster-policy.yaml": (_yaml(policy), False),
        state_dir / "kms-policy.yaml": (
            _yaml({"tee": spec.tee, "platform_key": platform_pub}),
            False,
        ),
        state_dir / "kms-pin.yaml": (_yaml(_kms_pin(plan, composes, platform_pub)), False),
    }
    pin = coordinator_attest_policy(plan, platform_pub, composes=composes)
    if spec.gateway is not None:
        files[txt_records_file(state_dir)] = (TXT_RECORDS_HELP, False)
    for cvm in plan.cvms:
        folder = cvm_dir(state_dir, cvm.name)
        files[folder / "app-compose.json"] = (app_compose(composes, cvm, rendered), False)
        if runs_sidecar(spec, cvm.role):
            gateway = None
            if cvm.role == "gateway":
                cert, key = gateway_tls_files(state_dir, cvm.name)
                txt = str(txt_records_file(state_dir))
                gateway = gateway_settings(plan, certificate=str(cert), key=str(key),
                                           txt_records=txt)  # fmt: skip
            config = sidecar_config(plan, cvm, plan.coordinator_urls(), pin, gateway=gateway,
                                    composes=composes)  # fmt: skip
            files[folder / "sidecar.yaml"] = (_yaml(config), True)
    return files


TXT_RECORDS_HELP = b"""\
# TXT records the local gateway routes custom domains by, as DNS would hold them:
#   _dstack-app-address.shop.example: "<app id>:<port>"      (TLS passed through to the app)
#   _dstack-app-address-wildcard.example.org: "<app id>:<port>"
{}
"""


def txt_records_file(state_dir: Path) -> Path:
    return state_dir / "gateway-txt-records.yaml"


def gateway_ca_file(state_dir: Path) -> Path:
    """The local CA of the gateway's certificate: what ``curl --cacert`` trusts."""
    return state_dir / "gateway-ca.pem"


def gateway_tls_files(state_dir: Path, cvm: str) -> tuple[Path, Path]:
    folder = cvm_dir(state_dir, cvm)
    return folder / "tls.pem", folder / "tls.key"


def launch(
    plan: Plan,
    state_dir: Path,
    spec_path: Path,
    teemesh: str,
    seed: bytes,
    *,
    etcd: str = "etcd",
    rendered: Path | None = None,
) -> Launch:
    """Every CVM's processes, in stages; ``teemesh`` is the command that runs the roles, and
    ``seed`` (random per ``up``) gives each CVM an instance id it keeps across restarts, as a
    rebooted CVM does: the coordinator re-admits its peer id only for the same instance.
    ``etcd`` is the etcd binary the coordinators' members run (``store: etcd``); ``rendered``
    the render folder its CVMs run, recorded for ``restart``."""
    spec = plan.spec
    cvms = []
    for cvm in plan.cvms:
        processes = [_agent(plan, state_dir, cvm, teemesh, seed)]
        folder = cvm_dir(state_dir, cvm.name)
        sock = str(agent_socket(state_dir, cvm.name))
        api = None
        if cvm.role == "kms":
            port = spec.kms.port
            argv = (
                teemesh, "kms", "serve", "--listen", f"{cvm.address}:{port}",
                "--state", str(folder / "kms"), "--agent", sock,
                "--policy", str(state_dir / "kms-policy.yaml"),
                "--auth-dev", DEV_GATEWAY_APP_ID, "--name", cvm.address, "--name", cvm.name,
            )  # fmt: skip
            processes.append(
                ProcessSpec(
                    name="kms", argv=argv, stage=STAGE_KMS, ready_tcp=f"{cvm.address}:{port}"
                )
            )
        elif cvm.role == "coordinator":
            port = spec.coordinators.port
            coordinator_argv: tuple[str, ...] = (
                teemesh, "coordinator", "--policy", str(state_dir / "cluster-policy.yaml"),
                "--listen", f"{cvm.address}:{port}", "--state", str(folder / "coordinator"),
                "--agent", sock, "--name", cvm.address, "--name", cvm.name,
            )  # fmt: skip
            if spec.coordinators.store == "etcd":
                processes.append(_etcd_member(plan, state_dir, cvm, teemesh, etcd))
                coordinator_argv += (
                    "--store",
                    "etcd",
                    "--etcd-endpoints",
                    _etcd_clients(plan, cvm),
                )
            processes.append(
                ProcessSpec(
                    name="coordinator",
                    argv=coordinator_argv,
                    stage=STAGE_COORDINATOR,
                    ready_tcp=f"{cvm.address}:{port}",
                )
            )
            if spec.coordinators.dcs is not None:
                api = f"127.0.0.1:{spec.sidecar.api}"
                processes += [_dcs_member(plan, state_dir, cvm, teemesh, etcd),
                              _sidecar(state_dir, cvm, teemesh)]  # fmt: skip
        elif cvm.role == "workload":
            api = f"127.0.0.1:{spec.sidecar.api}"
            processes += _workload(plan, state_dir, cvm, teemesh, spec_path)
        elif cvm.role == "gateway":
            api = f"127.0.0.1:{spec.sidecar.api}"
            processes += _gateway(plan, state_dir, cvm, teemesh)
        cvms.append(
            CvmLaunch(
                name=cvm.name,
                role=cvm.role,
                group=cvm.group,
                address=cvm.address,
                api=api,
                processes=tuple(processes),
            )
        )
    return Launch(
        cluster=plan.cluster,
        spec_path=str(spec_path),
        state_dir=str(state_dir),
        plan=plan.to_json(),
        cvms=tuple(cvms),
        hosts={r.name: r.vip for r in plan.routes},
        instances={r.name: _expected_instances(plan, r) for r in plan.routes},
        public=tuple(_public_urls(plan)),
        rendered=None if rendered is None else str(rendered),
    )


def _expected_instances(plan: Plan, route: PlannedRoute) -> int:
    """How many instances a ready route sees: all of its group; for a role (Patroni's master
    or replica) at least one, as roles move between them; its one peer for a per-replica route."""
    return 1 if route.role or route.peer else len(plan.replicas(route.group))


def _public_urls(plan: Plan) -> list[str]:
    gateway = plan.spec.gateway
    if gateway is None:
        return []
    port = split_host_port(gateway.publish)[1]
    return [f"https://{e['host']}:{port}/" for e in public_endpoints(plan)]


def _agent(plan: Plan, state_dir: Path, cvm: Cvm, teemesh: str, seed: bytes) -> ProcessSpec:
    folder = cvm_dir(state_dir, cvm.name)
    sock = str(agent_socket(state_dir, cvm.name))
    argv = [
        teemesh, "agent", "--socket", sock, "--state", str(folder / "agent"),
        "--platform-key", str(state_dir / "platform.key"),
        "--app-compose", str(folder / "app-compose.json"),
        "--os-image", plan.spec.os_image_name or "",
        "--instance-id", hashlib.sha256(seed + cvm.name.encode()).hexdigest()[:40],
    ]  # fmt: skip
    if cvm.role != "kms" and plan.kms_urls():
        for url in plan.kms_urls():
            argv += ["--kms-url", url]
        argv += ["--kms-policy", str(state_dir / "kms-pin.yaml")]
    stage = STAGE_KMS_AGENT if cvm.role == "kms" else STAGE_AGENT
    return ProcessSpec(name="agent", argv=tuple(argv), stage=stage, ready_socket=sock)


def _etcd_member(plan: Plan, state_dir: Path, cvm: Cvm, teemesh: str, etcd: str) -> ProcessSpec:
    """One member of the coordinators' etcd cluster, in ``cvm``: every coordinator CVM holds
    one, so the catalog survives any minority of coordinator CVMs.

    Its peers and its clients (the coordinators) must present a certificate from the catalog's
    store CA, which only the coordinator app derives; the host sees its health, and nothing else,
    on the plain metrics port."""
    client = f"https://{cvm.address}:{ETCD_CLIENT_PORT}"
    metrics = f"http://{cvm.address}:{ETCD_METRICS_PORT}"
    return _etcd(plan, state_dir, cvm, teemesh, etcd, store="etcd", client=client,
                 peer_port=ETCD_PEER_PORT, metrics=metrics)  # fmt: skip


def _dcs_member(plan: Plan, state_dir: Path, cvm: Cvm, teemesh: str, etcd: str) -> ProcessSpec:
    """One member of the workloads' DCS, in ``cvm``: its clients only on loopback, where the
    CVM's sidecar serves them to the DCS route's callers (and shows its health: the host cannot
    reach it to tell when it is ready); its peers on the bridge, under the DCS's store CA."""
    assert plan.spec.coordinators.dcs is not None
    client = f"http://127.0.0.1:{plan.spec.coordinators.dcs.port}"
    return _etcd(plan, state_dir, cvm, teemesh, etcd, store="dcs", client=client,
                 peer_port=DCS_PEER_PORT)  # fmt: skip


def _etcd(
    plan: Plan,
    state_dir: Path,
    cvm: Cvm,
    teemesh: str,
    etcd: str,
    *,
    store: Literal["etcd", "dcs"],
    client: str,
    peer_port: int,
    metrics: str | None = None,
) -> ProcessSpec:
    """A member of the coordinators' store ``store`` (also its data folder), which spans the
    coordinator CVMs; ``teemesh store-member`` gives it its TLS identity, then runs etcd."""
    members = [c for c in plan.cvms if c.role == "coordinator"]
    peers = ",".join(f"{c.name}=https://{c.address}:{peer_port}" for c in members)
    folder = cvm_dir(state_dir, cvm.name)
    argv = store_member_argv(
        plan.cluster, store, member=cvm.name, address=cvm.address,
        tls_dir=str(folder / f"{store}-tls"), agent=str(agent_socket(state_dir, cvm.name)),
        data_dir=str(folder / store), client=client, peer_port=peer_port,
        initial_cluster=peers, metrics=metrics, etcd=etcd,
    )  # fmt: skip
    ready = f"{metrics}/health" if metrics else None
    return ProcessSpec(name=store, argv=(teemesh, *argv), stage=STAGE_STORE, ready_http=ready)


def _etcd_clients(plan: Plan, cvm: Cvm) -> str:
    """The etcd client URLs a coordinator uses: its own CVM's member first."""
    members = sorted(
        (c for c in plan.cvms if c.role == "coordinator"), key=lambda c: c.name != cvm.name
    )
    return ",".join(f"https://{c.address}:{ETCD_CLIENT_PORT}" for c in members)


def _sidecar(state_dir: Path, cvm: Cvm, teemesh: str) -> ProcessSpec:
    folder = cvm_dir(state_dir, cvm.name)
    argv = (
        teemesh, "sidecar", "run", "--config", str(folder / "sidecar.yaml"),
        "--agent", str(agent_socket(state_dir, cvm.name)), "--state", str(folder / "sidecar"),
        "--hosts-file", str(folder / "sidecar" / "hosts"),
    )  # fmt: skip
    return ProcessSpec(name="sidecar", argv=argv, stage=STAGE_WORKLOAD)


def _gateway(plan: Plan, state_dir: Path, cvm: Cvm, teemesh: str) -> list[ProcessSpec]:
    """The gateway CVM: a sidecar with the public listener, published on the host."""
    assert plan.spec.gateway is not None
    publish = plan.spec.gateway.publish
    python = str(Path(teemesh).parent / "python")
    forward = (python, "-m", "teemesh.net.forward", publish,
               f"{cvm.address}:{plan.spec.gateway.port}")  # fmt: skip
    return [
        _sidecar(state_dir, cvm, teemesh),
        ProcessSpec(
            name="publish",
            argv=forward,
            stage=STAGE_WORKLOAD,
            ready_tcp=publish,
            host_network=True,
        ),
    ]


def _workload(
    plan: Plan, state_dir: Path, cvm: Cvm, teemesh: str, spec_path: Path
) -> list[ProcessSpec]:
    sock = str(agent_socket(state_dir, cvm.name))
    bin_dir = str(Path(teemesh).parent)
    env = command_env(plan, cvm) | {
        "DSTACK_SIMULATOR_ENDPOINT": sock,
        "TEEMESH_DATA_DIR": str(cvm_dir(state_dir, cvm.name) / "data"),
        "PATH": f"{bin_dir}:{SYSTEM_PATH}",  # `python` is the one teemesh runs on
    }
    processes = [_sidecar(state_dir, cvm, teemesh)]
    argv = plan.spec.workload_groups[cvm.group].argv()
    if argv:  # a group may have only a compose file, for dstack: nothing to run here
        processes.append(
            ProcessSpec(
                name="app",
                argv=tuple(argv),
                env=env,
                cwd=str(spec_path.parent),
                stage=STAGE_WORKLOAD,
            )
        )
    return processes


def _kms_pin(plan: Plan, composes: AppComposes, platform_pub: str) -> dict[str, Any]:
    """Which KMS an agent takes its app keys from: this cluster's, by its compose hash."""
    kms = compose_hash(composes.system("kms")).hex()
    return {
        "tee": plan.spec.tee,
        "platform_key": platform_pub,
        "compose_hashes": [kms],
        "os_images": os_image_hashes(plan.spec),
    }


def _yaml(doc: dict[str, Any]) -> bytes:
    return yaml.safe_dump(doc, sort_keys=False).encode()


# -- readiness: from each sidecar's /v1/status -------------------------------------------------


def not_ready(launch: Launch, cvm: str, status: dict[str, Any] | None, error: str) -> str | None:
    """Why a workload CVM is not ready yet (admitted, backends passing, every route seeing all
    its instances), or None when it is. ``status`` None: the API did not answer (``error``)."""
    if status is None:
        return f"its sidecar API does not answer ({error})"
    admission = status.get("admission") or {}
    state = admission.get("state")
    if state not in ("admitted", "renewing"):
        why = admission.get("last_error") or "no error yet"
        return f"not admitted: {state} ({why})"
    for backend in status.get("backends") or ():
        if backend.get("health") != "passing" or not backend.get("registered"):
            return (
                f"backend {backend.get('name')} is {backend.get('health')}"
                f"{'' if backend.get('registered') else ', not registered yet'}"
            )
    for route in status.get("routes") or ():
        want = launch.instances.get(route.get("name", ""), 0)
        got = len(route.get("instances") or ())
        if got < want:
            return f"route {route.get('name')} sees {got} of {want} instances"
    return None
