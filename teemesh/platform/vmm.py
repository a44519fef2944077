"""The VMM's processes: started inside a CVM, signalled by group, never by a stale PID; and the
teardown of a whole cluster, its processes first.

A process is known by its PID *and* its start time (field 22 of ``/proc/PID/stat``, clock ticks
since boot), so a PID that the kernel has since given to another process is left alone. Each
process leads a new session, so its PID is also its process group and a signal reaches the
children it forked too. A zombie counts as gone: ``teemesh up`` exits after starting processes,
and whoever inherits them may never reap them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from teemesh.errors import InputError, InternalError
from teemesh.platform import netns
from teemesh.platform.netns import NetworkState, Process, Runner, run_ip

POLL = 0.05
KILL_WAIT = 5.0
"""How long SIGKILLed processes get to vanish (they may be in an uninterruptible sleep)."""
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PROCESS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_children: set[int] = set()
"""PIDs this program started and has not reaped yet."""


@dataclass(frozen=True)
class ProcStat:
    state: str
    pgrp: int
    start_time: int


@dataclass(frozen=True)
class Handle:
    """One process as it was when we saw it start: a recycled PID has another start time."""

    pid: int
    start_time: int


def parse_stat(text: str) -> ProcStat:
    """Read ``/proc/PID/stat``; the command name may hold spaces and ``)``, so split after it."""
    fields = text[text.rindex(")") + 2 :].split()
    return ProcStat(state=fields[0], pgrp=int(fields[2]), start_time=int(fields[19]))


def read_stat(pid: int) -> ProcStat | None:
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def handle_of(pid: int) -> Handle | None:
    """The handle of a running process, or None when there is none by that PID."""
    stat = read_stat(pid)
    return None if stat is None else Handle(pid, stat.start_time)


def spawn_in(
    namespace: str | None,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Path,
    cwd: Path | None = None,
) -> Handle:
    """Start ``argv`` through ``ip netns exec`` (which execs it: same PID), output appended to
    ``log`` (created 0600), stdin from /dev/null, in a new session, with exactly ``env``.
    Without a ``namespace`` it runs in the host's network (what publishes a CVM's port)."""
    ip = shutil.which("ip")
    if ip is None:
        raise InternalError(
            "the ip command is missing: install iproute2 (apt-get install iproute2)"
        )
    command = [ip, "netns", "exec", namespace] if namespace else []
    if cwd is not None:
        command += [shutil.which("env") or "/usr/bin/env", f"--chdir={cwd}", "--"]
    command += argv
    program = shutil.which(command[0]) or command[0]  # posix_spawn does not search PATH
    try:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            pid = os.posix_spawn(
                program,
                command,
                dict(env),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, fd, 1),
                    (os.POSIX_SPAWN_DUP2, fd, 2),
                ],
                setsid=True,
                setsigmask=(),
                setsigdef=_DEFAULT_SIGNALS,  # Python ignores SIGPIPE; exec would keep that
            )
        finally:
            os.close(fd)
    except OSError as exc:
        raise InternalError(f"cannot start {' '.join(argv)} in {namespace}: {exc}") from exc
    _children.add(pid)
    stat = read_stat(pid)  # our child: it stays in /proc (a zombie at worst) until reaped
    if stat is None:
        raise InternalError(f"process {pid} started in {namespace} vanished at once")
    return Handle(pid, stat.start_time)


def alive(handle: Handle) -> bool:
    """True while the process runs (stopped counts as running)."""
    _reap(handle.pid)
    stat = read_stat(handle.pid)
    return stat is not None and stat.start_time == handle.start_time and stat.state not in "ZX"


def group_members(leader: Handle) -> list[int]:
    """Live processes of the group ``leader`` started. The leader may be gone and its children
    still there: the kernel never hands out a PID while a group of that number exists, so a
    missing leader means the members found are ours, and a different start time means the
    group is gone and the PID recycled."""
    _reap(leader.pid)
    stat = read_stat(leader.pid)
    if stat is not None and stat.start_time != leader.start_time:
        return []
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            member = read_stat(int(entry.name))
            if member is not None and member.pgrp == leader.pid and member.state not in "ZX":
                members.append(int(entry.name))
    return members


def signal_group(leader: Handle, signum: int) -> bool:
    """Send ``signum`` to the whole group; False when no process of it is left."""
    if not group_members(leader):
        return False
    try:
        os.killpg(leader.pid, signum)
    except ProcessLookupError:
        return False
    return True


def signal_process(handle: Handle, signum: int) -> bool:
    if not alive(handle):
        return False
    try:
        os.kill(handle.pid, signum)
    except ProcessLookupError:
        return False
    return True


def stop(
    groups: Iterable[Handle],
    singles: Iterable[Handle] = (),
    grace: float = 5.0,
    *,
    hard: bool = False,
) -> list[int]:
    """SIGTERM (with SIGCONT, so paused ones hear it), SIGKILL whatever is left after ``grace``
    seconds; ``hard``: SIGKILL at once, as a power cut. Returns the PIDs still alive after that
    (empty when all went)."""
    groups, singles = list(groups), list(singles)

    def remaining() -> list[int]:
        return live_pids(groups, singles)

    if not hard:
        for signum in (signal.SIGTERM, signal.SIGCONT):
            for leader in groups:
                signal_group(leader, signum)
            for handle in singles:
                signal_process(handle, signum)
        if _wait_until_empty(remaining, grace):
            return []
    for leader in groups:
        signal_group(leader, signal.SIGKILL)
    for handle in singles:
        signal_process(handle, signal.SIGKILL)
    _wait_until_empty(remaining, KILL_WAIT)
    return remaining()


def live_pids(groups: Iterable[Handle], singles: Iterable[Handle] = ()) -> list[int]:
    pids = [pid for leader in groups for pid in group_members(leader)]
    return pids + [h.pid for h in singles if alive(h)]


def _wait_until_empty(remaining: Callable[[], list[int]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while remaining():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def _reap(pid: int) -> None:
    """Collect the exit of a child :func:`spawn_in` started, so no zombie piles up in a
    long-lived caller; another part of the program's children are left to their owner."""
    if pid in _children:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                return
        _children.discard(pid)


# -- a cluster's processes, recorded in its network state ------------------------------------


def spawn(
    state_dir: Path,
    cvm: str,
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    host_network: bool = False,
) -> Process:
    """Start ``argv`` as process ``name`` of CVM ``cvm``, with this environment plus ``env``,
    output appended to ``STATE/logs/CVM/NAME.log``; ``name`` must not be running already.
    ``host_network``: it belongs to the CVM (killed with it) but runs in the host's network."""
    if not argv:
        raise InputError("no command to run", field="argv")
    if not _PROCESS_NAME.fullmatch(name):
        raise InputError(f"{name!r} is not a process name", field="name")
    with netns.locked(state_dir):
        state = netns.require_state(state_dir)
        namespace = state.cvm(cvm).netns
        old = state.process(cvm, name)
        if old is not None and alive(_handle(old)):
            raise InputError(f"{name} already runs in {cvm} (PID {old.pid})", field="name")
        log = state_dir / "logs" / cvm / f"{name}.log"
        netns.private_dir(log.parent)
        where = None if host_network else namespace
        handle = spawn_in(where, argv, env={**os.environ, **(env or {})}, log=log, cwd=cwd)
        record = Process(
            cvm=cvm, name=name, pid=handle.pid, start_time=handle.start_time, log=str(log)
        )
        state = state.without_processes(cvm, name)
        netns.save_state(
            state_dir, state.model_copy(update={"processes": (*state.processes, record)})
        )
    return record


def kill(
    state_dir: Path,
    cvm: str,
    name: str | None = None,
    *,
    grace: float = 5.0,
    hard: bool = False,
    run: Runner = run_ip,
) -> None:
    """Stop process ``name``'s group, or with no name every process in the CVM: SIGTERM, and
    SIGKILL after ``grace`` seconds (``hard``: SIGKILL at once, a crash in which nothing cleans
    up). The record goes; restarting is a new :func:`spawn`."""
    with netns.locked(state_dir):
        state = netns.require_state(state_dir)
        groups, strays = _targets(state, cvm, name, run)
        left = stop(groups, strays, grace, hard=hard)
        if left:
            raise InternalError(f"processes {left} in {cvm} did not exit on SIGKILL")
        netns.save_state(state_dir, state.without_processes(cvm, name))


def pause(state_dir: Path, cvm: str, name: str | None = None, *, run: Runner = run_ip) -> None:
    """SIGSTOP to process ``name``'s group, or to every process of the CVM; returns once all
    of them are stopped."""
    _signal(state_dir, cvm, name, signal.SIGSTOP, run)


def resume(state_dir: Path, cvm: str, name: str | None = None, *, run: Runner = run_ip) -> None:
    _signal(state_dir, cvm, name, signal.SIGCONT, run)


def is_alive(state_dir: Path, cvm: str, name: str) -> bool:
    """Whether the process recorded as ``name`` still runs (paused counts as running)."""
    record = netns.require_state(state_dir).process(cvm, name)
    return record is not None and alive(_handle(record))


def teardown(state_dir: Path, *, grace: float = 5.0, run: Runner = run_ip) -> bool:
    """Stop every process in the cluster's namespaces, recorded or not, then remove everything
    the network state records. False when there was nothing to do (already torn down)."""
    if not (state_dir / netns.STATE_FILE).exists():
        return False
    with netns.locked(state_dir):
        state = netns.load_state(state_dir)
        if state is None:
            return False
        present = netns.inventory(state, run).namespaces
        strays = [
            h for c in state.cvms if c.netns in present for h in _namespace_processes(c.netns, run)
        ]
        left = stop([_handle(p) for p in state.processes], strays, grace)
        if left:
            raise InternalError(f"processes {left} of cluster {state.cluster} ignore SIGKILL")
        netns.remove_network(state_dir, state, run)
    return True


def _signal(state_dir: Path, cvm: str, name: str | None, signum: int, run: Runner) -> None:
    groups, strays = _targets(netns.require_state(state_dir), cvm, name, run)
    for leader in groups:
        signal_group(leader, signum)
    for handle in strays:
        signal_process(handle, signum)
    if signum == signal.SIGSTOP:  # delivered asynchronously: return once it has taken hold

        def running() -> list[int]:
            stats = [(pid, read_stat(pid)) for pid in live_pids(groups, strays)]
            return [pid for pid, stat in stats if stat is not None and stat.state not in "tT"]

        if not _wait_until_empty(running, KILL_WAIT):
            raise InternalError(f"processes {running()} in {cvm} did not stop on SIGSTOP")


def _targets(
    state: NetworkState, cvm: str, name: str | None, run: Runner
) -> tuple[list[Handle], list[Handle]]:
    """Process groups and lone processes to signal: one recorded process, or the whole CVM."""
    namespace = state.cvm(cvm).netns
    if name is not None:
        record = state.process(cvm, name)
        if record is None:
            raise InputError(f"no process {name!r} in {cvm}", field="name")
        return [_handle(record)], []
    groups = [_handle(p) for p in state.processes if p.cvm == cvm]
    return groups, _namespace_processes(namespace, run)


def _namespace_processes(namespace: str, run: Runner) -> list[Handle]:
    pids = run(["netns", "pids", namespace]).split()
    return [h for pid in pids if (h := handle_of(int(pid))) is not None]


def _handle(record: Process) -> Handle:
    return Handle(record.pid, record.start_time)
