"""The local platform on real namespaces: a bridged cluster of CVMs, processes, faults, teardown.

Needs root (CI runs as root): without it every test fails saying so. Each test gets its own
cluster name and /24 derived from its tmp_path, and its fixture tears the cluster down and
checks that nothing is left, whatever the test did. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from teemesh.errors import InputError, Refused
from teemesh.platform import netns, vmm
from teemesh.platform.netns import CommandFailed, NetworkState

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PORT = 7070
VIP = "127.77.0.10"
WAIT = 10.0

SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(sys.argv[3].encode())
"""

PROBE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        c.settimeout(float(sys.argv[3]))
        print(c.recv(100).decode() or "closed")
except OSError as exc:
    print(f"error {exc.errno}")
"""


@pytest.fixture(scope="module", autouse=True)
def _privileged() -> None:
    try:
        netns.check_privileges()
    except Refused as exc:
        pytest.fail(f"these tests build network namespaces and must run as root: {exc}")


@dataclass
class Cluster:
    name: str
    state_dir: Path
    subnet: str  # "10.213.N"

    def addr(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    def create(self, cvms: Sequence[str], run: netns.Runner = netns.run_ip) -> NetworkState:
        addresses = {cvm: f"{self.addr(11 + i)}/24" for i, cvm in enumerate(cvms)}
        return netns.create(self.state_dir, self.name, f"{self.addr(1)}/24", addresses, run=run)

    @property
    def state(self) -> NetworkState:
        return netns.require_state(self.state_dir)

    def serve(self, cvm: str, host: str, name: str = "server") -> None:
        """A TCP server in ``cvm`` answering its CVM name, ready when the log says so."""
        record = vmm.spawn(
            self.state_dir, cvm, name, [sys.executable, "-c", SERVER, host, str(PORT), cvm]
        )
        wait_for(lambda: "listening" in Path(record.log).read_text(), f"{name} in {cvm}")

    def probe(self, cvm: str, host: str, timeout: float = 2.0) -> str:
        """Connect from inside ``cvm`` (name lookups use its /etc/hosts): what the server said,
        or ``error ERRNO``."""
        argv = [sys.executable, "-c", PROBE, host, str(PORT), str(timeout)]
        return self.run_in(cvm, argv).strip()

    def run_in(self, cvm: str, argv: Sequence[str]) -> str:
        result = subprocess.run(
            netns.exec_command(self.state, cvm, argv),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached after {timeout} s")
        time.sleep(0.05)


def host_probe(address: str, timeout: float = 2.0) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, address, str(PORT), str(timeout)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def ip_json(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return list(json.loads(out or "[]"))


def namespaces_of(cluster: str) -> list[str]:
    return [
        str(n["name"])
        for n in ip_json("netns", "list")
        if str(n["name"]).startswith(f"tm-{cluster}-")
    ]


def assert_nothing_left(state: NetworkState, pids: Sequence[vmm.Handle] = ()) -> None:
    assert namespaces_of(state.cluster) == []
    links = {str(link["ifname"]) for link in ip_json("link", "show")}
    assert links.isdisjoint({state.bridge, *(c.veth for c in state.cvms)})
    assert not any(Path(c.etc_dir).exists() for c in state.cvms)
    handles = [vmm.Handle(p.pid, p.start_time) for p in state.processes] + list(pids)
    assert [h.pid for h in handles if vmm.alive(h)] == []


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    digest = hashlib.sha256(str(tmp_path).encode()).hexdigest()
    found = Cluster(f"t{digest[:7]}", tmp_path / "state", f"10.213.{int(digest[7:9], 16)}")
    try:
        yield found
    finally:
        state = netns.load_state(found.state_dir)
        vmm.teardown(found.state_dir, grace=1.0)
        if state is not None:
            assert_nothing_left(state)


def test_cvms_reach_each_other_by_name_and_the_host_reaches_them(cluster: Cluster) -> None:
    cluster.create(["a", "b", "c"])
    cluster.serve("a", cluster.addr(11))
    assert cluster.probe("b", "a") == "a"  # "a" resolves from b's own /etc/hosts
    assert host_probe(cluster.addr(11)) == "a"  # the host through the bridge
    hosts = cluster.run_in("b", ["cat", "/etc/hosts"])
    assert f"{cluster.addr(11)}\ta" in hosts
    assert f"cluster {cluster.name}" in hosts
    assert f"cluster {cluster.name}" not in Path("/etc/hosts").read_text()  # private to b
    assert cluster.run_in("c", ["ip", "-br", "link", "show", "eth0"]).startswith("eth0")
    assert "inet6" not in cluster.run_in("c", ["ip", "addr", "show", "eth0"])  # IPv4 only

    watcher = vmm.spawn(
        cluster.state_dir,
        "b",
        "watcher",
        ["sh", "-c", "until grep -q api /etc/hosts; do sleep 0.05; done; echo seen"],
    )
    netns.set_hosts(cluster.state_dir, "b", {"api": cluster.addr(11)})
    wait_for(lambda: "seen" in Path(watcher.log).read_text(), "the new entry, while running")
    assert cluster.probe("b", "api") == "a"
    assert "api" not in cluster.run_in("c", ["cat", "/etc/hosts"])


def test_a_process_gets_its_environment_folder_and_private_log(cluster: Cluster) -> None:
    cluster.create(["a"])
    work = cluster.state_dir.parent / "work"
    work.mkdir()
    record = vmm.spawn(
        cluster.state_dir,
        "a",
        "app",
        ["sh", "-c", 'echo "$GREETING from $(pwd) in $(ip netns identify $$)"; echo oops >&2'],
        env={"GREETING": "hello"},
        cwd=work,
    )
    log = Path(record.log)
    wait_for(lambda: "oops" in log.read_text(), "the app's output")
    assert log.read_text() == f"hello from {work} in tm-{cluster.name}-a\noops\n"
    assert log == cluster.state_dir / "logs" / "a" / "app.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    wait_for(lambda: not vmm.is_alive(cluster.state_dir, "a", "app"), "the app's exit")

    vmm.spawn(cluster.state_dir, "a", "app", ["sh", "-c", "echo again"])  # appended, not replaced
    wait_for(lambda: "again" in log.read_text(), "the second run's output")
    assert log.read_text().startswith("hello")


def test_a_vip_on_loopback_is_private_to_its_cvm(cluster: Cluster) -> None:
    cluster.create(["a", "b"])
    cluster.serve("a", VIP)
    assert cluster.probe("a", VIP) == "a"
    assert cluster.probe("b", VIP) == "error 111"  # b's loopback: nothing listens there


def test_partition_cuts_one_pair_both_ways_and_heal_restores(cluster: Cluster) -> None:
    cluster.create(["a", "b", "c"])
    for i, cvm in enumerate("abc"):
        cluster.serve(cvm, cluster.addr(11 + i))
    assert [cluster.probe("a", "b"), cluster.probe("b", "a")] == ["b", "a"]

    netns.partition(cluster.state_dir, "a", "b")
    netns.partition(cluster.state_dir, "b", "a")  # twice: still one partition
    assert cluster.state.partitions == (("a", "b"),)
    assert cluster.probe("a", "b") == "error 113"  # EHOSTUNREACH, at once
    assert cluster.probe("b", "a") == "error 113"
    assert [cluster.probe("a", "c"), cluster.probe("c", "b")] == ["c", "b"]
    assert host_probe(cluster.addr(11)) == "a"

    netns.heal(cluster.state_dir, "a", "b")
    netns.heal(cluster.state_dir, "a", "b")  # nothing left to heal: fine
    assert [cluster.probe("a", "b"), cluster.probe("b", "a")] == ["b", "a"]

    netns.partition(cluster.state_dir, "a", "b")
    netns.partition(cluster.state_dir, "a", "c")
    netns.heal_all(cluster.state_dir)
    assert cluster.state.partitions == ()
    assert [cluster.probe("a", "b"), cluster.probe("c", "a")] == ["b", "a"]


def test_pause_and_resume(cluster: Cluster) -> None:
    cluster.create(["a"])
    cluster.serve("a", cluster.addr(11))
    record = cluster.state.process("a", "server")
    assert record is not None

    vmm.pause(cluster.state_dir, "a", "server")

    def stopped() -> bool:
        proc = vmm.read_stat(record.pid)
        return proc is not None and proc.state == "T"

    wait_for(stopped, "the server stopped by SIGSTOP")
    assert host_probe(cluster.addr(11), timeout=0.5) == "error None"  # accepted, never answered
    assert vmm.is_alive(cluster.state_dir, "a", "server")

    vmm.resume(cluster.state_dir, "a", "server")
    assert host_probe(cluster.addr(11)) == "a"

    vmm.pause(cluster.state_dir, "a")  # the whole CVM
    assert host_probe(cluster.addr(11), timeout=0.5) == "error None"
    vmm.resume(cluster.state_dir, "a")
    assert host_probe(cluster.addr(11)) == "a"


STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(300)
"""


def namespace_pids(cluster: Cluster, cvm: str) -> list[str]:
    namespace = cluster.state.cvm(cvm).netns
    out = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_kill_stops_the_whole_group(cluster: Cluster) -> None:
    cluster.create(["a"])
    family = vmm.spawn(
        cluster.state_dir, "a", "family", ["sh", "-c", "sleep 300 & sleep 300 & wait"]
    )
    leader = vmm.Handle(family.pid, family.start_time)
    wait_for(lambda: len(vmm.group_members(leader)) == 3, "sh and its two sleeps")
    stubborn = vmm.spawn(cluster.state_dir, "a", "stubborn", [sys.executable, "-c", STUBBORN])
    wait_for(lambda: "ready" in Path(stubborn.log).read_text(), "stubborn ignoring SIGTERM")
    with pytest.raises(InputError, match="already runs"):
        vmm.spawn(cluster.state_dir, "a", "family", ["true"])

    vmm.kill(cluster.state_dir, "a", "family", grace=5.0)
    assert vmm.group_members(leader) == []
    assert not vmm.is_alive(cluster.state_dir, "a", "family")
    assert cluster.state.process("a", "family") is None

    started = time.monotonic()
    vmm.kill(cluster.state_dir, "a", "stubborn", grace=0.5)  # SIGKILL after the grace
    assert time.monotonic() - started < 5
    assert not vmm.alive(vmm.Handle(stubborn.pid, stubborn.start_time))
    assert namespace_pids(cluster, "a") == []


def test_kill_without_a_name_empties_the_cvm(cluster: Cluster) -> None:
    cluster.create(["a", "b"])
    vmm.spawn(cluster.state_dir, "a", "one", ["sleep", "300"])
    vmm.spawn(cluster.state_dir, "b", "other", ["sleep", "300"])
    with subprocess.Popen(netns.exec_command(cluster.state, "a", ["sleep", "300"])) as stray:
        wait_for(lambda: len(namespace_pids(cluster, "a")) == 2, "two processes in a")
        vmm.kill(cluster.state_dir, "a", grace=2.0)
        assert stray.wait(timeout=5) == -signal.SIGTERM  # not recorded, found all the same
    assert namespace_pids(cluster, "a") == []
    assert [p.name for p in cluster.state.processes] == ["other"]
    assert vmm.is_alive(cluster.state_dir, "b", "other")
    restarted = vmm.spawn(cluster.state_dir, "a", "one", ["sleep", "300"])  # a restart
    assert vmm.is_alive(cluster.state_dir, "a", "one")
    assert cluster.state.process("a", "one") == restarted


CRASH_AFTER_UP = """
import os, signal, subprocess, sys
from pathlib import Path
from teemesh.platform import netns, vmm
state_dir, cluster, subnet = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cvms = {name: f"{subnet}.{11 + i}/24" for i, name in enumerate("abc")}
state = netns.create(state_dir, cluster, f"{subnet}.1/24", cvms)
vmm.spawn(state_dir, "a", "sleeper", ["sleep", "300"])
netns.partition(state_dir, "a", "b")
stray = subprocess.Popen(
    netns.exec_command(state, "b", ["sleep", "300"]),
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    start_new_session=True,
)
print(stray.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

CRASH_WHILE_CREATING = """
import os, signal, sys
from pathlib import Path
from teemesh.platform import netns
state_dir, cluster, subnet = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def run(args):
    if args[:2] == ("link", "add") and "tm-" + cluster + "-c" in args:
        os.kill(os.getpid(), signal.SIGKILL)  # dies with a and b made and c's namespace
    return netns.run_ip(args)

cvms = {name: f"{subnet}.{11 + i}/24" for i, name in enumerate("abcd")}
netns.create(state_dir, cluster, f"{subnet}.1/24", cvms, run=run)
"""


@pytest.mark.parametrize("script", [CRASH_AFTER_UP, CRASH_WHILE_CREATING], ids=["up", "creating"])
def test_teardown_after_a_crash_leaves_nothing(cluster: Cluster, script: str) -> None:
    crashed = subprocess.run(
        [sys.executable, "-c", script, str(cluster.state_dir), cluster.name, cluster.subnet],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    state = cluster.state
    assert namespaces_of(cluster.name)  # the crash left things behind
    strays = [h for pid in crashed.stdout.split() if (h := vmm.handle_of(int(pid)))]
    assert all(vmm.alive(h) for h in strays)

    assert vmm.teardown(cluster.state_dir) is True
    assert_nothing_left(state, strays)
    assert not (cluster.state_dir / netns.STATE_FILE).exists()
    assert vmm.teardown(cluster.state_dir) is False  # twice: nothing to do, no error


def test_a_failure_midway_removes_everything_made(cluster: Cluster) -> None:
    cvms = [f"w{i}" for i in range(7)]
    calls: list[tuple[str, ...]] = []

    def failing_at_the_fifth(args: Sequence[str]) -> str:
        calls.append(tuple(args))
        if tuple(args[:2]) == ("link", "add") and f"tm-{cluster.name}-w4" in args:
            raise CommandFailed(["ip", *args], "injected failure")
        return netns.run_ip(args)

    with pytest.raises(CommandFailed, match="injected failure") as caught:
        cluster.create(cvms, run=failing_at_the_fifth)
    assert any("removed again" in note for note in caught.value.__notes__)
    assert ("netns", "add", f"tm-{cluster.name}-w3") in calls  # four CVMs were made ...
    assert namespaces_of(cluster.name) == []  # ... and removed
    planned = netns.plan_network(
        cluster.name,
        f"{cluster.addr(1)}/24",
        {c: f"{cluster.addr(11 + i)}/24" for i, c in enumerate(cvms)},
    )
    assert_nothing_left(planned)
    assert netns.load_state(cluster.state_dir) is None

    cluster.create(cvms[:2])  # the same names are free again
    assert len(namespaces_of(cluster.name)) == 2


def test_clashes_are_refused_before_anything_is_made(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create(["a"])
    with pytest.raises(InputError, match="already holds cluster"):
        cluster.create(["b"])
    twin = Cluster(cluster.name, tmp_path / "twin", cluster.subnet)
    with pytest.raises(InputError) as caught:
        twin.create(["a"])
    assert f"network namespace tm-{cluster.name}-a already exists" in str(caught.value)
    assert f"overlaps {cluster.subnet}.0/24" in str(caught.value)
    assert netns.load_state(twin.state_dir) is None
    assert cluster.probe("a", cluster.addr(11)) == "error 111"  # the first one still stands


def test_without_privileges_it_says_what_is_missing(tmp_path: Path) -> None:
    script = (
        "import sys\nfrom pathlib import Path\nfrom teemesh.platform import netns\n"
        "netns.create(Path(sys.argv[1]), 'nopriv', '10.213.255.1/24', {'a': '10.213.255.2/24'})"
    )
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-net_admin,-sys_admin",
            sys.executable,
            "-c",
            script,
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "Refused" in result.stderr
    assert "lacks CAP_NET_ADMIN and CAP_SYS_ADMIN" in result.stderr
    assert "run it as root" in result.stderr
    assert not (tmp_path / "s").exists()
    assert namespaces_of("nopriv") == []
    assert os.geteuid() == 0
