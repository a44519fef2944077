"""The local platform: a whole cluster on this machine, one network namespace per CVM.

``up`` checks the spec and the privileges before it makes anything, then makes the network,
writes every file (platform key, policies, app-compose, sidecar configurations) and starts the
processes of :func:`teemesh.platform.local_plan.launch` stage by stage; a failure on the way
tears down everything made. The launch is recorded in the state dir, so every other command
works from the state dir alone. Readiness comes from each sidecar's local API, which listens on
its CVM's loopback only: it is read from a thread that has joined that CVM's network namespace.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from teemesh.attest.simulated import PlatformKey
from teemesh.checks import split_host_port
from teemesh.config import ConfigError, parse_model
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.errors import InputError, InternalError, MeshError
from teemesh.fsutil import write_private
from teemesh.identity.certs import local_web_pki
from teemesh.platform import netns, vmm
from teemesh.platform.local_plan import (
    LAUNCH_FILE,
    CvmLaunch,
    Launch,
    ProcessSpec,
    RenderedApps,
    admission_policy,
    agent_socket,
    app_of,
    cvm_dir,
    gateway_ca_file,
    gateway_tls_files,
    launch,
    launch_files,
    not_ready,
    rendered_drift,
    unsupported,
)
from teemesh.spec import Plan, load_spec, plan_cluster
from teemesh.spec.deploy import POLICY_FILE

START_TIMEOUT = 30.0
"""How long one stage's processes get to show they are ready."""
READY_TIMEOUT = 60.0
POLL = 0.1
CLONE_NEWNET = 0x40000000

Progress = Callable[[str], None]


class NotReady(MeshError):
    """The cluster is up but some CVMs are not ready; ``reasons``: CVM -> why."""

    def __init__(self, reasons: dict[str, str], timeout: float) -> None:
        self.reasons = reasons
        lines = "\n".join(f"  - {cvm}: {why}" for cvm, why in reasons.items())
        super().__init__(f"not ready after {timeout:.0f} s:\n{lines}")


def default_state_dir(spec_path: Path) -> Path:
    """``.teemesh/<cluster>``; the spec's cluster name, read without the plan-time checks."""
    import yaml  # noqa: PLC0415

    try:
        doc = yaml.safe_load(spec_path.read_text())
    except (OSError, yaml.YAMLError):
        doc = None
    name = doc.get("cluster") if isinstance(doc, dict) else None
    return Path(".teemesh") / (name if isinstance(name, str) and name else "cluster")


def teemesh_command() -> str:
    """The ``teemesh`` script of this installation (beside this Python), for every role."""
    exe = Path(sys.executable).parent / "teemesh"
    found = str(exe) if exe.exists() else shutil.which("teemesh")
    if found is None:
        raise InternalError("the teemesh command is not installed next to this Python")
    return str(Path(found).absolute())


def etcd_command() -> str:
    found = shutil.which("etcd")
    if found is None:
        raise InputError(
            "coordinators.store etcd and coordinators.dcs run etcd members in the coordinator "
            "CVMs, and etcd is not installed: apt-get install etcd-server",
            field="coordinators",
        )
    return found


# -- up -------------------------------------------------------------------------------------


def up(
    spec_path: Path,
    state_dir: Path,
    *,
    progress: Progress,
    timeout: float = READY_TIMEOUT,
    keep_on_failure: bool = False,
    rendered: Path | None = None,
    warn: Progress | None = None,
) -> Launch:
    """Bring the cluster up and wait until it is ready (:class:`NotReady` leaves it up).

    ``rendered``: a ``teemesh render`` folder whose app-compose bytes and policy the CVMs run
    (see :func:`read_rendered`); ``warn`` hears of each app whose bytes the spec no longer
    renders."""
    netns.check_privileges()
    shown_spec, shown_rendered = spec_path, rendered
    spec_path = spec_path.absolute()
    state_dir = state_dir.absolute()
    plan = plan_cluster(load_spec(spec_path))
    problems = unsupported(plan)
    if problems:
        raise ConfigError(str(spec_path), problems)
    if (state_dir / netns.STATE_FILE).exists():
        raise InputError(
            f"{state_dir} already holds a cluster: `teemesh down --state {state_dir}` first",
            field="state",
        )
    platform = PlatformKey.generate()
    pub = platform.public_pem()
    apps = None
    if rendered is not None:
        rendered = rendered.absolute()
        apps = read_rendered(rendered, plan, pub.decode())
        for app in rendered_drift(plan, apps):
            (warn or progress)(
                f"{app}: {shown_rendered}/{app}/app-compose.json differs from what "
                f"{shown_spec} renders; its CVMs are measured with {shown_rendered}'s bytes"
            )
    _fresh_state_dir(state_dir)
    coordinators = plan.spec.coordinators
    etcd = etcd_command() if coordinators.store == "etcd" or coordinators.dcs else "etcd"
    record = launch(
        plan, state_dir, spec_path, teemesh_command(), secrets.token_bytes(16), etcd=etcd,
        rendered=rendered,
    )  # fmt: skip
    prefix = ipaddress.IPv4Network(plan.spec.network).prefixlen
    netns.create(
        state_dir,
        plan.cluster,
        f"{plan.bridge}/{prefix}",
        {c.name: f"{c.address}/{prefix}" for c in plan.cvms},
    )
    progress(f"network: bridge and {len(plan.cvms)} CVMs")
    try:
        write_private(state_dir / "platform.key", platform.private_pem())
        (state_dir / "platform.pub").write_bytes(pub)
        _gateway_certificate(plan, state_dir)
        for path, (data, secret) in launch_files(plan, state_dir, pub.decode(), apps).items():
            netns.private_dir(path.parent)
            if secret:
                write_private(path, data)
            else:
                path.write_bytes(data)
        write_private(state_dir / LAUNCH_FILE, record.model_dump_json(indent=1).encode())
        for cvm in record.cvms:
            netns.set_hosts(state_dir, cvm.name, record.hosts)
        stages = sorted({p.stage for c in record.cvms for p in c.processes})
        for stage in stages:
            started = [(c, p) for c in record.cvms for p in c.processes if p.stage == stage]
            _start(state_dir, started)
            progress(_stage_line(started))
    except BaseException:  # Ctrl-C too: never leave half a cluster
        if not keep_on_failure:
            down(state_dir)
        raise
    wait_ready(record, timeout=timeout, progress=progress)
    return record


def read_rendered(folder: Path, plan: Plan, platform_pub: str) -> RenderedApps:
    """What ``teemesh render`` wrote into ``folder`` for ``plan``'s cluster: each app's
    app-compose.json bytes as they are (apps without a folder there run the spec's), and its
    cluster-policy.json, checked as the coordinators will load it with ``platform_pub`` set, so
    a bad one stops ``up`` before anything starts."""
    if not folder.is_dir():
        raise InputError("no such folder (write it with `teemesh render SPEC --out DIR`)",
                         field=str(folder))  # fmt: skip
    composes = {}
    for app in dict.fromkeys(a for c in plan.cvms if (a := app_of(c.role, c.group))):
        data = _rendered_compose(folder, app)
        if data is not None:
            composes[app] = data
    policy = _rendered_policy(folder / POLICY_FILE, plan, platform_pub)
    return RenderedApps(str(folder), composes, policy)


def _rendered_compose(folder: Path, app: str) -> bytes | None:
    """``<folder>/<app>/app-compose.json``'s bytes; None when the app has no folder there."""
    if not (folder / app).is_dir():
        return None
    path = folder / app / "app-compose.json"
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read it: {exc.strerror or exc}", field=str(path)) from exc


def _rendered_policy(path: Path, plan: Plan, platform_pub: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(str(path), ["missing: `teemesh render` writes it"]) from None
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read it: {exc.strerror or exc}"]) from exc
    except ValueError as exc:  # not UTF-8 or not JSON
        raise ConfigError(str(path), [f"not JSON: {exc}"]) from exc
    if not isinstance(doc, dict):
        raise ConfigError(str(path), ["(top level): expected the cluster policy object"])
    if doc.get("cluster") != plan.cluster:
        raise ConfigError(str(path), [f"cluster: {doc.get('cluster')!r}, but the spec is cluster "
                                      f"{plan.cluster!r}: render this spec into it"])  # fmt: skip
    parse_model(ClusterPolicy, admission_policy(plan, platform_pub, RenderedApps("", {}, doc)),
                source=str(path))  # fmt: skip
    return doc


def _gateway_certificate(plan: Plan, state_dir: Path) -> None:
    """A local CA and the wildcard certificate it signs for the gateway's base domain."""
    if plan.spec.gateway is None:
        return
    base = plan.spec.gateway.base_domain
    ca, (cert, key) = local_web_pki([f"*.{base}", base])
    gateway_ca_file(state_dir).write_text(ca)
    for cvm in plan.of_role("gateway"):
        cert_file, key_file = gateway_tls_files(state_dir, cvm.name)
        netns.private_dir(cert_file.parent)
        cert_file.write_text(cert)
        write_private(key_file, key.encode())


def _stage_line(started: list[tuple[CvmLaunch, ProcessSpec]]) -> str:
    names = sorted({p.name for _, p in started})
    return f"started {', '.join(names)} in {len({c.name for c, _ in started})} CVM(s)"


def _fresh_state_dir(state_dir: Path) -> None:
    """A new cluster starts from nothing: no coordinator store or logs of an earlier run."""
    netns.private_dir(state_dir)
    for name in ("cvms", "logs"):
        shutil.rmtree(state_dir / name, ignore_errors=True)
    (state_dir / LAUNCH_FILE).unlink(missing_ok=True)


def _start(state_dir: Path, started: Iterable[tuple[CvmLaunch, ProcessSpec]]) -> None:
    """Spawn each process, then wait until every one of them is ready (or has died)."""
    waiting = []
    for cvm, process in started:
        spawn(state_dir, cvm, process)
        waiting.append((cvm, process))
    deadline = time.monotonic() + START_TIMEOUT
    while waiting:
        for cvm, process in list(waiting):
            if _is_ready(process):
                waiting.remove((cvm, process))
            elif not vmm.is_alive(state_dir, cvm.name, process.name):
                log = _tail(state_dir, cvm.name, process.name)
                raise InternalError(f"{process.name} of {cvm.name} exited at start: {log}")
        if waiting and time.monotonic() > deadline:
            cvm, process = waiting[0]
            raise InternalError(
                f"{process.name} of {cvm.name} not ready after {START_TIMEOUT:.0f} s: "
                f"{_tail(state_dir, cvm.name, process.name)}"
            )
        if waiting:
            time.sleep(POLL)


def spawn(state_dir: Path, cvm: CvmLaunch, process: ProcessSpec) -> None:
    if process.ready_socket:
        Path(process.ready_socket).unlink(missing_ok=True)  # a killed agent leaves its socket
    if process.name == "agent":  # a reboot: a fresh runtime-event log
        shutil.rmtree(agent_socket(state_dir, cvm.name).parent / "agent", ignore_errors=True)
    cwd = Path(process.cwd) if process.cwd else None
    vmm.spawn(state_dir, cvm.name, process.name, process.argv, env=process.env, cwd=cwd,
              host_network=process.host_network)  # fmt: skip


def _is_ready(process: ProcessSpec) -> bool:
    if process.ready_socket:
        return Path(process.ready_socket).exists()
    if process.ready_http:
        url = urllib.parse.urlsplit(process.ready_http)
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=1)
        try:
            conn.request("GET", url.path or "/")
            return bool(conn.getresponse().status == 200)
        except (OSError, ValueError, http.client.HTTPException):
            return False
        finally:
            conn.close()
    if process.ready_tcp:
        try:
            with socket.create_connection(split_host_port(process.ready_tcp), timeout=0.5):
                return True
        except OSError:
            return False
    return True


def _tail(state_dir: Path, cvm: str, name: str, lines: int = 5) -> str:
    try:
        text = (state_dir / "logs" / cvm / f"{name}.log").read_text(errors="replace")
    except OSError:
        return "no log"
    return " | ".join(text.strip().splitlines()[-lines:]) or "empty log"


# -- readiness --------------------------------------------------------------------------------


def sidecar_statuses(record: Launch) -> dict[str, tuple[dict[str, Any] | None, str]]:
    """Every workload CVM's sidecar ``/v1/status`` (or None and why), read in parallel."""
    cvms = [c for c in record.cvms if c.api]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(cvms))) as pool:
        futures = {c.name: pool.submit(_status_in_cvm, record, c) for c in cvms}
        return {name: future.result() for name, future in futures.items()}


def _status_in_cvm(record: Launch, cvm: CvmLaunch) -> tuple[dict[str, Any] | None, str]:
    """GET /v1/status from a fresh thread that joins the CVM's network namespace first: the
    namespace is per thread, and this thread ends with the call."""
    result: list[tuple[dict[str, Any] | None, str]] = []
    assert cvm.api is not None
    namespace = netns.netns_name(record.cluster, cvm.name)
    thread = threading.Thread(target=lambda: result.append(_get_status(namespace, cvm.api or "")))
    thread.start()
    thread.join()
    return result[0] if result else (None, "the status thread failed")


def _get_status(namespace: str, api: str) -> tuple[dict[str, Any] | None, str]:
    try:
        _join_netns(namespace)
        conn = http.client.HTTPConnection(*split_host_port(api), timeout=2)
        try:
            conn.request("GET", "/v1/status")
            reply = conn.getresponse()
            body = reply.read()
        finally:
            conn.close()
        doc = json.loads(body)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return None, str(exc) or type(exc).__name__
    return (doc, "") if isinstance(doc, dict) else (None, "not a JSON object")


def _join_netns(namespace: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {namespace}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def readiness(record: Launch) -> dict[str, str]:
    """CVM -> why it is not ready, for every workload CVM that is not."""
    reasons = {}
    for name, (status, error) in sidecar_statuses(record).items():
        why = not_ready(record, name, status, error)
        if why is not None:
            reasons[name] = why
    return reasons


def wait_ready(record: Launch, *, timeout: float, progress: Progress) -> None:
    total = sum(1 for c in record.cvms if c.api)
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        reasons = readiness(record)
        if len(reasons) != last:
            last = len(reasons)
            progress(f"ready: {total - last} of {total} workload CVMs")
        if not reasons:
            return
        if time.monotonic() > deadline:
            raise NotReady(reasons, timeout)
        time.sleep(0.25)


# -- the other commands ---------------------------------------------------------------------


def load_launch(state_dir: Path) -> Launch:
    path = state_dir / LAUNCH_FILE
    try:
        return Launch.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise InputError(
            f"no cluster recorded in {state_dir}: start one with `teemesh up SPEC`", field="state"
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable launch record: {exc}", field=str(path)) from exc


def restart(state_dir: Path, cvm: str) -> None:
    """Kill every process of ``cvm``, then start them again as ``up`` did, stage by stage."""
    record = load_launch(state_dir)
    target = record.cvm(cvm)
    app = app_of(target.role, target.group)
    data = None
    if record.rendered is not None and app is not None:  # its bytes as the folder holds them now
        data = _rendered_compose(Path(record.rendered), app)
    vmm.kill(state_dir, cvm)
    if data is not None:
        (cvm_dir(state_dir, cvm) / "app-compose.json").write_bytes(data)
    for process in sorted(target.processes, key=lambda p: p.stage):
        _start(state_dir, [(target, process)])


def down(state_dir: Path) -> bool:
    """Remove everything ``up`` made; False when there was nothing left (safe to repeat)."""
    done = vmm.teardown(state_dir)
    (state_dir / LAUNCH_FILE).unlink(missing_ok=True)
    return done


def process_states(state_dir: Path, cvm: str) -> dict[str, str]:
    """Each recorded process of ``cvm``: running, paused or dead."""
    state = netns.require_state(state_dir)
    out = {}
    for record in state.processes:
        if record.cvm != cvm:
            continue
        handle = vmm.Handle(record.pid, record.start_time)
        stat = vmm.read_stat(record.pid)
        if not vmm.alive(handle) or stat is None:
            out[record.name] = "dead"
        else:
            out[record.name] = "paused" if stat.state in "tT" else "running"
    return out


def status(state_dir: Path) -> dict[str, Any]:
    """The cluster as it is now: each CVM's processes, admission, routes and backends."""
    record = load_launch(state_dir)
    state = netns.require_state(state_dir)
    statuses = sidecar_statuses(record)
    cvms = []
    for cvm in record.cvms:
        doc: dict[str, Any] = {
            "name": cvm.name,
            "role": cvm.role,
            "group": cvm.group,
            "address": cvm.address,
            "processes": process_states(state_dir, cvm.name),
        }
        if cvm.name in statuses:
            sidecar, error = statuses[cvm.name]
            doc["sidecar"] = sidecar
            doc["sidecar_error"] = error or None
            doc["ready"] = not_ready(record, cvm.name, sidecar, error) is None
        cvms.append(doc)
    return {
        "cluster": record.cluster,
        "spec": record.spec_path,
        "state": str(state_dir),
        "public": list(record.public),
        "gateway_ca": str(gateway_ca_file(state_dir)) if record.public else None,
        "partitions": [list(p) for p in state.partitions],
        "cvms": cvms,
    }


def log_files(state_dir: Path, cvm: str, process: str | None) -> list[Path]:
    record = load_launch(state_dir)
    target = record.cvm(cvm)
    names = [p.name for p in target.processes]
    if process is not None and process not in names:
        raise InputError(f"{cvm} runs no {process!r}; it runs {', '.join(names)}", field="process")
    chosen = [process] if process else names
    return [state_dir / "logs" / cvm / f"{name}.log" for name in chosen]


def exec_argv(state_dir: Path, cvm: str, argv: list[str]) -> list[str]:
    """The command line running ``argv`` inside ``cvm`` (its /etc/hosts: route names resolve)."""
    load_launch(state_dir).cvm(cvm)
    return netns.exec_command(netns.require_state(state_dir), cvm, argv)
