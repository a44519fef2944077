"""The local platform's CVMs: one network namespace each, bridged, with faults on demand.

A cluster gets a Linux bridge ``tmb-<hash>`` holding an address for the host, and each CVM a
namespace ``tm-<cluster>-<cvm>`` joined to the bridge by a veth pair (host end ``tmv-<hash>``,
CVM end ``eth0``), its address, and ``lo`` up: route VIPs anywhere in 127.0.0.0/8 are then
local to that CVM alone. Each CVM's ``/etc/hosts`` is ``/etc/netns/<namespace>/hosts``:
``ip netns exec``, which starts every process here, bind-mounts the files of that folder over
``/etc`` in a private mount namespace.

Everything is written to ``network.json`` in the cluster's state dir *before* it is made, so
:func:`teemesh.platform.vmm.teardown` removes it after any crash, and finds nothing to do the
second time. Names, checks and plans are pure; every ``ip`` call goes through one runner
(:func:`run_ip`, or a stand-in passed by tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from teemesh.errors import InputError, InternalError, MeshError, Refused
from teemesh.fsutil import write_private

STATE_FILE = "network.json"
LOCK_FILE = "network.lock"
ETC_NETNS = Path("/etc/netns")
IFNAMSIZ = 15
"""Longest interface name Linux accepts (IFNAMSIZ less the terminating NUL)."""
IP_TIMEOUT = 30.0
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}

Runner = Callable[[Sequence[str]], str]
"""Runs ``ip ARGS`` and returns its stdout, or raises :class:`CommandFailed`."""


class CommandFailed(InternalError):
    """An ``ip`` command failed; ``command`` and ``stderr`` say which and why."""

    def __init__(self, command: Sequence[str], stderr: str) -> None:
        self.command = tuple(command)
        self.stderr = stderr
        super().__init__(f"`{' '.join(self.command)}` failed: {stderr or 'no message'}")


class Cvm(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    netns: str
    veth: str
    address: str
    """With its prefix length, as on ``eth0``: ``10.77.0.11/24``."""
    etc_dir: str

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


class Process(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    cvm: str
    name: str
    pid: int
    start_time: int
    log: str


class NetworkState(BaseModel):
    """What a cluster's network is made of; ``ready`` is False while creation is under way."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: Literal[1] = 1
    cluster: str
    bridge: str
    host_address: str
    cvms: tuple[Cvm, ...]
    processes: tuple[Process, ...] = ()
    partitions: tuple[tuple[str, str], ...] = ()
    ready: bool = False

    def cvm(self, name: str) -> Cvm:
        for cvm in self.cvms:
            if cvm.name == name:
                return cvm
        known = ", ".join(c.name for c in self.cvms)
        raise InputError(
            f"cluster {self.cluster} has no CVM {name!r} (it has {known})", field="cvm"
        )

    def process(self, cvm: str, name: str) -> Process | None:
        return next((p for p in self.processes if (p.cvm, p.name) == (cvm, name)), None)

    def without_processes(self, cvm: str, name: str | None = None) -> NetworkState:
        kept = tuple(p for p in self.processes if p.cvm != cvm or name not in (None, p.name))
        return self.model_copy(update={"processes": kept})


@dataclass(frozen=True)
class Present:
    """What exists on the machine now, as far as a plan needs to know."""

    namespaces: frozenset[str] = frozenset()
    links: frozenset[str] = frozenset()
    etc_dirs: frozenset[str] = frozenset()
    routes: tuple[ipaddress.IPv4Network, ...] = ()


@dataclass(frozen=True)
class TeardownPlan:
    commands: tuple[tuple[str, ...], ...]
    remove_dirs: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.commands or self.remove_dirs)


# -- pure: names, checks, plans -------------------------------------------------------------


def bridge_name(cluster: str) -> str:
    return "tmb-" + _digest("bridge", cluster)[: IFNAMSIZ - 4]


def veth_name(cluster: str, cvm: str) -> str:
    """The host end's name: hashed, since ``cluster`` and ``cvm`` can be 63 characters each."""
    return "tmv-" + _digest("veth", cluster, cvm)[: IFNAMSIZ - 4]


def netns_name(cluster: str, cvm: str) -> str:
    return f"tm-{cluster}-{cvm}"


def plan_network(cluster: str, host_address: str, cvms: Mapping[str, str]) -> NetworkState:
    """Check every name and address and derive every interface name; all problems at once."""
    problems: list[str] = []
    if not _NAME.fullmatch(cluster):
        problems.append(f"cluster: {cluster!r} is not a name ({_NAME_RULE})")
    host = _interface("host_address", host_address, problems)
    if not cvms:
        problems.append("cvms: a cluster needs at least one CVM")
    taken = {host.ip: "the host"} if host else {}
    for name, address in cvms.items():
        if not _NAME.fullmatch(name):
            problems.append(f"cvms.{name}: not a name ({_NAME_RULE})")
        cvm = _interface(f"cvms.{name}", address, problems)
        if cvm is None or host is None:
            continue
        if cvm.network != host.network:
            problems.append(f"cvms.{name}: {address} is not in the host's network {host.network}")
        elif cvm.ip in taken:
            problems.append(f"cvms.{name}: {cvm.ip} is already used by {taken[cvm.ip]}")
        taken[cvm.ip] = name
    if problems:
        raise InputError("; ".join(problems))
    return NetworkState(
        cluster=cluster,
        bridge=bridge_name(cluster),
        host_address=host_address,
        cvms=tuple(
            Cvm(
                name=name,
                netns=netns_name(cluster, name),
                veth=veth_name(cluster, name),
                address=address,
                etc_dir=str(ETC_NETNS / netns_name(cluster, name)),
            )
            for name, address in cvms.items()
        ),
    )


_NAME_RULE = "lowercase letters, digits and inner dashes, at most 63"


def _interface(field: str, text: str, problems: list[str]) -> ipaddress.IPv4Interface | None:
    try:
        interface = ipaddress.IPv4Interface(text)
    except ValueError:
        problems.append(f"{field}: {text!r} is not an IPv4 address with a prefix (10.77.0.11/24)")
        return None
    network = interface.network
    if network.prefixlen > 30 or interface.ip in (
        network.network_address,
        network.broadcast_address,
    ):
        problems.append(f"{field}: {text} is not a host address of a network of 2 hosts or more")
        return None
    return interface


def find_conflicts(state: NetworkState, present: Present) -> list[str]:
    """What already on the machine would clash with this network (other clusters, leftovers)."""
    hint = "another cluster uses it, or a crashed run left it: tear that down first"
    names = [state.bridge] + [c.veth for c in state.cvms]
    problems = [f"interface {n} already exists ({hint})" for n in names if n in present.links]
    problems += [
        f"network namespace {c.netns} already exists ({hint})"
        for c in state.cvms
        if c.netns in present.namespaces
    ]
    network = ipaddress.IPv4Interface(state.host_address).network
    problems += [
        f"the host already routes {route}, which overlaps {network}: choose another network"
        for route in present.routes
        if route.prefixlen > 0 and route.overlaps(network)
    ]
    return problems


def bridge_commands(state: NetworkState) -> list[tuple[str, ...]]:
    br = state.bridge
    return [
        ("link", "add", br, "type", "bridge"),
        ("addr", "add", state.host_address, "dev", br),
        ("link", "set", br, "up"),
    ]


def cvm_commands(state: NetworkState, cvm: Cvm) -> list[tuple[str, ...]]:
    """The namespace, a veth whose CVM end is born inside it as ``eth0``, the address, ``lo``.

    ``eth0`` gets no IPv6 link-local address: the mesh speaks IPv4, and a partition made of
    IPv4 routes must not leave an IPv6 path open.
    """
    ns = cvm.netns
    return [
        ("netns", "add", ns),
        ("link", "add", cvm.veth, "type", "veth", "peer", "name", "eth0", "netns", ns),
        ("link", "set", cvm.veth, "master", state.bridge, "up"),
        ("-n", ns, "link", "set", "eth0", "addrgenmode", "none"),
        ("-n", ns, "addr", "add", cvm.address, "dev", "eth0"),
        ("-n", ns, "link", "set", "eth0", "up"),
        ("-n", ns, "link", "set", "lo", "up"),
    ]


def partition_commands(state: NetworkState, a: str, b: str, *, heal: bool) -> list[tuple[str, ...]]:
    """An ``unreachable`` route to the other's address in each of the two CVMs (or its removal).

    A route needs no netfilter (not installed here) and touches that pair only; connecting
    fails at once with EHOSTUNREACH instead of hanging, and open connections stall as in a
    real partition. The host and the other CVMs still reach both.
    """
    first, second = state.cvm(a), state.cvm(b)
    verb = "del" if heal else "replace"
    return [
        ("-n", src.netns, "route", verb, "unreachable", f"{dst.ip}/32")
        for src, dst in ((first, second), (second, first))
    ]


def pair(a: str, b: str) -> tuple[str, str]:
    if a == b:
        raise InputError(f"cannot partition {a} from itself", field="cvm")
    first, second = sorted((a, b))
    return first, second


def hosts_text(state: NetworkState, cvm: str, extra: Mapping[str, str] | None = None) -> str:
    """A CVM's /etc/hosts: localhost, every CVM of the cluster by name, then ``extra``
    (name -> address, e.g. route names to their VIPs)."""
    own = state.cvm(cvm)
    lines = [
        f"# /etc/hosts of CVM {cvm} in teemesh cluster {state.cluster}",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{own.ip}\t{own.name}",
    ]
    lines += [f"{c.ip}\t{c.name}" for c in state.cvms if c.name != cvm]
    for name, address in (extra or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
            raise InputError(f"{name!r} is not a host name", field="hosts")
        try:
            lines.append(f"{ipaddress.ip_address(address)}\t{name}")
        except ValueError:
            raise InputError(f"{address!r} is not an IP address", field=f"hosts.{name}") from None
    return "\n".join(lines) + "\n"


def plan_teardown(state: NetworkState, present: Present) -> TeardownPlan:
    """Removal of what ``state`` records and still exists. Host veths go first (taking their
    CVM ends along at once; a namespace is freed later, by the kernel), then namespaces, the
    bridge, and the /etc/netns folders."""
    commands = [("link", "del", c.veth) for c in state.cvms if c.veth in present.links]
    commands += [("netns", "del", c.netns) for c in state.cvms if c.netns in present.namespaces]
    if state.bridge in present.links:
        commands.append(("link", "del", state.bridge))
    return TeardownPlan(
        commands=tuple(commands),
        remove_dirs=tuple(c.etc_dir for c in state.cvms if c.etc_dir in present.etc_dirs),
    )


def missing_capabilities(proc_status: str) -> list[str]:
    """The capabilities this platform needs that ``/proc/self/status``'s CapEff lacks."""
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", proc_status, re.MULTILINE)
    effective = int(match.group(1), 16) if match else 0
    return [name for name, bit in _CAPABILITIES.items() if not effective >> bit & 1]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# -- the edge: ip and files ----------------------------------------------------------------


def run_ip(args: Sequence[str]) -> str:
    """Run ``ip ARGS``; any failure names the command and what ``ip`` said."""
    try:
        result = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise CommandFailed(["ip", *args], "ip is missing: install iproute2") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandFailed(["ip", *args], str(exc)) from exc
    if result.returncode != 0:
        raise CommandFailed(["ip", *args], result.stderr.strip())
    return result.stdout


def check_privileges() -> None:
    """Refuse, before anything is made, when namespaces, links and mounts are not allowed."""
    missing = missing_capabilities(Path("/proc/self/status").read_text())
    if missing:
        raise Refused(
            "the local platform creates network namespaces, a bridge and mounts, which needs "
            f"CAP_NET_ADMIN and CAP_SYS_ADMIN; this process lacks {' and '.join(missing)}: "
            "run it as root (for example with sudo)"
        )


def create(
    state_dir: Path,
    cluster: str,
    host_address: str,
    cvms: Mapping[str, str],
    *,
    run: Runner = run_ip,
) -> NetworkState:
    """Make the bridge and every CVM (``cvms``: name -> address with prefix), all or nothing:
    on any failure what was made is removed again before the error is raised."""
    check_privileges()
    state = plan_network(cluster, host_address, cvms)
    with locked(state_dir):
        old = load_state(state_dir)
        if old is not None:
            raise InputError(
                f"{state_dir} already holds cluster {old.cluster}: tear it down first",
                field="state_dir",
            )
        conflicts = find_conflicts(state, inventory(state, run))
        if conflicts:
            raise InputError("; ".join(conflicts), field="network")
        # First: whatever happens next, the teardown knows what to look for.
        save_state(state_dir, state)
        try:
            for args in bridge_commands(state):
                run(args)
            for cvm in state.cvms:
                _write_hosts(cvm, hosts_text(state, cvm.name))
                for args in cvm_commands(state, cvm):
                    run(args)
            state = state.model_copy(update={"ready": True})
            save_state(state_dir, state)
        except BaseException as exc:  # Ctrl-C too: never leave half a cluster
            _rollback(state_dir, state, run, exc)
            raise
    return state


def _rollback(state_dir: Path, state: NetworkState, run: Runner, cause: BaseException) -> None:
    try:  # no process can run yet: spawn waits for the lock held since the state was written
        remove_network(state_dir, state, run)
    except MeshError as exc:
        raise InternalError(
            f"creating cluster {state.cluster} failed ({cause}), and removing what was made "
            f"failed too ({exc}): run the teardown again"
        ) from cause
    cause.add_note(f"everything made for cluster {state.cluster} was removed again")


def remove_network(state_dir: Path, state: NetworkState, run: Runner = run_ip) -> None:
    """Remove what ``state`` records and still exists, then the state file. Call with the lock
    held and the CVMs' processes stopped (:func:`teemesh.platform.vmm.teardown` does both)."""
    plan = plan_teardown(state, inventory(state, run))
    for args in plan.commands:
        run(args)
    try:
        for folder in plan.remove_dirs:
            shutil.rmtree(folder)
        with contextlib.suppress(OSError):  # only if empty: other clusters may use it
            ETC_NETNS.rmdir()
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    except OSError as exc:
        raise InternalError(f"cannot remove the files of cluster {state.cluster}: {exc}") from exc


def load_state(state_dir: Path) -> NetworkState | None:
    """The recorded network, or None when there is none."""
    path = state_dir / STATE_FILE
    try:
        return NetworkState.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        raise InputError(f"not a readable network state: {exc}", field=str(path)) from exc


def require_state(state_dir: Path) -> NetworkState:
    state = load_state(state_dir)
    if state is None:
        raise InputError(f"no cluster network recorded in {state_dir}", field="state_dir")
    return state


def set_hosts(state_dir: Path, cvm: str, extra: Mapping[str, str]) -> None:
    """Rewrite a CVM's /etc/hosts as :func:`hosts_text`. In place, not by rename: running
    processes see the file through a bind mount of its inode."""
    state = require_state(state_dir)
    _write_hosts(state.cvm(cvm), hosts_text(state, cvm, extra))


def exec_command(state: NetworkState, cvm: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside a CVM, with its /etc/hosts (``teemesh exec``)."""
    return ["ip", "netns", "exec", state.cvm(cvm).netns, *argv]


def partition(state_dir: Path, a: str, b: str, *, run: Runner = run_ip) -> None:
    """Cut traffic between CVMs ``a`` and ``b``, both ways; nothing else changes."""
    key = pair(a, b)
    with locked(state_dir):
        state = require_state(state_dir)
        commands = partition_commands(state, a, b, heal=False)
        if key not in state.partitions:  # recorded first, so heal_all finds it after a crash
            save_state(state_dir, state.model_copy(update={"partitions": (*state.partitions, key)}))
        for args in commands:
            run(args)


def heal(state_dir: Path, a: str, b: str, *, run: Runner = run_ip) -> None:
    """Undo :func:`partition` of ``a`` and ``b``; nothing to do when they were not cut off."""
    key = pair(a, b)
    with locked(state_dir):
        state = require_state(state_dir)
        if key in state.partitions:
            _heal_locked(state_dir, state, key, run)


def heal_all(state_dir: Path, *, run: Runner = run_ip) -> None:
    with locked(state_dir):
        state = require_state(state_dir)
        for key in state.partitions:
            state = _heal_locked(state_dir, state, key, run)


def _heal_locked(
    state_dir: Path, state: NetworkState, key: tuple[str, str], run: Runner
) -> NetworkState:
    for args in partition_commands(state, *key, heal=True):
        try:
            run(args)
        except CommandFailed as exc:
            if "No such process" not in exc.stderr:  # ip's words for a route already gone
                raise
    state = state.model_copy(update={"partitions": tuple(p for p in state.partitions if p != key)})
    save_state(state_dir, state)
    return state


def inventory(state: NetworkState, run: Runner) -> Present:
    namespaces = json.loads(run(["-j", "netns", "list"]) or "[]")
    links = json.loads(run(["-j", "link", "show"]) or "[]")
    routes = json.loads(run(["-j", "-4", "route", "show", "table", "main"]) or "[]")
    return Present(
        namespaces=frozenset(n["name"] for n in namespaces),
        links=frozenset(link["ifname"] for link in links),
        etc_dirs=frozenset(c.etc_dir for c in state.cvms if Path(c.etc_dir).is_dir()),
        routes=tuple(
            ipaddress.IPv4Network(r["dst"], strict=False)
            for r in routes
            if r.get("dst", "default") != "default"
        ),
    )


def _write_hosts(cvm: Cvm, text: str) -> None:
    try:
        Path(cvm.etc_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(cvm.etc_dir) / "hosts", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    except OSError as exc:
        raise InternalError(f"cannot write the /etc/hosts of {cvm.name}: {exc}") from exc


def save_state(state_dir: Path, state: NetworkState) -> None:
    write_private(state_dir / STATE_FILE, state.model_dump_json(indent=2).encode())


def private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """One change at a time per cluster: ``up`` may still be spawning while ``partition`` runs."""
    private_dir(state_dir)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
