"""Real etcd on loopback for tests (Debian's etcd-server): one member or a small cluster.

Members get fresh ports and data folders under ``home``; a start that fails because a port was
taken meanwhile is tried again on new ports. Waits are bounded, and every process is stopped by
its PID when the ``etcd_cluster`` block ends. etcd missing or never healthy fails the test (it
never skips).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

START_TIMEOUT = 20.0
ATTEMPTS = 3


@dataclass
class EtcdServer:
    """One member: ``url`` is its client URL."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    data: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self, http: httpx.Client) -> bool:
        try:
            return bool(http.get(f"{self.url}/health").json().get("health") == "true")
        except (httpx.HTTPError, ValueError):
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would; waits until it is gone."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not gone within 10 s; always reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all held open until each is known)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def etcd_binary() -> str:
    binary = shutil.which("etcd")
    if binary is None:
        pytest.fail(
            "etcd is not installed (Debian: apt-get install etcd-server; scripts/test does)"
        )
    return binary


def _launch(binary: str, home: Path, size: int, timing: tuple[int, int]) -> list[EtcdServer]:
    names = ["test"] if size == 1 else [f"m{n}" for n in range(size)]
    ports = free_ports(2 * size)
    peers = [f"http://127.0.0.1:{p}" for p in ports[size:]]
    initial = ",".join(f"{name}={peer}" for name, peer in zip(names, peers, strict=True))
    heartbeat, election = timing
    token = f"teemesh-test-{uuid.uuid4().hex[:12]}"
    members: list[EtcdServer] = []
    try:
        for name, port, peer in zip(names, ports[:size], peers, strict=True):
            client, data = f"http://127.0.0.1:{port}", home / f"{name}.data"
            log = home / f"{name}.log"
            shutil.rmtree(data, ignore_errors=True)
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [
                        binary,
                        f"--name={name}",
                        f"--data-dir={data}",
                        f"--listen-client-urls={client}",
                        f"--advertise-client-urls={client}",
                        f"--listen-peer-urls={peer}",
                        f"--initial-advertise-peer-urls={peer}",
                        f"--initial-cluster={initial}",
                        "--initial-cluster-state=new",
                        f"--initial-cluster-token={token}",
                        f"--heartbeat-interval={heartbeat}",
                        f"--election-timeout={election}",
                        *(["--pre-vote=true"] if size > 1 else []),
                        "--logger=zap",
                        "--log-level=warn",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            members.append(EtcdServer(name, client, process, log, data))
    except BaseException:  # a member could not start: stop those already running
        for member in members:
            member.stop()
        raise
    return members


def _wait_healthy(members: list[EtcdServer]) -> bool:
    """True once every member reports a healthy cluster; False if one exited (a port taken)."""
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(trust_env=False, timeout=1) as http:
        while time.monotonic() < deadline:
            if any(m.process.poll() is not None for m in members):
                return False
            if all(m.healthy(http) for m in members):
                return True
            time.sleep(0.05)
    logs = "\n".join(f"--- {m.name}:\n{m.output()}" for m in members)
    pytest.fail(f"etcd did not become healthy in {START_TIMEOUT} s:\n{logs}")


@contextlib.contextmanager
def etcd_cluster(home: Path, size: int = 1) -> Iterator[list[EtcdServer]]:
    """``size`` etcd members forming one cluster; stopped (and their data removed) at the end.

    One member elects itself fast (the smallest lease TTL etcd accepts is then 1 s); a
    cluster's members keep calmer timers with pre-vote, so a busy test machine does not
    trigger elections (and "leader changed" errors) by itself.
    """
    binary = etcd_binary()
    timing = (10, 50) if size == 1 else (50, 500)
    members: list[EtcdServer] = []
    try:
        for _ in range(ATTEMPTS):
            members = _launch(binary, home, size, timing)
            if _wait_healthy(members):
                break
            for member in members:
                member.stop()
        else:
            logs = "\n".join(f"--- {m.name}:\n{m.output()}" for m in members)
            pytest.fail(f"etcd exited at start {ATTEMPTS} times:\n{logs}")
        yield members
    finally:
        for member in members:
            member.stop()
            shutil.rmtree(member.data, ignore_errors=True)
