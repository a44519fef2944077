"""Sidecar data plane beside raw TCP and an HAProxy mTLS pair: bytes, requests, connections.

    .venv/bin/python bench/sidecar_bench.py --quick
    .venv/bin/python bench/sidecar_bench.py --seconds 5 --connections 64
    .venv/bin/python bench/sidecar_bench.py --profile /tmp/sidecar-profile   # py-spy, see below

Printed, never asserted (not part of pytest). Everything runs on loopback in one temporary
folder, in one run, each workload on the three paths one after the other:

- raw: the client dials the backend directly;
- haproxy: client -> HAProxy (TCP mode, mTLS client side) -> HAProxy (TCP mode, mTLS server
  side, the client certificate verified against the mesh CA) -> backend; ``nbthread 1`` each.
  Their certificates are real SVIDs, admitted by the same coordinator as the sidecars;
- sidecar: client -> route VIP of an egress ``teemesh sidecar run`` -> the ingress sidecar's
  mTLS port -> backend. A real coordinator admits both sidecars (simulated TEE, each with its
  own ``teemesh agent``); the ingress registers the backends, the egress routes to them.

Workloads: bulk (one connection writing to a sink for ``--seconds``, which answers the byte
count after the half-close: MB/s, 10^6 bytes), keep-alive (``wrk``, ``--connections`` kept-alive
HTTP/1.1 connections against a tiny HTTP backend: req/s, p50/p99), new connections (the same
with ``Connection: close``: connect, one request, close). For the proxies: CPU (utime+stime of
both proxy processes, from /proc) per request or per GB, and RSS idle and peak under load.

Needs ``haproxy`` and ``wrk`` (Debian: ``apt-get install haproxy wrk``; run here by PID, no
service). The HTTP backend is a third HAProxy in HTTP mode answering ``200 ok`` itself (C, so it
costs the two shared cores little); ``--http-backend python`` uses a uvloop protocol instead.
The sink is a uvloop protocol in a subprocess of this script.

New connections are also measured through a HAProxy client side with ``no-ssl-reuse`` (no TLS
session resumption), beside the default one that resumes. A second table says where the CPU
went during each measurement: proxies, load client, backends, the bench's idle services, and
"other" (processes that are not ours, and softirq): above ~20% of a core the row is flagged,
naming the busiest other processes. Before each measurement the bench waits (``--quiet-wait``,
60 s at most) for other processes to calm down; ``--repeat N`` keeps the least disturbed of N.

``--profile DIR`` runs ``py-spy record`` (``--py-spy PATH``, or on PATH) on both sidecars
during their measured phases, writes collapsed stacks to DIR and prints the top frames in
teemesh's code (``--native``: C frames too, which stops the process for each sample). Sampling
disturbs the numbers of that run. ``--logs DIR`` keeps every process's log, ``--save FILE``
writes the JSON document beside the tables, ``--json`` prints only it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import uvloop
import yaml
from _harness import (
    COORDINATOR_COMPOSE,
    GROUP,
    OS_IMAGE,
    WEB_COMPOSE,
    Processes,
    add_load_options,
    admit,
    checked_load_options,
    emit,
    free_port,
    machine_busy_seconds,
    process_cpu_seconds,
    process_rss_mib,
    raise_open_files,
    run_in_scratch,
    simulated_cluster,
)
from rich import box
from rich.console import Console
from rich.table import Table

from teemesh.attest.dstack import compose_hash
from teemesh.attest.simulated import PlatformKey
from teemesh.identity.certs import cert_pem, key_pem
from teemesh.platform.appkeys import keys_from_seed

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
progress = Console(stderr=True, highlight=False)
"""Progress and waits: on stderr, so that --json keeps stdout to the document."""
LOOPBACK = "127.0.0.1"
VIP_BASE = "127.79.0."
"""The egress sidecar's route VIPs (out of 127.77/16 and the tests' 127.78/16)."""
CHUNK = 1 << 20
PATHS = ("raw", "haproxy", "sidecar")
NO_REUSE = "haproxy-noreuse"
"""HAProxy with ``no-ssl-reuse`` (a full handshake per connection): new connections only."""
ROUTES = ("echo", "sink")
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK-JSON {\\"requests\\":%.0f,\\"duration_us\\":%.0f,\\"p50_us\\":%.0f,\\"p99_us\\":%.0f," ..
    "\\"max_us\\":%.0f,\\"connect\\":%.0f,\\"read\\":%.0f,\\"write\\":%.0f,\\"status\\":%.0f," ..
    "\\"timeout\\":%.0f}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# ---------------------------------------------------------------------------------------------
# the backends' subprocess: a byte sink and (optionally) a tiny HTTP server, uvloop protocols

HTTP_OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n"
HTTP_OK_CLOSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n"
    b"connection: close\r\n\r\nok\n"
)


class HttpBackend(asyncio.Protocol):
    """Answers every request head with ``200 ok``; ``Connection: close`` closes after it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer, replies = self.buffer + data, list[bytes]()
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head, buffer = buffer[:end], buffer[end + 4 :]
            if b"connection: close" in head.lower():
                self.transport.write(b"".join(replies) + HTTP_OK_CLOSE)  # type: ignore[attr-defined]
                self.transport.close()
                return
            replies.append(HTTP_OK)
        if replies:
            self.transport.write(b"".join(replies))  # type: ignore[attr-defined]
        self.buffer = buffer


class Sink(asyncio.Protocol):
    """Counts what it receives; after the client's half-close, answers the count and closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(b"%d\n" % self.count)  # type: ignore[attr-defined]
        self.transport.close()
        return True


def serve_backends(http_port: int, sink_port: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        servers = [await loop.create_server(Sink, LOOPBACK, sink_port, backlog=1024)]
        if http_port:
            servers.append(await loop.create_server(HttpBackend, LOOPBACK, http_port, backlog=4096))
        await stop.wait()
        for server in servers:
            server.close()

    uvloop.run(main())


# ---------------------------------------------------------------------------------------------
# setup: certificates, HAProxy configurations, sidecar configurations


def port_open(host: str, port: int) -> Callable[[], bool]:
    def ready() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return True
        return False

    return ready


@dataclass
class Target:
    """Where the client dials for one path, and the proxy processes it measures."""

    path: str
    http: tuple[str, int]
    sink: tuple[str, int]
    proxies: dict[str, int] = field(default_factory=dict)
    """label -> pid (client side first)"""


class Measured(Protocol):
    """What ``measured`` needs of a path: its name and the proxy processes to account for."""

    path: str
    proxies: dict[str, int]


def haproxy_global(maxconn: int) -> str:
    return (
        "global\n    nbthread 1\n"
        f"    maxconn {maxconn}\n"
        "defaults\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
    )


def haproxy_http_backend(port: int, maxconn: int) -> str:
    return haproxy_global(maxconn) + (
        "    mode http\n    option http-keep-alive\n    timeout http-keep-alive 60s\n"
        f"frontend web\n    bind {LOOPBACK}:{port}\n"
        '    http-request return status 200 content-type text/plain string "ok\\n"\n'
    )


def haproxy_tls(folder: Path) -> str:
    return f"ca-file {folder / 'ca.pem'} verify required ssl-min-ver TLSv1.3"


def haproxy_client_side(
    folder: Path, front: dict[str, int], back: dict[str, int], *, maxconn: int, reuse: bool
) -> str:
    """Plain TCP in, mTLS out with the client SVID; ``reuse``: TLS session resumption (the
    default of HAProxy's server lines), else ``no-ssl-reuse``: a full handshake every time."""
    out = haproxy_global(maxconn) + "    mode tcp\n"
    for name in ROUTES:
        out += (
            f"frontend {name}_in\n    bind {LOOPBACK}:{front[name]}\n"
            f"    default_backend {name}_out\n"
            f"backend {name}_out\n    server peer {LOOPBACK}:{back[name]} "
            f"ssl crt {folder / 'client.pem'} {haproxy_tls(folder)}"
            f"{'' if reuse else ' no-ssl-reuse'}\n"
        )
    return out


def haproxy_server_side(
    folder: Path, back: dict[str, int], app: dict[str, int], *, maxconn: int
) -> str:
    """mTLS in (the client's chain must lead to the mesh CA), plain TCP to the backend."""
    out = haproxy_global(maxconn) + "    mode tcp\n"
    for name in ROUTES:
        out += (
            f"frontend {name}_in\n    bind {LOOPBACK}:{back[name]} "
            f"ssl crt {folder / 'server.pem'} {haproxy_tls(folder)}\n"
            f"    default_backend {name}_app\n"
            f"backend {name}_app\n    server app {LOOPBACK}:{app[name]}\n"
        )
    return out


def write_svid_pems(folder: Path, url: str, platform: PlatformKey) -> None:
    """HAProxy's certificates: real SVIDs from the coordinator, so the same CA and key type as
    the sidecars'; cert + key in one PEM as HAProxy wants them."""
    for name in ("client", "server"):
        svid = admit(url, platform, f"haproxy-{name}")
        path = folder / f"{name}.pem"
        path.touch(mode=0o600)
        path.write_text(cert_pem(svid.certificate) + key_pem(svid.key))
        (folder / "ca.pem").write_text(cert_pem(svid.ca_certificate))


def kms_appkeys(path: Path) -> None:
    """An appkeys.json whose key provider is a KMS (the bench group's policy wants one)."""
    keys = keys_from_seed()
    doc = {
        "disk_crypt_key": keys.disk_crypt_key.hex(), "env_crypt_key": secrets.token_hex(32),
        "k256_key": keys.k256_key.hex(), "k256_signature": secrets.token_hex(65),
        "gateway_app_id": "any", "ca_cert": cert_pem(keys.ca_cert),
        "key_provider": {"Kms": {"key": key_pem(keys.ca_key)}},
    }  # fmt: skip
    path.touch(mode=0o600)
    path.write_text(json.dumps(doc))


def sidecar_config(
    folder: Path, name: str, coordinator: str, *, backends: dict[str, Any],
    routes: dict[str, Any],
) -> tuple[Path, str]:  # fmt: skip
    api = f"{LOOPBACK}:{free_port()}"
    config = {
        "cluster": "bench", "group": GROUP, "peer_id": name, "coordinators": [coordinator],
        "coordinator_policy": {
            "tee": "simulated", "platform_key": "platform.pub",
            "compose_hashes": [compose_hash(COORDINATOR_COMPOSE).hex()],
        },
        "address": LOOPBACK, "ingress": f"{LOOPBACK}:{free_port()}", "api": api,
        "backends": backends, "routes": routes,
    }  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, api


def http_get(url: str, timeout: float = 2) -> bytes:
    """GET from a sidecar's local API (plain HTTP on loopback)."""
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 (http: only)
        return bytes(reply.read())


def http_json(url: str) -> Any:
    return json.loads(http_get(url))


def api_healthy(api: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            return bool(http_json(f"http://{api}/health").get("ready"))
        except (OSError, ValueError):
            return False

    return ready


def start_sidecars(
    procs: Processes, folder: Path, coordinator: str, app: dict[str, int]
) -> tuple[Target, dict[str, str]]:
    """An ingress sidecar serving the backends, an egress one routing to them; each with its
    own simulated guest agent. Returns the target and each sidecar's API address."""
    (folder / "web-compose.json").write_bytes(WEB_COMPOSE)
    pids, apis = {}, {}
    vips = {name: f"{VIP_BASE}{10 + n}" for n, name in enumerate(ROUTES)}
    for name in ("ingress", "egress"):
        sock = folder / f"{name}-agent.sock"
        agent_args = [
            "agent", "--socket", str(sock), "--state", str(folder / f"{name}-agent"),
            "--platform-key", str(folder / "platform.key"),
            "--app-compose", str(folder / "web-compose.json"), "--os-image", OS_IMAGE,
            "--app-keys", str(folder / f"{name}-appkeys.json"),
        ]  # fmt: skip
        kms_appkeys(folder / f"{name}-appkeys.json")
        procs.start(f"{name} agent", agent_args, folder / f"{name}-agent.log", sock.exists)
        if name == "ingress":
            backends = {r: {"port": app[r]} for r in ROUTES}
            routes: dict[str, Any] = {}
        else:
            backends = {}
            routes = {r: {"backend": r, "port": app[r], "vip": vips[r]} for r in ROUTES}
        path, api = sidecar_config(
            folder, f"{name}-0", coordinator, backends=backends, routes=routes
        )
        args = ["sidecar", "run", "--config", str(path), "--agent", str(sock),
                "--state", str(folder / f"{name}-sidecar")]  # fmt: skip
        pids[name] = procs.start(
            f"{name} sidecar", args, folder / f"{name}-sidecar.log", api_healthy(api)
        )
        apis[name] = api

    def routed() -> bool:
        status = http_json(f"http://{apis['egress']}/v1/status")
        return all(route["instances"] == ["ingress-0"] for route in status["routes"])

    deadline = time.monotonic() + 30
    while not routed():
        if time.monotonic() > deadline:
            raise SystemExit("the egress sidecar never saw the ingress sidecar's backends")
        time.sleep(0.1)
    target = Target(
        "sidecar",
        (vips["echo"], app["echo"]),
        (vips["sink"], app["sink"]),
        {"egress": pids["egress"], "ingress": pids["ingress"]},
    )
    return target, apis


# ---------------------------------------------------------------------------------------------
# measuring


def foreign_cpu(ours: set[int]) -> dict[int, tuple[str, float]]:
    """CPU seconds of every process that is neither ours nor a child of this one (wrk)."""
    out = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[1]) == me:
            continue
        ticks = int(fields[11]) + int(fields[12])
        out[int(entry.name)] = (name, ticks / os.sysconf("SC_CLK_TCK"))
    return out


def busiest_foreign(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], elapsed: float
) -> list[str]:
    """The other processes that used at least 5% of a core meanwhile, busiest first."""
    used = [
        (cpu - before.get(pid, (name, 0.0))[1], name, pid) for pid, (name, cpu) in after.items()
    ]
    return [
        f"{name} (pid {pid}) {100 * spent / elapsed:.0f}%"
        for spent, name, pid in sorted(used, reverse=True)[:3]
        if spent / elapsed >= 0.05
    ]


def wait_quiet(ours: set[int], limit: float) -> float:
    """Wait (up to ``limit`` s) until other processes use under 20% of a core; seconds waited."""
    began = time.monotonic()
    while True:
        before = foreign_cpu(ours)
        time.sleep(0.5)
        after = foreign_cpu(ours)
        foreign = sum(cpu - before.get(pid, ("", 0.0))[1] for pid, (_, cpu) in after.items())
        waited = time.monotonic() - began
        if foreign < 0.1 or waited >= limit:
            return round(waited, 1)
        if waited < 1:
            progress.print(f"[yellow]waiting for other processes to quieten: "
                          f"{', '.join(busiest_foreign(before, after, 0.5))}[/yellow]")  # fmt: skip
        time.sleep(1)


class Watch:
    """CPU of the proxies across a block, and their peak RSS sampled every 0.1 s; and where the
    rest of the machine's CPU went: the load client (wrk, or this process's writer), the
    backends, the other processes of the bench, and anything else ("other")."""

    def __init__(self, pids: dict[str, int], backends: dict[str, int], idle: list[int]) -> None:
        self.pids = pids
        self.backends = sorted(set(backends.values()))
        self.idle = sorted(set(idle) - set(pids.values()) - set(self.backends))
        self.cpu: dict[str, float] = {}
        self.rss: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            for label, pid in self.pids.items():
                with contextlib.suppress(OSError):
                    self.rss[label] = max(self.rss[label], process_rss_mib(pid))

    def _client(self) -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return children.ru_utime + children.ru_stime + time.process_time()

    def _sum(self, pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            with contextlib.suppress(OSError):
                total += process_cpu_seconds(pid)
        return total

    def __enter__(self) -> Watch:
        self.cpu = {label: process_cpu_seconds(pid) for label, pid in self.pids.items()}
        self.client, self.backend = self._client(), self._sum(self.backends)
        self.services = self._sum(self.idle)
        self.ours = {os.getpid(), *self.pids.values(), *self.backends, *self.idle}
        self.foreign = foreign_cpu(self.ours)
        self.busy = machine_busy_seconds()
        self.began = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.began
        self.busy = machine_busy_seconds() - self.busy
        self.foreign_top = busiest_foreign(self.foreign, foreign_cpu(self.ours), self.elapsed)
        self.cpu = {
            label: process_cpu_seconds(pid) - self.cpu[label] for label, pid in self.pids.items()
        }
        self.client = self._client() - self.client
        self.backend = self._sum(self.backends) - self.backend
        self.services = self._sum(self.idle) - self.services
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        proxies = sum(self.cpu.values())
        other = self.busy - proxies - self.client - self.backend - self.services
        shares = {"proxies": proxies, "client": self.client, "backends": self.backend,
                  "idle services": self.services, "other": max(0.0, other)}  # fmt: skip
        return {
            "proxy_cpu_seconds": {k: round(v, 3) for k, v in self.cpu.items()},
            "proxy_rss_peak_mib": {k: round(v, 1) for k, v in self.rss.items()},
            "machine_cpu_percent": round(100 * self.busy / self.elapsed, 1),
            "cpu_percent": {k: round(100 * v / self.elapsed, 1) for k, v in shares.items()},
            "other_processes": self.foreign_top,
        }


@dataclass
class Profiler:
    """py-spy record on the sidecars during their measured phases (``--profile``)."""

    py_spy: str | None
    folder: Path | None
    native: bool = False
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    @contextlib.contextmanager
    def record(self, phase: str, target: Measured, seconds: int) -> Iterator[None]:
        if self.py_spy is None or self.folder is None or target.path != "sidecar":
            yield
            return
        started = []
        for label, pid in target.proxies.items():
            out = self.folder / f"{phase}-{label}.txt"
            argv = [self.py_spy, "record", "--pid", str(pid), "--duration", str(seconds),
                    "--rate", "200", "--format", "raw", "--output", str(out),
                    # --native needs to stop the process for each sample
                    *(["--native"] if self.native else ["--nonblocking"])]  # fmt: skip
            log = (self.folder / f"{phase}-{label}.log").open("wb")
            started.append((subprocess.Popen(argv, stdout=log, stderr=log), out, log))
        try:
            yield
        finally:
            for proc, out, log in started:
                try:
                    proc.wait(seconds + 20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()
                if out.exists():
                    self.outputs.append(out)


def bulk(target: Target, seconds: float) -> dict[str, Any]:
    """One connection writes 1 MiB chunks for ``seconds``, half-closes, reads the sink's count."""
    payload = memoryview(bytearray(CHUNK))
    sent = 0
    with socket.create_connection(target.sink, timeout=30) as sock:
        began = time.perf_counter()
        deadline = began + seconds
        while time.perf_counter() < deadline:
            sock.sendall(payload)
            sent += CHUNK
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(64):
            reply += chunk
        elapsed = time.perf_counter() - began
    counted = int(reply) if reply.strip().isdigit() else -1
    return {
        "bytes": sent,
        "seconds": round(elapsed, 3),
        "mb_per_s": round(sent / elapsed / 1e6, 1),
        "errors": 0 if counted == sent else 1,
        "error_kinds": {} if counted == sent else {f"sink counted {counted} of {sent}": 1},
    }


def wrk(
    wrk_exe: str, script: Path, url: str, *, seconds: int, connections: int,
    threads: int, close: bool,
) -> dict[str, Any]:  # fmt: skip
    """wrk on ``url`` with the report script: requests, rate, latency, errors by kind."""
    argv = [wrk_exe, "-t", str(min(threads, connections)), "-c", str(connections),
            "-d", f"{seconds}s", "--timeout", "10s", "-s", str(script)]  # fmt: skip
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK-JSON ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    doc = json.loads(line.removeprefix("WRK-JSON "))
    kinds = {k: int(doc[k]) for k in ("connect", "read", "write", "status", "timeout") if doc[k]}
    requests, elapsed = int(doc["requests"]), doc["duration_us"] / 1e6
    return {
        "requests": requests,
        "seconds": round(elapsed, 3),
        "per_second": round(requests / elapsed, 1),
        "p50_ms": round(doc["p50_us"] / 1e3, 3),
        "p99_ms": round(doc["p99_us"] / 1e3, 3),
        "max_ms": round(doc["max_us"] / 1e3, 3),
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
    }


@dataclass
class Bench:
    """What every measurement needs: options, the wrk script, the processes to account for."""

    opts: Any
    """This bench's ``Options``, or another bench's with ``seconds``, ``repeat``, ``quiet_wait``"""
    script: Path
    backends: dict[str, int]
    services: list[int]
    profiler: Profiler


def measured(
    bench: Bench, run: Callable[[], dict[str, Any]], target: Measured, phase: str,
    warmup: Callable[[], Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``--repeat`` times: wait for a quiet machine, warm up, ``run`` with the CPU and RSS
    watched. Keeps the repetition that other processes disturbed least."""
    ours = {os.getpid(), *target.proxies.values(), *bench.backends.values(), *bench.services}
    tries = []
    for n in range(bench.opts.repeat):
        waited = wait_quiet(ours, bench.opts.quiet_wait) if bench.opts.quiet_wait else 0.0
        if warmup is not None:
            warmup()
        watch = Watch(target.proxies, bench.backends, bench.services)
        profiling = bench.profiler.record(phase, target, bench.opts.seconds) if n == 0 else None
        with profiling or contextlib.nullcontext(), watch:
            result = run()
        tries.append((watch, result | watch.summary() | {"waited_for_quiet_s": waited}))
    watch, result = min(tries, key=lambda t: t[1]["cpu_percent"]["other"])
    result["repetitions_other_cpu_percent"] = [t[1]["cpu_percent"]["other"] for t in tries]
    cpu = sum(watch.cpu.values())
    if target.proxies and result.get("requests"):
        result["proxy_cpu_us_per_request"] = round(1e6 * cpu / result["requests"], 1)
    if target.proxies and result.get("bytes"):
        result["proxy_cpu_s_per_gb"] = round(cpu / (result["bytes"] / 1e9), 3)
    return result


def idle_rss(targets: list[Target]) -> dict[str, dict[str, float]]:
    return {
        t.path: {label: round(process_rss_mib(pid), 1) for label, pid in t.proxies.items()}
        for t in targets
    }


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Options:
    seconds: int
    warmup: int
    connections: int
    threads: int
    http_backend: str
    wrk: str
    haproxy: str
    profile: Path | None
    py_spy: str | None
    quiet_wait: float
    repeat: int
    native: bool
    logs: Path | None


def run_bench(opts: Options, tmp: Path) -> dict[str, Any]:
    raise_open_files(65536)
    maxconn = 4 * opts.connections + 1000
    platform = PlatformKey.generate()
    procs = Processes()
    profiler = Profiler(opts.py_spy, opts.profile, opts.native)
    app = {name: free_port() for name in ROUTES}
    front = {name: free_port() for name in ROUTES}
    back = {name: free_port() for name in ROUTES}
    front2 = {name: free_port() for name in ROUTES}
    progress.print("[dim]starting the coordinator, agents, sidecars, HAProxies, backends...[/dim]")
    cluster = simulated_cluster(tmp, platform, group_lines=["services: [echo, sink]"])
    with cluster as (port, coordinator_pid):
        try:
            url = f"https://{LOOPBACK}:{port}"
            backend_pids: dict[str, int] = {}
            if opts.http_backend == "haproxy":
                (tmp / "http-backend.cfg").write_text(haproxy_http_backend(app["echo"], maxconn))
                backend_pids["http"] = procs.start_command(
                    "haproxy http backend",
                    [opts.haproxy, "-db", "-f", str(tmp / "http-backend.cfg")],
                    tmp / "http-backend.log", port_open(LOOPBACK, app["echo"]),
                )  # fmt: skip
            serve_http = app["echo"] if opts.http_backend == "python" else 0
            backend_pids["sink"] = procs.start_command(
                "backends",
                [sys.executable, __file__, "--backend-process", str(serve_http), str(app["sink"])],
                tmp / "backends.log", port_open(LOOPBACK, app["sink"]),
            )  # fmt: skip
            if serve_http:
                backend_pids["http"] = backend_pids["sink"]
            write_svid_pems(tmp, url, platform)
            configs = (
                ("server", haproxy_server_side(tmp, back, app, maxconn=maxconn), back),
                ("client", haproxy_client_side(tmp, front, back, maxconn=maxconn, reuse=True),
                 front),
                ("client-noreuse",
                 haproxy_client_side(tmp, front2, back, maxconn=maxconn, reuse=False), front2),
            )  # fmt: skip
            haproxies = {}
            for label, cfg, ports in configs:
                (tmp / f"haproxy-{label}.cfg").write_text(cfg)
                haproxies[label] = procs.start_command(
                    f"haproxy {label}",
                    [opts.haproxy, "-db", "-f", str(tmp / f"haproxy-{label}.cfg")],
                    tmp / f"haproxy-{label}.log", port_open(LOOPBACK, ports["echo"]),
                )  # fmt: skip
            sidecar, apis = start_sidecars(procs, tmp, url, app)
            targets = [
                Target("raw", (LOOPBACK, app["echo"]), (LOOPBACK, app["sink"])),
                Target("haproxy", (LOOPBACK, front["echo"]), (LOOPBACK, front["sink"]),
                       {"client side": haproxies["client"], "server side": haproxies["server"]}),
                sidecar,
                Target(NO_REUSE, (LOOPBACK, front2["echo"]), (LOOPBACK, front2["sink"]),
                       {"client side": haproxies["client-noreuse"],
                        "server side": haproxies["server"]}),
            ]  # fmt: skip
            (tmp / "report.lua").write_text(WRK_SCRIPT)
            services = [coordinator_pid, *(proc.pid for _, proc, _ in procs.started)]
            bench = Bench(opts, tmp / "report.lua", backend_pids, services, profiler)
            return measure_all(bench, targets) | {
                "sidecar_metrics": sidecar_metrics(apis),
                "logs": check_logs(tmp),
            }
        finally:
            procs.stop()
            if opts.logs is not None:
                opts.logs.mkdir(parents=True, exist_ok=True)
                for log in tmp.glob("*.log"):
                    shutil.copy(log, opts.logs / log.name)


def measure_all(bench: Bench, targets: list[Target]) -> dict[str, Any]:
    """Each workload on each path in turn (new connections also through HAProxy without TLS
    session resumption)."""
    opts = bench.opts
    results: dict[str, dict[str, Any]] = {t.path: {} for t in targets}
    rss_idle = idle_rss([t for t in targets if t.path in PATHS])

    def load(target: Target, seconds: int, close: bool) -> dict[str, Any]:
        host, port = target.http
        return wrk(opts.wrk, bench.script, f"http://{host}:{port}/", seconds=seconds,
                   connections=opts.connections, threads=opts.threads, close=close)  # fmt: skip

    main = [t for t in targets if t.path in PATHS]
    for target in main:
        progress.print(f"[dim]bulk, {target.path}...[/dim]")
        results[target.path]["bulk"] = measured(
            bench, functools.partial(bulk, target, opts.seconds), target, "bulk"
        )
    for phase, close in (("keepalive", False), ("newconn", True)):
        for target in targets if close else main:
            progress.print(f"[dim]{phase}, {target.path}...[/dim]")
            warmup = functools.partial(load, target, opts.warmup, close) if opts.warmup else None
            results[target.path][phase] = measured(
                bench, functools.partial(load, target, opts.seconds, close), target, phase, warmup
            )
    time.sleep(1)  # let the last connections close
    return {
        "paths": results,
        "rss_idle_mib": rss_idle,
        "rss_end_mib": idle_rss(main),
        "profiles": [str(p) for p in bench.profiler.outputs],
    }


def sidecar_metrics(apis: dict[str, str]) -> dict[str, dict[str, float]]:
    """The sidecars' own counters after the run (handshakes, refusals, failures)."""
    out: dict[str, dict[str, float]] = {}
    for name, api in apis.items():
        text = http_get(f"http://{api}/metrics", timeout=5).decode()
        wanted = ("teemesh_tls_handshakes_total", "teemesh_refusals_total",
                  "teemesh_upstream_connect_failures_total", "teemesh_connections_cut_total",
                  "teemesh_active_connections")  # fmt: skip
        out[name] = {
            key: float(value)
            for key, _, value in (line.rpartition(" ") for line in text.splitlines())
            if key.startswith(wanted)
        }
    return out


def check_logs(tmp: Path) -> dict[str, list[str]]:
    """Warnings and errors the proxies wrote during the run (up to 20 lines each)."""
    found: dict[str, list[str]] = {}
    for log in sorted(tmp.glob("*sidecar.log")) + sorted(tmp.glob("haproxy-*.log")):
        lines = [
            line for line in log.read_text(errors="replace").splitlines()
            if any(w in line.lower() for w in ("warn", "error", "alert", "traceback"))
        ]  # fmt: skip
        if len(lines) > 20:
            lines = [*lines[:20], f"... {len(lines) - 20} more"]
        if lines:
            found[log.name] = lines
    return found


# ---------------------------------------------------------------------------------------------
# profiles: the top frames in teemesh's code


def profile_summary(files: list[Path], top: int = 12) -> list[tuple[str, list[str]]]:
    """For each py-spy raw file: the frames with the most samples on the stack (inclusive) and
    on top (self), teemesh's own, uvloop and ssl frames."""
    out = []
    for path in files:
        inclusive: Counter[str] = Counter()
        own: Counter[str] = Counter()
        total = 0
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]
            for frame in set(frames):
                inclusive[frame] += n
            own[frames[-1]] += n
        if not total:
            continue

        def ours(frame: str) -> bool:
            return "teemesh/" in frame or "uvloop" in frame or "ssl.py" in frame

        lines = [f"{total} samples (CPU only, {path.stem})", "  self:"]
        lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
        lines.append("  inclusive, teemesh/uvloop/ssl frames:")
        lines += [
            f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common() if ours(f)
        ][:top]
        out.append((path.stem, lines))
    return out


# ---------------------------------------------------------------------------------------------
# output


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


ROWS: tuple[tuple[str, str, str, str, int], ...] = (
    # label, workload, key, better (up/down), digits
    ("bulk MB/s (1 connection)", "bulk", "mb_per_s", "up", 0),
    ("bulk: proxies' CPU s per GB", "bulk", "proxy_cpu_s_per_gb", "down", 2),
    ("keep-alive req/s", "keepalive", "per_second", "up", 0),
    ("keep-alive p50 ms", "keepalive", "p50_ms", "down", 2),
    ("keep-alive p99 ms", "keepalive", "p99_ms", "down", 2),
    ("keep-alive: proxies' CPU us/req", "keepalive", "proxy_cpu_us_per_request", "down", 1),
    ("new connections/s", "newconn", "per_second", "up", 0),
    ("new conn p50 ms", "newconn", "p50_ms", "down", 2),
    ("new conn p99 ms", "newconn", "p99_ms", "down", 2),
    ("new conn: proxies' CPU ms/conn", "newconn", "proxy_cpu_us_per_request", "down", 3),
)


def print_report(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    opts = doc["options"]
    table = Table(
        title=f"Data plane on {doc['cpus']} CPUs, loopback: raw TCP, HAProxy mTLS pair, "
        "teemesh sidecar pair",
        caption=f"{opts['seconds']} s per measurement, {opts['connections']} connections "
        f"(wrk, {opts['threads']} thread), HTTP backend: {opts['http_backend']}",
        caption_justify="left",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("metric")
    for name in ("", "raw TCP", "HAProxy", "sidecar", "sidecar/\nHAProxy", "sidecar/\nraw"):
        table.add_column(name, justify="right")

    def value(path: str, workload: str, key: str) -> float | None:
        got = paths[path][workload].get(key)
        if got is None:
            return None
        if key == "proxy_cpu_us_per_request" and workload == "newconn":
            return float(got) / 1e3
        return float(got)

    for label, workload, key, better, digits in ROWS:
        raw, ha, sc = (value(p, workload, key) for p in PATHS)
        table.add_row(
            label, "↑" if better == "up" else "↓", _num(raw, digits), _num(ha, digits),
            _num(sc, digits), _ratio(sc, ha), _ratio(sc, raw),
        )  # fmt: skip
    noreuse = paths[NO_REUSE]["newconn"]
    for label, key, scale, digits in (
        ("new conns/s, HAProxy w/o resumption", "per_second", 1, 0),
        ("new conn p99 ms, w/o resumption", "p99_ms", 1, 2),
        ("new conn CPU ms/conn, w/o resumption", "proxy_cpu_us_per_request", 1e3, 3),
    ):
        ha = noreuse.get(key)
        sc = paths["sidecar"]["newconn"].get(key)
        ha, sc = (None if v is None else v / scale for v in (ha, sc))
        table.add_row(label, "↑" if key == "per_second" else "↓", "-", _num(ha, digits),
                      _num(sc, digits), _ratio(sc, ha), "-")  # fmt: skip
    rss, end = doc["rss_idle_mib"], doc["rss_end_mib"]
    for label, pick in (
        ("proxies' RSS idle MiB (pair)", lambda p: sum(rss[p].values()) if rss[p] else None),
        ("proxies' RSS peak MiB (pair)", lambda p: peak_rss(paths[p]) if rss[p] else None),
        ("proxies' RSS after the run MiB", lambda p: sum(end[p].values()) if end[p] else None),
    ):
        ha, sc = pick("haproxy"), pick("sidecar")
        table.add_row(label, "↓", "-", _num(ha, 1), _num(sc, 1), _ratio(sc, ha), "-")
    errors = {p: sum(w.get("errors", 0) for w in paths[p].values()) for p in PATHS}
    table.add_row("errors (all workloads)", "", *(str(errors[p]) for p in PATHS), "", "")
    console.print(table)
    print_details(doc)


def print_details(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    for path in paths:
        for workload, got in paths[path].items():
            for kind, count in got.get("error_kinds", {}).items():
                console.print(f"  {path} {workload}: {count} x {kind}")
    cpu = Table(
        title="Where the CPU went, % of one core (proxies: client side + server side)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    cpu.add_column("path")
    cpu.add_column("workload")
    for name in ("proxies", "split", "client", "backends", "idle\nservices", "other", "machine"):
        cpu.add_column(name, justify="right")
    for path, workloads in paths.items():
        for workload, got in workloads.items():
            share, seconds = got["cpu_percent"], got["seconds"]
            split = " + ".join(
                f"{100 * v / seconds:.0f}" for v in got["proxy_cpu_seconds"].values()
            )
            cpu.add_row(
                path, workload, f"{share['proxies']:.0f}", split or "-",
                f"{share['client']:.0f}", f"{share['backends']:.0f}",
                f"{share['idle services']:.0f}", f"{share['other']:.0f}",
                f"{got['machine_cpu_percent']:.0f}",
            )  # fmt: skip
    console.print(cpu)
    print_disturbed(paths)
    print_rss(doc)
    for name, counters in doc["sidecar_metrics"].items():
        shown = ", ".join(f"{k.removeprefix('teemesh_')} {v:.0f}" for k, v in counters.items())
        console.print(f"Sidecar {name} counters: {shown}")
    for note in doc["notes"]:
        console.print(f"- {note}")
    for name, lines in doc["logs"].items():
        console.print(f"[yellow]{name}[/yellow]: {len(lines)} warning/error lines, first:")
        for line in lines[:5]:
            console.print(f"    {line[:300]}")
    for name, lines in doc.get("profile_summary", []):
        console.print(f"\n[bold]py-spy {name}[/bold]")
        for line in lines:
            console.print(line)


def print_rss(doc: dict[str, Any]) -> None:
    paths, rss = doc["paths"], doc["rss_idle_mib"]
    for path in ("haproxy", "sidecar"):
        peaks = "; ".join(
            f"{w} " + ", ".join(f"{k} {v}" for k, v in got["proxy_rss_peak_mib"].items())
            for w, got in paths[path].items()
        )
        idle = ", ".join(f"{k} {v}" for k, v in rss[path].items())
        after = ", ".join(f"{k} {v}" for k, v in doc["rss_end_mib"][path].items())
        console.print(f"{path} RSS MiB: idle {idle}; peak in {peaks}; after the run {after}")


def print_disturbed(paths: dict[str, Any]) -> None:
    for path, workloads in paths.items():
        for workload, got in workloads.items():
            other = got["cpu_percent"]["other"]
            if other >= 20:
                busiest = ", ".join(got["other_processes"]) or "kernel (softirq), short-lived"
                console.print(f"[yellow]{path} {workload}: {other:.0f}% of a core went to "
                              f"other processes: {busiest}[/yellow]")  # fmt: skip


def peak_rss(path_results: dict[str, Any]) -> float:
    return float(max(sum(w["proxy_rss_peak_mib"].values()) for w in path_results.values()))


def handshakes(doc: dict[str, Any]) -> str:
    """The egress sidecar's teemesh_tls_handshakes_total, by result."""
    counts = {
        key.rpartition('result="')[2].rstrip('"}'): value
        for key, value in doc["sidecar_metrics"].get("egress", {}).items()
        if key.startswith("teemesh_tls_handshakes_total")
    }
    return ", ".join(f"{n:.0f} {result}" for result, n in counts.items()) or "not counted"


def notes(doc: dict[str, Any]) -> list[str]:
    paths = doc["paths"]
    raw_ka, raw_nc = paths["raw"]["keepalive"], paths["raw"]["newconn"]
    highest = max(
        paths[p][w]["per_second"] / paths["raw"][w]["per_second"]
        for p in ("haproxy", "sidecar")
        for w in ("keepalive", "newconn")
    )
    verdict = (
        f"the proxied paths reach at most {100 * highest:.0f}% of it, so the load client is "
        "not what limits them"
        if highest < 0.6
        else f"a proxied path reaches {100 * highest:.0f}% of it: the client may be a limit"
    )
    out = [
        f"Client ceiling: raw TCP is wrk + the backend alone ({raw_ka['per_second']:,.0f} "
        f"keep-alive req/s, {raw_nc['per_second']:,.0f} new conns/s, one Python writer at "
        f"{paths['raw']['bulk']['mb_per_s']:,.0f} MB/s); {verdict}. All processes share the "
        f"machine's {doc['cpus']} cores.",
        "wrk's measured time includes opening its connections: for the keep-alive runs that is "
        f"{doc['options']['connections']} mTLS handshakes per run through each proxy pair.",
        "HAProxy resumes TLS sessions towards its server side by default; the 'w/o resumption' "
        "rows go through a HAProxy client side with no-ssl-reuse (same server side). "
        f"The egress sidecar's handshakes over the whole run: {handshakes(doc)}. HAProxy "
        "checks the peer's chain only; the sidecar also reads the SVID, checks the peer's "
        "identity and revocations.",
    ]
    if doc["options"]["profile"]:
        out.append("py-spy sampled the sidecars during their measurements: their numbers in "
                   "this run are disturbed.")  # fmt: skip
    return out


def parse_args() -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_options(parser, seconds=(5, 2))
    parser.add_argument("--http-backend", choices=("haproxy", "python"), default="haproxy")
    parser.add_argument("--profile", type=Path, help="py-spy the sidecars into this folder")
    parser.add_argument("--py-spy", help="the py-spy command (default: on PATH)")
    parser.add_argument(
        "--native", action="store_true", help="py-spy --native: C frames too (OpenSSL, uvloop)"
    )
    parser.add_argument(
        "--quiet-wait", type=float,
        help="before each measurement, wait up to this long for other processes to use under "
        "20%% of a core (60; 0: never wait)",
    )  # fmt: skip
    args = parser.parse_args()
    found = checked_load_options(parser, args, seconds=(5, 2), quiet_wait=(60, 60))
    py_spy = None
    if args.profile:
        py_spy = args.py_spy or shutil.which("py-spy")
        if py_spy is None:
            parser.error("--profile needs py-spy (pip install py-spy; --py-spy PATH)")
        args.profile.mkdir(parents=True, exist_ok=True)
    opts = Options(
        seconds=args.seconds, warmup=args.warmup, connections=args.connections,
        threads=args.threads, http_backend=args.http_backend,
        wrk=str(found["wrk"]), haproxy=str(found["haproxy"]), profile=args.profile,
        py_spy=py_spy, quiet_wait=args.quiet_wait, repeat=args.repeat, native=args.native,
        logs=args.logs,
    )  # fmt: skip
    return args, opts


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--backend-process":
        serve_backends(int(sys.argv[2]), int(sys.argv[3]))
        return
    args, opts = parse_args()
    doc = run_in_scratch("teemesh-sidecar-bench-", opts, run_bench)
    doc["notes"] = notes(doc)
    if opts.profile:
        doc["profile_summary"] = profile_summary([Path(p) for p in doc["profiles"]])
    emit(args, doc, print_report)


if __name__ == "__main__":
    main()
