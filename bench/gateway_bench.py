"""Gateway TLS termination beside HAProxy: requests/s and new TLS connections/s, in one run.

    .venv/bin/python bench/gateway_bench.py --quick
    .venv/bin/python bench/gateway_bench.py --seconds 10 --connections 64
    .venv/bin/python bench/gateway_bench.py --quick --json

Printed, never asserted (not part of pytest). Everything runs on loopback in one temporary
folder; both paths end at the same backend (a HAProxy in HTTP mode answering ``200 ok`` itself,
as in sidecar_bench) and present the same wildcard certificate (``local_web_pki``, P-256):

- haproxy: wrk -> HAProxy (``bind ... ssl crt``, ``nbthread 1``, ``mode tcp`` by default,
  ``--haproxy-mode http`` for an HTTP proxy) -> the backend, plain TCP;
- gateway: wrk -> ``teemesh sidecar run`` with a ``gateway`` section (terminates TLS for
  ``<app id>-<port>.teemesh.localhost``) -> mesh mTLS tunnel -> the web group's sidecar ->
  the backend. A real coordinator admits both sidecars (simulated TEE, each with its own
  ``teemesh agent``). This path has one more hop than HAProxy's: the mesh mTLS tunnel and a
  second proxy process, the web sidecar, whose CPU is counted with the gateway's.

wrk sends the app's name as SNI and Host to both: its Lua ``wrk.resolve`` is replaced so that
the name is dialled at 127.0.0.1 (``*.teemesh.localhost`` does not resolve through glibc here;
/etc/hosts is never touched). The gateway refuses any other name, so a request answered
through it proves the SNI.

Workloads: keep-alive (``--connections`` HTTP/1.1 connections kept alive: req/s, p50/p99) and
new connections (``Connection: close``: every request a new TCP connection and a full TLS 1.3
handshake, wrk does not resume sessions). CPU per request: utime+stime of the proxy processes
(from /proc) over the measurement. Needs ``haproxy`` and ``wrk`` (run here by PID, no service).
Reuses sidecar_bench's backend, sidecar configuration, CPU watch and quiet wait.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from _harness import (
    GROUP,
    OS_IMAGE,
    WEB_COMPOSE,
    Processes,
    add_load_options,
    checked_load_options,
    emit,
    free_port,
    raise_open_files,
    run_in_scratch,
    simulated_cluster,
)
from rich import box
from rich.console import Console
from rich.table import Table
from sidecar_bench import (
    WRK_SCRIPT,
    Bench,
    Profiler,
    _num,
    api_healthy,
    haproxy_global,
    haproxy_http_backend,
    kms_appkeys,
    measured,
    port_open,
    sidecar_config,
    sidecar_metrics,
    wrk,
)

from teemesh.attest.dstack import compose_hash, default_app_id
from teemesh.attest.simulated import PlatformKey
from teemesh.identity.certs import local_web_pki

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
progress = Console(stderr=True, highlight=False)
"""Progress and waits: on stderr, so that --json keeps stdout to the document."""
LOOPBACK = "127.0.0.1"
BASE_DOMAIN = "teemesh.localhost"
BACKEND = "site"
APP_ID = default_app_id(compose_hash(WEB_COMPOSE)).hex()
PATHS = ("haproxy", "gateway")
WORKLOADS = ("keepalive", "newconn")
RESOLVE_LUA = """
-- Dial every name at loopback: the URL's host name stays wrk's SNI and Host header.
function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup("127.0.0.1", service)
end
"""


# ---------------------------------------------------------------------------------------------
# setup


@dataclass
class Target:
    """One measured path: the URL wrk dials and the proxy processes whose CPU is counted."""

    path: str
    url: str
    proxies: dict[str, int]
    """label -> pid, the TLS-terminating process first"""


def haproxy_terminator(listen: int, backend: int, pem: Path, *, mode: str, maxconn: int) -> str:
    """TLS in with the wildcard certificate, plain TCP (or HTTP) to the backend."""
    out = haproxy_global(maxconn) + f"    mode {mode}\n"
    if mode == "http":
        out += "    option http-keep-alive\n    timeout http-keep-alive 60s\n"
    return out + (
        f"frontend tls_in\n    bind {LOOPBACK}:{listen} ssl crt {pem}\n"
        "    default_backend app\n"
        f"backend app\n    server app {LOOPBACK}:{backend}\n"
    )


def write_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """The wildcard certificate for ``*.BASE_DOMAIN``: (cert, key, cert+key for HAProxy)."""
    _ca, (cert, key) = local_web_pki([f"*.{BASE_DOMAIN}", BASE_DOMAIN])
    paths = folder / "tls.pem", folder / "tls.key", folder / "haproxy-tls.pem"
    paths[0].write_text(cert)
    for path, text in ((paths[1], key), (paths[2], cert + key)):
        path.touch(mode=0o600)
        path.write_text(text)
    return paths


def start_sidecar(
    procs: Processes, folder: Path, name: str, coordinator: str, *,
    backends: dict[str, Any], gateway: dict[str, Any] | None = None,
) -> tuple[int, str]:  # fmt: skip
    """A sidecar with its own simulated guest agent (the web compose); (pid, API address)."""
    sock = folder / f"{name}-agent.sock"
    kms_appkeys(folder / f"{name}-appkeys.json")
    agent_args = [
        "agent", "--socket", str(sock), "--state", str(folder / f"{name}-agent"),
        "--platform-key", str(folder / "platform.key"),
        "--app-compose", str(folder / "web-compose.json"), "--os-image", OS_IMAGE,
        "--app-keys", str(folder / f"{name}-appkeys.json"),
    ]  # fmt: skip
    procs.start(f"{name} agent", agent_args, folder / f"{name}-agent.log", sock.exists)
    path, api = sidecar_config(folder, name, coordinator, backends=backends, routes={})
    if gateway is not None:  # sidecar_bench's configuration, plus the public listener
        path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"gateway": gateway}))
    args = ["sidecar", "run", "--config", str(path), "--agent", str(sock),
            "--state", str(folder / f"{name}-state")]  # fmt: skip
    pid = procs.start(f"{name} sidecar", args, folder / f"{name}-sidecar.log", api_healthy(api))
    return pid, api


@contextlib.contextmanager
def tls_connection(port: int, name: str) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to 127.0.0.1:``port`` with ``name`` as SNI, as a default OpenSSL client
    makes it, but the certificate unchecked: our own loopback one (only reachability counts)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((LOOPBACK, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        yield tls


def https_get(port: int, name: str) -> bytes:
    """One GET over TLS to 127.0.0.1:``port`` naming ``name`` (SNI and Host); the reply."""
    with tls_connection(port, name) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    return reply


def tls_parameters(port: int, name: str) -> dict[str, Any]:
    """What a default OpenSSL client negotiates with the proxy: version, cipher, key bits."""
    with tls_connection(port, name) as tls:
        cipher, _, bits = tls.cipher() or ("?", "", 0)
        return {"version": tls.version(), "cipher": cipher, "bits": bits}


def answers(port: int, name: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            return https_get(port, name).startswith(b"HTTP/1.1 200")
        except (OSError, ssl.SSLError):
            return False

    return ready


def wait_until(what: str, ready: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# measuring


def measure(bench: Bench, path: Target, close: bool) -> dict[str, Any]:
    """wrk on ``path`` as ``sidecar_bench.measured`` runs it (quiet machine, warm-up, the
    least disturbed of ``--repeat``), plus the TLS terminator's own CPU per request."""
    opts = bench.opts

    def load(seconds: int) -> dict[str, Any]:
        return wrk(opts.wrk, bench.script, path.url, seconds=seconds,
                   connections=opts.connections, threads=opts.threads, close=close)  # fmt: skip

    warmup = functools.partial(load, opts.warmup) if opts.warmup else None
    phase = "newconn" if close else "keepalive"
    result = measured(bench, functools.partial(load, opts.seconds), path, phase, warmup)
    if result["requests"]:
        terminator = result["proxy_cpu_seconds"][next(iter(path.proxies))]
        result["terminator_cpu_us_per_request"] = round(1e6 * terminator / result["requests"], 1)
    return result


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Options:
    seconds: int
    warmup: int
    connections: int
    threads: int
    repeat: int
    quiet_wait: float
    haproxy_mode: str
    wrk: str
    haproxy: str
    logs: Path | None


def run_bench(opts: Options, tmp: Path) -> dict[str, Any]:
    raise_open_files(65536)
    maxconn = 4 * opts.connections + 1000
    platform = PlatformKey.generate()
    procs = Processes()
    app, front, public = free_port(), free_port(), free_port()
    name = f"{APP_ID}-{app}.{BASE_DOMAIN}"
    progress.print("[dim]starting the coordinator, agents, sidecars, HAProxies, backend...[/dim]")
    cluster = simulated_cluster(tmp, platform, group_lines=[f"services: [{BACKEND}]"])
    with cluster as (port, coordinator_pid):
        try:
            url = f"https://{LOOPBACK}:{port}"
            (tmp / "http-backend.cfg").write_text(haproxy_http_backend(app, maxconn))
            backend_pid = procs.start_command(
                "haproxy http backend", [opts.haproxy, "-db", "-f", str(tmp / "http-backend.cfg")],
                tmp / "http-backend.log", port_open(LOOPBACK, app),
            )  # fmt: skip
            cert, key, pem = write_certificate(tmp)
            (tmp / "haproxy-tls.cfg").write_text(
                haproxy_terminator(front, app, pem, mode=opts.haproxy_mode, maxconn=maxconn)
            )
            haproxy_pid = procs.start_command(
                "haproxy tls", [opts.haproxy, "-db", "-f", str(tmp / "haproxy-tls.cfg")],
                tmp / "haproxy-tls.log", port_open(LOOPBACK, front),
            )  # fmt: skip
            (tmp / "web-compose.json").write_bytes(WEB_COMPOSE)
            web_pid, web_api = start_sidecar(
                procs, tmp, "web-0", url, backends={BACKEND: {"port": app}}
            )
            gateway = {
                "base_domain": BASE_DOMAIN, "certificate": str(cert), "key": str(key),
                "listen": f"{LOOPBACK}:{public}",
                "public": [{"group": GROUP, "backend": BACKEND, "port": app}],
            }  # fmt: skip
            gateway_pid, gateway_api = start_sidecar(
                procs, tmp, "gateway-0", url, backends={}, gateway=gateway
            )
            wait_until("the gateway to reach the backend", answers(public, name))
            wait_until("HAProxy to reach the backend", answers(front, name))
            negotiated = {
                "haproxy": tls_parameters(front, name),
                "gateway": tls_parameters(public, name),
            }
            paths = [
                Target("haproxy", f"https://{name}:{front}/", {"haproxy": haproxy_pid}),
                Target("gateway", f"https://{name}:{public}/",
                      {"gateway": gateway_pid, "web sidecar": web_pid}),
            ]  # fmt: skip
            (tmp / "report.lua").write_text(RESOLVE_LUA + WRK_SCRIPT)
            services = [coordinator_pid, *(proc.pid for _, proc, _ in procs.started)]
            bench = Bench(opts, tmp / "report.lua", {"http": backend_pid}, services,
                          Profiler(None, None))  # fmt: skip
            results: dict[str, dict[str, Any]] = {p.path: {} for p in paths}
            for workload in WORKLOADS:
                for path in paths:
                    progress.print(f"[dim]{workload}, {path.path}...[/dim]")
                    results[path.path][workload] = measure(bench, path, workload == "newconn")
            time.sleep(1)  # let the last connections close before reading the counters
            return {
                "server_name": name,
                "tls": negotiated,
                "paths": results,
                "sidecar_metrics": sidecar_metrics({"gateway": gateway_api, "web": web_api}),
                "logs": warnings_in_logs(tmp),
            }
        finally:
            procs.stop()
            if opts.logs is not None:
                opts.logs.mkdir(parents=True, exist_ok=True)
                for log in tmp.glob("*.log"):
                    shutil.copy(log, opts.logs / log.name)


def warnings_in_logs(tmp: Path) -> dict[str, list[str]]:
    """Warnings and errors the proxies logged (up to 20 lines each): the sidecars' JSON lines
    at level warning or above (their info lines, such as a handshake wrk cut at the end of a
    run, are not), HAProxy's ALERT and WARNING lines."""
    found: dict[str, list[str]] = {}
    for log in sorted(tmp.glob("*-sidecar.log")) + sorted(tmp.glob("haproxy-*.log")):
        lines = []
        for line in log.read_text(errors="replace").splitlines():
            try:
                level = str(json.loads(line).get("level", ""))
            except (ValueError, AttributeError):
                loud = any(w in line for w in ("ALERT", "WARNING", "Traceback"))
                level = "warning" if loud else ""
            if level.lower() in ("warning", "error", "critical"):
                lines.append(line)
        if len(lines) > 20:
            lines = [*lines[:20], f"... {len(lines) - 20} more"]
        if lines:
            found[log.name] = lines
    return found


# ---------------------------------------------------------------------------------------------
# output


def _ratio(a: float | None, b: float | None) -> str | None:
    return None if a is None or not b else f"{a / b:.2f}x"


ROWS: tuple[tuple[str, str, str, str, int], ...] = (
    # label, workload, key, better (up/down), digits
    ("keep-alive req/s", "keepalive", "per_second", "up", 0),
    ("keep-alive p50 ms", "keepalive", "p50_ms", "down", 2),
    ("keep-alive p99 ms", "keepalive", "p99_ms", "down", 2),
    ("keep-alive: proxies' CPU us/req", "keepalive", "proxy_cpu_us_per_request", "down", 1),
    ("keep-alive: terminator's CPU us/req", "keepalive", "terminator_cpu_us_per_request",
     "down", 1),
    ("new TLS connections/s", "newconn", "per_second", "up", 0),
    ("new conn p50 ms", "newconn", "p50_ms", "down", 2),
    ("new conn p99 ms", "newconn", "p99_ms", "down", 2),
    ("new conn: proxies' CPU us/conn", "newconn", "proxy_cpu_us_per_request", "down", 0),
    ("new conn: terminator's CPU us/conn", "newconn", "terminator_cpu_us_per_request",
     "down", 0),
)  # fmt: skip


def ratios(paths: dict[str, Any]) -> dict[str, str | None]:
    """gateway / HAProxy for every row."""
    return {
        f"{workload}.{key}": _ratio(
            paths["gateway"][workload].get(key), paths["haproxy"][workload].get(key)
        )
        for _label, workload, key, _better, _digits in ROWS
    }


def print_report(doc: dict[str, Any]) -> None:
    paths, opts = doc["paths"], doc["options"]
    table = Table(
        title=f"TLS termination on {doc['cpus']} CPUs, loopback: HAProxy vs the teemesh gateway",
        caption=f"{opts['seconds']} s per measurement, {opts['connections']} connections (wrk, "
        f"{opts['threads']} thread), SNI {doc['server_name']}",
        caption_justify="left",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("metric")
    for column in ("", "HAProxy", "gateway", "gateway/\nHAProxy"):
        table.add_column(column, justify="right")
    for label, workload, key, better, digits in ROWS:
        ha, gw = (paths[p][workload].get(key) for p in PATHS)
        table.add_row(
            label, "↑" if better == "up" else "↓", _num(ha, digits), _num(gw, digits),
            doc["ratios"][f"{workload}.{key}"] or "-",
        )  # fmt: skip
    errors = {p: sum(w.get("errors", 0) for w in paths[p].values()) for p in PATHS}
    table.add_row("errors (both workloads)", "", str(errors["haproxy"]), str(errors["gateway"]))
    console.print(table)
    print_cpu(paths)
    for name, counters in doc["sidecar_metrics"].items():
        shown = ", ".join(f"{k.removeprefix('teemesh_')} {v:.0f}" for k, v in counters.items())
        console.print(f"Sidecar {name} counters: {shown}")
    for note in doc["notes"]:
        console.print(f"- {note}")
    for name, lines in doc["logs"].items():
        console.print(f"[yellow]{name}[/yellow]: {len(lines)} warning/error lines, first:")
        for line in lines[:5]:
            console.print(f"    {line[:300]}")


def print_cpu(paths: dict[str, Any]) -> None:
    """Where the CPU went in each measurement; errors and disturbances below it."""
    cpu = Table(
        title="Where the CPU went, % of one core", title_justify="left", box=box.SIMPLE_HEAD
    )
    for column in ("path", "workload", "proxies", "split", "client", "backend", "idle\nservices",
                   "other", "machine"):  # fmt: skip
        cpu.add_column(column, justify="left" if column in ("path", "workload") else "right")
    for path, workloads in paths.items():
        for workload, got in workloads.items():
            share, seconds = got["cpu_percent"], got["seconds"]
            split = " + ".join(
                f"{100 * v / seconds:.0f}" for v in got["proxy_cpu_seconds"].values()
            )
            cpu.add_row(
                path, workload, f"{share['proxies']:.0f}", split, f"{share['client']:.0f}",
                f"{share['backends']:.0f}", f"{share['idle services']:.0f}",
                f"{share['other']:.0f}", f"{got['machine_cpu_percent']:.0f}",
            )  # fmt: skip
    console.print(cpu)
    for path, workloads in paths.items():
        for workload, got in workloads.items():
            for kind, count in got.get("error_kinds", {}).items():
                console.print(f"  {path} {workload}: {count} x {kind}")
            if got["cpu_percent"]["other"] >= 20:
                busiest = ", ".join(got["other_processes"]) or "kernel (softirq), short-lived"
                console.print(f"[yellow]{path} {workload}: "
                              f"{got['cpu_percent']['other']:.0f}% of a core went to other "
                              f"processes: {busiest}[/yellow]")  # fmt: skip


def notes(doc: dict[str, Any]) -> list[str]:
    opts = doc["options"]
    tls = "; ".join(f"{path} {got['version']} {got['cipher']}" for path, got in doc["tls"].items())
    return [
        "The gateway path has one more hop than HAProxy's: gateway -> mesh mTLS tunnel -> the "
        "web group's sidecar -> backend; HAProxy forwards to the backend directly. 'proxies' "
        "CPU' counts both sidecars on the gateway path, 'terminator's CPU' the TLS-terminating "
        "process alone (the gateway sidecar, or HAProxy).",
        f"HAProxy: nbthread 1, mode {opts['haproxy_mode']}. Both present the same P-256 "
        f"wildcard certificate; negotiated: {tls}. wrk does not resume TLS sessions, so every "
        "new connection is a full handshake; the gateway's tunnels to the web sidecar resume "
        "theirs (its client handshakes above).",
        "The gateway counts a failed handshake for each connection wrk cuts mid-handshake "
        "when a new-connection run ends (up to --connections per wrk run, warm-ups included): "
        "not an error of the path; wrk's own errors are in the table.",
        f"wrk's measured time includes opening its {opts['connections']} connections, so the "
        "keep-alive runs include that many handshakes per path. wrk, the proxies, the backend "
        f"and the mesh's idle services share the machine's {doc['cpus']} cores.",
    ]


def parse_args() -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_options(parser, seconds=(10, 3))
    parser.add_argument(
        "--haproxy-mode", choices=("tcp", "http"), default="tcp",
        help="HAProxy after TLS: tcp (a relay, as the gateway is; default) or http",
    )  # fmt: skip
    parser.add_argument(
        "--quiet-wait", type=float,
        help="before each measurement, wait up to this long for other processes to use under "
        "20%% of a core (30; --quick: 10; 0: never wait)",
    )  # fmt: skip
    args = parser.parse_args()
    found = checked_load_options(parser, args, seconds=(10, 3), quiet_wait=(30, 10))
    opts = Options(
        seconds=args.seconds, warmup=args.warmup, connections=args.connections,
        threads=args.threads, repeat=args.repeat, quiet_wait=args.quiet_wait,
        haproxy_mode=args.haproxy_mode, wrk=str(found["wrk"]), haproxy=str(found["haproxy"]),
        logs=args.logs,
    )  # fmt: skip
    return args, opts


def main() -> None:
    args, opts = parse_args()
    doc = run_in_scratch("teemesh-gateway-bench-", opts, run_bench)
    doc["ratios"] = ratios(doc["paths"])
    doc["notes"] = notes(doc)
    emit(args, doc, print_report)


if __name__ == "__main__":
    main()
