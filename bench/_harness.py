"""What the end-to-end benches share: statistics, CPU accounting, and a simulated cluster of real
``teemesh agent`` and ``teemesh coordinator`` processes on loopback, stopped by their PIDs.

Imported as ``_harness`` by the bench scripts (``.venv/bin/python bench/NAME.py`` puts bench/ on
sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from teemesh.attest.dstack import KeyProvider, compose_hash
from teemesh.attest.policy import Policy
from teemesh.attest.simulated import OsImage, PlatformKey, SimulatedCvm
from teemesh.coordinator.client import AdmissionClient, Svid
from teemesh.errors import PeerError
from teemesh.identity.ratls import PinnedPeer
from teemesh.platform.agent_client import AgentClient

CLUSTER, GROUP = "bench", "web"
OS_IMAGE = "dstack-0.5.7-sim"
COORDINATOR_COMPOSE = b'{"manifest_version":2,"name":"coordinator","runner":"docker-compose"}'
WEB_COMPOSE = b'{"manifest_version":2,"name":"web","runner":"docker-compose"}'
KMS = KeyProvider("kms", "ab" * 32)
"""The key provider of the workload CVMs; the group's policy names it."""


# ---------------------------------------------------------------------------------------------
# statistics


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def latency_ms(samples: Sequence[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": round(1e3 * percentile(samples, 0.5), 3),
        "p99_ms": round(1e3 * percentile(samples, 0.99), 3),
        "max_ms": round(1e3 * max(samples), 3),
    }


def ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# processes and CPU


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mib(pid: int) -> float:
    """Resident memory of one process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_open_files_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE a running process has, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise ValueError(f"no open files limit for pid {pid}")


def machine_busy_seconds() -> float:
    """CPU time spent on anything but idle and iowait, summed over all CPUs, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (up to the hard limit).

    Processes started afterwards inherit it, the coordinator included. Returns the soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


@dataclass
class Processes:
    """The processes this bench started; stopped by their own PIDs, newest first."""

    started: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, name: str, args: list[str], log: Path, ready: Callable[[], bool]) -> int:
        """Start ``teemesh ARGS`` (the command beside this Python); wait until ``ready()``."""
        teemesh = Path(sys.executable).parent / "teemesh"
        return self.start_command(f"teemesh {name}", [str(teemesh), *args], log, ready)

    def start_command(
        self, name: str, argv: list[str], log: Path, ready: Callable[[], bool]
    ) -> int:
        """Start any command (a HAProxy, a backend), output to ``log``; wait until ``ready()``."""
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.started.append((name, proc, log))
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise SystemExit(f"{name} did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.05)
        return proc.pid

    def stop(self) -> None:
        for _name, proc, _log in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.started.clear()


def coordinator_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            # verify=False: readiness probe of our own loopback process (bench only)
            return httpx.get(f"{url}/v1/ca", verify=False, timeout=1).status_code == 200  # noqa: S501
        except httpx.HTTPError:
            return False

    return ready


@contextlib.contextmanager
def simulated_cluster(
    folder: Path,
    platform: PlatformKey,
    *,
    group_lines: Sequence[str] = (),
    top_lines: Sequence[str] = (),
) -> Iterator[tuple[int, int]]:
    """An agent for the coordinator's CVM, then the coordinator; yields (port, its pid).

    The policy has one group, ``GROUP``, admitting any peer id that runs ``WEB_COMPOSE``;
    ``group_lines`` are more lines of that group's policy (``services: [web]``), ``top_lines``
    more top-level ones (``lease_ttl_seconds: 300``).
    """
    (folder / "platform.key").write_bytes(platform.private_pem())
    (folder / "platform.key").chmod(0o600)
    (folder / "platform.pub").write_bytes(platform.public_pem())
    (folder / "coordinator-compose.json").write_bytes(COORDINATOR_COMPOSE)
    (folder / "cluster.yaml").write_text(
        f"cluster: {CLUSTER}\ntee: simulated\nplatform_key: platform.pub\n"
        + "".join(f"{line}\n" for line in top_lines)
        + "groups:\n"
        f"  {GROUP}:\n"
        f"    compose_hashes: [{compose_hash(WEB_COMPOSE).hex()}]\n"
        f"    os_images: [{OsImage(OS_IMAGE).os_image_hash.hex()}]\n"
        "    key_providers: [{name: kms}]\n"  # no peer_ids: any peer id is admitted
         + "".join(f"    {line}\n" for line in group_lines)
    )
    sock = folder / "coordinator-agent.sock"
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    procs = Processes()
    try:
        agent_args = [
            "agent", "--socket", str(sock), "--state", str(folder / "coordinator-agent"),
            "--platform-key", str(folder / "platform.key"),
            "--app-compose", str(folder / "coordinator-compose.json"), "--os-image", OS_IMAGE,
        ]  # fmt: skip
        procs.start("agent", agent_args, folder / "agent.log", sock.exists)
        coordinator_args = [
            "coordinator", "--policy", str(folder / "cluster.yaml"),
            "--listen", f"127.0.0.1:{port}", "--state", str(folder / "coordinator"),
            "--agent", str(sock),
        ]  # fmt: skip
        pid = procs.start(
            "coordinator", coordinator_args, folder / "coordinator.log", coordinator_ready(url)
        )
        yield port, pid
    finally:
        procs.stop()


# ---------------------------------------------------------------------------------------------
# joining the simulated cluster as a sidecar does


def coordinator_check(platform: PlatformKey) -> PinnedPeer:
    """What a sidecar pins: the coordinator's RA-TLS evidence, checked on every connection."""
    policy = Policy(
        tee="simulated",
        platform_key=platform.public_pem().decode(),
        compose_hashes=(compose_hash(COORDINATOR_COMPOSE).hex(),),
    )
    return PinnedPeer(policy)


class InProcessAgent(AgentClient):
    """A workload CVM's guest agent without its process: ``GetQuote`` from a ``SimulatedCvm``.

    Lets ``AdmissionClient`` run its real path (challenge, key and CSR, quote, attest, SVID
    checks) with the quote made in-process, as the admission bench's client does.
    """

    def __init__(self, cvm: SimulatedCvm) -> None:  # no HTTP client: nothing to connect to
        self.endpoint = "in-process"
        self.cvm = cvm

    def close(self) -> None:
        pass

    def call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        if method != "GetQuote" or args is None:
            raise PeerError(f"the in-process agent only answers GetQuote, not {method}")
        return self.cvm.get_quote_reply(bytes.fromhex(args["report_data"]))


def admit(url: str, platform: PlatformKey, peer_id: str, group: str = GROUP) -> Svid:
    """Admit a fresh workload CVM (``WEB_COMPOSE``) as ``peer_id`` through the admission API."""
    cvm = SimulatedCvm(platform, OsImage(OS_IMAGE), WEB_COMPOSE, KMS)
    client = AdmissionClient(url, coordinator_check(platform), InProcessAgent(cvm))
    return client.admit(CLUSTER, group, peer_id)


# -- the wrk benches' command line and report ---------------------------------------------------


def add_load_options(parser: argparse.ArgumentParser, *, seconds: tuple[int, int]) -> None:
    """The options of a bench that loads proxies with wrk against HAProxy; ``seconds``: the
    default per measurement, (normal, --quick)."""
    normal, quick = seconds
    parser.add_argument("--seconds", type=int, help=f"per measurement ({normal}; --quick: {quick})")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured wrk run before (1)")
    parser.add_argument("--connections", type=int, help="wrk connections (64; --quick: 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument(
        "--quick", action="store_true", help=f"{quick} s, 32 connections by default"
    )
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="measure each workload and path this many times, keep the least disturbed (1)",
    )  # fmt: skip
    parser.add_argument("--logs", type=Path, help="copy every process's log here at the end")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    parser.add_argument("--save", type=Path, help="also write the JSON document to this file")


def checked_load_options(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    *,
    seconds: tuple[int, int],
    quiet_wait: tuple[float, float],
) -> dict[str, str]:
    """Fill the --quick defaults, refuse out-of-range values; the paths of wrk and haproxy."""
    pick = 1 if args.quick else 0
    if args.seconds is None:
        args.seconds = seconds[pick]
    if args.connections is None:
        args.connections = (64, 32)[pick]
    if args.quiet_wait is None:
        args.quiet_wait = quiet_wait[pick]
    if not 1 <= args.seconds <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be within 1..600 and --warmup within 0..60")
    if not 1 <= args.repeat <= 20 or args.quiet_wait < 0:
        parser.error("--repeat must be within 1..20 and --quiet-wait at least 0")
    if not 1 <= args.connections <= 10000 or not 1 <= args.threads <= 64:
        parser.error("--connections must be within 1..10000 and --threads within 1..64")
    found = {name: shutil.which(name) for name in ("wrk", "haproxy")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        parser.error(f"needs {' and '.join(missing)}: apt-get install -y {' '.join(missing)}")
    return {name: str(path) for name, path in found.items()}


def run_in_scratch(
    prefix: str, options: Any, run: Callable[[Any, Path], dict[str, Any]]
) -> dict[str, Any]:
    """``run(options, folder)`` in a temporary folder that SIGTERM too removes (it unwinds);
    the document it returns, after the machine and the options."""

    def terminated(_signum: int, _frame: object) -> None:
        raise SystemExit(128 + signal.SIGTERM)  # unwinds: processes stopped, folder removed

    signal.signal(signal.SIGTERM, terminated)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        doc = run(options, Path(tmp))
    shown = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    return {"cpus": os.cpu_count(), "options": shown, **doc}


def emit(
    args: argparse.Namespace, doc: dict[str, Any], report: Callable[[dict[str, Any]], None]
) -> None:
    """``--save`` writes the JSON document; ``--json`` prints it, else ``report`` does."""
    if args.save:
        args.save.write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        report(doc)
