"""Sidecars as users run them: a real coordinator, guest agents, sidecar processes and backends.

The cluster: group ``db`` (db-0 and db-1, each serving its backends on its own loopback
address, so a reply names the instance that answered), group ``web`` (web-0, which calls them by
route name) and group ``ops`` (ops-0, which the routes' ``callers`` leave out).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from meshkit import DB_COMPOSE, ROGUE_COMPOSE, WEB_COMPOSE, Mesh
from procs import free_port, run_teemesh, teemesh_exe
from serverkit import Hello, read_all, serving
from sidecarkit import Sidecar, coordinator_policy, mesh_policy, run_sidecar, wait_for

from teemesh.identity.certs import cert_pem, key_pem

pytestmark = pytest.mark.integration

HOSTS = {"db-0": "127.0.1.1", "db-1": "127.0.1.2"}
CHUNK = os.urandom(1024 * 1024)


class Digest(socketserver.BaseRequestHandler):
    """Reads until EOF, then answers the SHA-256 of what came and the address it serves on."""

    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        digest = hashlib.sha256()
        while chunk := self.request.recv(1 << 20):
            digest.update(chunk)
            self.server.bytes += len(chunk)  # type: ignore[attr-defined]
        host = self.server.server_address[0]
        self.request.sendall(f"{digest.hexdigest()} {host}\n".encode())


class DigestServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, Digest)
        self.connections = 0
        self.bytes = 0


@dataclass
class Ports:
    http: int
    digest: int
    pg: int


@dataclass
class Cluster:
    mesh: Mesh
    ports: Ports
    sidecars: dict[str, Sidecar]
    digests: dict[tuple[str, int], DigestServer]

    def __getitem__(self, name: str) -> Sidecar:
        return self.sidecars[name]


def db_backends(name: str, ports: Ports) -> dict[str, object]:
    host = HOSTS[name]
    return {
        "api": {"port": ports.http, "host": host, "health": {"http": "/health", "interval": 0.5}},
        "digest": {"port": ports.digest, "host": host},
        "pg": {"port": ports.pg, "host": host, "owner": "workload"},
    }


def routes(ports: Ports) -> dict[str, dict[str, object]]:
    return {
        "hello": {"backend": "api", "port": ports.http, "callers": ["web"]},
        "digest": {"backend": "digest", "port": ports.digest, "callers": ["web"]},
        "pg-master": {"backend": "pg", "port": ports.pg, "role": "master"},
        "pg-replica": {"backend": "pg", "port": ports.pg, "role": "replica"},
    }


@contextlib.contextmanager
def cluster_of(tmp, db_names=("db-0", "db-1"), with_ops=True, web_extra=None) -> Iterator[Cluster]:
    mesh = Mesh(tmp)
    mesh_policy(mesh, {"web": (WEB_COMPOSE, []), "db": (DB_COMPOSE, ["api", "digest", "pg"]),
                       "ops": (ROGUE_COMPOSE, [])})  # fmt: skip
    ports = Ports(free_port(), free_port(), free_port())
    with contextlib.ExitStack() as stack:
        digests = {}
        for name in db_names:
            host = HOSTS[name]
            stack.enter_context(serving(http.server.ThreadingHTTPServer((host, ports.http), Hello)))
            for port in (ports.digest, ports.pg):
                digests[(host, port)] = stack.enter_context(serving(DigestServer((host, port))))
        agent_cm, agent_sock = mesh.coordinator_agent()
        stack.enter_context(agent_cm)
        stack.enter_context(mesh.start_coordinator(agent_sock, "coordinator"))
        sidecars = {}
        for name in db_names:
            sidecars[name] = stack.enter_context(run_sidecar(
                mesh, name, DB_COMPOSE, "db", backends=db_backends(name, ports),
                routes=routes(ports),
            ))  # fmt: skip
        web_routes = routes(ports) | {"digest-wrong-port": {"backend": "digest", "port": ports.pg}}
        sidecars["web-0"] = stack.enter_context(
            run_sidecar(mesh, "web-0", WEB_COMPOSE, "web", routes=web_routes, extra=web_extra)
        )
        if with_ops:
            sidecars["ops-0"] = stack.enter_context(
                run_sidecar(mesh, "ops-0", ROGUE_COMPOSE, "ops", routes=routes(ports))
            )
        cluster = Cluster(mesh, ports, sidecars, digests)
        for sidecar in sidecars.values():
            wait_for(f"{sidecar.name} to see both instances of hello", lambda s=sidecar: len(
                _route(s, "hello")["instances"]) == len(db_names))  # fmt: skip
        yield cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    with cluster_of(tmp_path_factory.mktemp("sidecars")) as c:
        yield c


def _route(sidecar: Sidecar, name: str) -> dict[str, object]:
    return next(r for r in sidecar.status()["routes"] if r["name"] == name)


def http_get(sock: socket.socket, path: str, host: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    return read_all(sock)


def digest_call(sidecar: Sidecar, route: str, port: int, payload: bytes) -> tuple[str, str]:
    """Send ``payload``, half-close, read the backend's answer: (sha256 hex, backend host)."""
    with sidecar.connect(route, port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        answer = read_all(sock).decode()
    digest, _, host = answer.strip().partition(" ")
    return digest, host


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the peer closes or resets ``sock`` (within ``timeout``)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- the data path ---------------------------------------------------------------------------


def test_http_by_route_name_balances_over_instances(cluster: Cluster) -> None:
    web, port = cluster["web-0"], cluster.ports.http
    answers = set()
    for _ in range(6):
        with web.connect("hello", port) as sock:
            reply = http_get(sock, "/hello", "hello")
        assert reply.startswith(b"HTTP/1.1 200"), reply
        answers.add(reply.rsplit(b"\n", 2)[-2])
    assert answers == {b"hello from 127.0.1.1 /hello", b"hello from 127.0.1.2 /hello"}


def test_raw_tcp_with_half_close_gets_the_reply(cluster: Cluster) -> None:
    payload = b"a request that ends with a half-close" * 100
    digest, host = digest_call(cluster["web-0"], "digest", cluster.ports.digest, payload)
    assert digest == hashlib.sha256(payload).hexdigest()
    assert host in HOSTS.values()


def test_backend_that_half_closes_first_still_reads_the_client(cluster: Cluster) -> None:
    """The other direction: the backend finishes writing, the client keeps sending."""
    web = cluster["web-0"]
    with web.connect("hello", cluster.ports.http) as sock:
        sock.sendall(b"GET /first HTTP/1.0\r\n\r\n")  # HTTP/1.0: the server closes after replying
        reply = read_all(sock)
    assert reply.endswith(b"/first\n")


def test_one_gib_arrives_intact(cluster: Cluster) -> None:
    web = cluster["web-0"]
    expected = hashlib.sha256()
    with web.connect("digest", cluster.ports.digest, timeout=60) as sock:
        for _ in range(1024):
            sock.sendall(CHUNK)
            expected.update(CHUNK)
        sock.shutdown(socket.SHUT_WR)
        answer = read_all(sock).decode()
    assert answer.split()[0] == expected.hexdigest()


def test_metrics_count_tunnels_and_bytes(cluster: Cluster) -> None:
    web = cluster["web-0"]
    before = web.metric("teemesh_bytes_total", direction="egress", way="in")
    digest_call(web, "digest", cluster.ports.digest, b"x" * 5000)
    wait_for("the bytes to be counted", lambda: web.metric(
        "teemesh_bytes_total", direction="egress", way="in") >= before + 5000)  # fmt: skip
    text = web.metrics()
    assert 'teemesh_admission_state{state="admitted"} 1.0' in text
    assert web.metric("teemesh_certificate_expiry_timestamp_seconds") > time.time()
    # the first tunnel to an instance makes a full handshake, later ones resume its session
    for side, sidecar in (("client", web), ("server", cluster["db-0"])):
        assert sidecar.metric("teemesh_tls_handshakes_total", side=side, result="full") >= 1
        assert sidecar.metric("teemesh_tls_handshakes_total", side=side, result="resumed") >= 1


# -- refusals --------------------------------------------------------------------------------


def test_a_caller_outside_callers_is_refused_before_the_backend(cluster: Cluster) -> None:
    ops, db0 = cluster["ops-0"], cluster["db-0"]
    servers = [cluster.digests[(h, cluster.ports.digest)] for h in HOSTS.values()]
    seen = sum(s.connections for s in servers)
    assert refused(ops, "digest", cluster.ports.digest, b"bytes that must never reach the backend")
    assert sum(s.connections for s in servers) == seen
    count = cluster["db-0"].metric("teemesh_refusals_total", direction="ingress",
                                      reason="caller_not_allowed") + cluster["db-1"].metric(
        "teemesh_refusals_total", direction="ingress", reason="caller_not_allowed")  # fmt: skip
    assert count >= 1
    logs = db0.proc.output() + cluster["db-1"].proc.output()
    assert '"reason":"CALLER_NOT_ALLOWED","caller":"ops/ops-0"' in logs


def refused(sidecar: Sidecar, route: str, port: int, payload: bytes = b"x") -> bool:
    """True when the sidecar ends a connection to ``route`` without a byte of reply.

    The refusal may come as a reset before ``connect`` even returns (on loopback the kernel can
    deliver it that fast), while sending, or as the reply."""
    try:
        with sidecar.connect(route, port) as sock:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            return read_all(sock) == b""
    except ConnectionResetError:
        return True


def test_a_backend_port_the_instance_does_not_serve_is_refused(cluster: Cluster) -> None:
    web = cluster["web-0"]
    assert refused(web, "digest-wrong-port", cluster.ports.pg)
    assert sum(cluster[n].metric("teemesh_refusals_total", direction="ingress",
                                 reason="unknown_backend") for n in HOSTS) >= 1  # fmt: skip


def mesh_client_context(cluster: Cluster, name: str, group: str) -> ssl.SSLContext:
    """A TLS client holding a real SVID of ``group`` (admitted through its own agent)."""
    compose = {"web": WEB_COMPOSE, "ops": ROGUE_COMPOSE}[group]
    with cluster.mesh.admitted(name, compose, group) as (svid, _agent):
        folder = cluster.mesh.tmp / name
        folder.mkdir(exist_ok=True)
        (folder / "svid.pem").write_text(cert_pem(svid.certificate) + key_pem(svid.key))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=cert_pem(svid.ca_certificate))
        context.load_cert_chain(folder / "svid.pem")
    return context


def tunnel_reply(context: ssl.SSLContext, port: int, request: bytes) -> bytes:
    """What the ingress answers ``request``: until it closes, or the end of an accepting head."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with raw, context.wrap_socket(raw) as tls:
        tls.sendall(request)
        data = b""
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            while chunk := tls.recv(65536):
                data += chunk
                if data.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" in data:
                    break
    return data


def test_ingress_answers_each_refusal_with_its_reason(cluster: Cluster) -> None:
    db0, port = cluster["db-0"], cluster.ports
    web = mesh_client_context(cluster, "probe-web", "web")
    ops = mesh_client_context(cluster, "probe-ops", "ops")
    cases = [
        (web, f"CONNECT nothing:{port.digest} HTTP/1.1\r\n\r\n", b"404", b"UNKNOWN_BACKEND"),
        (web, f"CONNECT digest:{port.pg} HTTP/1.1\r\n\r\n", b"404", b"UNKNOWN_BACKEND"),
        (ops, f"CONNECT digest:{port.digest} HTTP/1.1\r\n\r\n", b"403", b"CALLER_NOT_ALLOWED"),
        (web, "GET / HTTP/1.1\r\n\r\n", b"400", b"BAD_REQUEST"),
    ]
    for context, request, status, reason in cases:
        reply = tunnel_reply(context, db0.ingress_port, request.encode() + b"early data")
        assert reply.startswith(b"HTTP/1.1 " + status), (request, reply)
        assert b"x-teemesh-refusal: " + reason in reply
    ok = tunnel_reply(web, db0.ingress_port, f"CONNECT pg:{port.pg} HTTP/1.1\r\n\r\n".encode())
    assert ok.startswith(b"HTTP/1.1 200")


def test_a_client_without_a_mesh_certificate_fails_the_handshake(cluster: Cluster) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:  # TLS 1.3: the server's alert may come at the handshake or at the first read
        reply = tunnel_reply(
            context, cluster["db-0"].ingress_port, b"CONNECT api:1 HTTP/1.1\r\n\r\n"
        )
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        reply = b""
    assert reply == b""  # an accepted client would get at least a refusal head
    assert cluster["db-0"].metric("teemesh_tls_handshakes_total", side="server",
                                  result="failed") >= 1  # fmt: skip


def test_an_unknown_route_backend_closes_the_client(cluster: Cluster) -> None:
    web = cluster["web-0"]
    status, _ = web.post("/v1/backends/nothing", {"role": "x"})  # not a backend of web-0
    assert status == 404
    # no instance is tagged replica yet: the egress has nowhere to go and closes
    assert refused(web, "pg-replica", cluster.ports.pg)
    assert web.metric("teemesh_refusals_total", direction="egress", reason="no_instance") >= 1


# -- roles and failover ----------------------------------------------------------------------


def tag(sidecar: Sidecar, service: str, *args: str) -> None:
    result = run_teemesh(["sidecar", "tag", "--api", sidecar.api, "--service", service, *args],
                         sidecar.proc.log.with_suffix(".tag.log"))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_role_switch_moves_new_connections_and_closes_old_ones(cluster: Cluster) -> None:
    web, port = cluster["web-0"], cluster.ports.pg
    tag(cluster["db-0"], "pg", "--role", "master")
    tag(cluster["db-1"], "pg", "--role", "replica")
    wait_for("db-0 as master", lambda: _route(web, "pg-master")["instances"] == ["db-0"])
    wait_for("db-1 as replica", lambda: _route(web, "pg-replica")["instances"] == ["db-1"])
    assert digest_call(web, "pg-master", port, b"w")[1] == HOSTS["db-0"]
    assert digest_call(web, "pg-replica", port, b"r")[1] == HOSTS["db-1"]
    held = web.connect("pg-master", port)
    held.sendall(b"an open session with the old master")
    time.sleep(0.3)
    # Patroni's own callback, as patroni.yml would run it
    subprocess.run([teemesh_exe(), "sidecar", "patroni-callback", "--api", cluster["db-0"].api,
                    "--service", "pg", "on_role_change", "replica", "demo"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([teemesh_exe(), "sidecar", "patroni-callback", "--api", cluster["db-1"].api,
                    "--service", "pg", "on_role_change", "primary", "demo"], check=True,
                   capture_output=True)  # fmt: skip
    try:
        assert closed_by_peer(held, 10), "the old master's session stayed open"
    finally:
        held.close()
    wait_for("db-1 as master", lambda: _route(web, "pg-master")["instances"] == ["db-1"])
    assert digest_call(web, "pg-master", port, b"w")[1] == HOSTS["db-1"]
    assert web.metric("teemesh_connections_cut_total", reason="role_lost") >= 1


def test_renewal_under_load_drops_no_connection(cluster: Cluster) -> None:
    web, db0 = cluster["web-0"], cluster["db-0"]
    serials = {s.name: s.status()["admission"]["serial"] for s in (web, db0)}
    results: list[tuple[str, str] | BaseException] = []
    stop = threading.Event()

    def stream() -> None:
        try:
            expected = hashlib.sha256()
            with web.connect("digest", cluster.ports.digest, timeout=30) as sock:
                while not stop.is_set():
                    sock.sendall(CHUNK[:65536])
                    expected.update(CHUNK[:65536])
                sock.shutdown(socket.SHUT_WR)
                answer = read_all(sock).decode().split()[0]
            results.append((expected.hexdigest(), answer))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    for sidecar in (web, db0):
        assert sidecar.post("/v1/admission/renew", {})[0] == 202
    for sidecar in (web, db0):
        wait_for(f"{sidecar.name} to renew", lambda s=sidecar: s.status()["admission"]["serial"]
                 not in (None, serials[s.name]))  # fmt: skip
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert len(results) == 6
    assert all(isinstance(r, tuple) and r[0] == r[1] for r in results), results
    # and new tunnels use the renewed certificates
    assert (
        digest_call(web, "digest", cluster.ports.digest, b"after")[0]
        == hashlib.sha256(b"after").hexdigest()
    )


def test_route_names_resolve_in_sidecar_exec(cluster: Cluster) -> None:
    web = cluster["web-0"]
    hosts = cluster.mesh.tmp / "web-0-sidecar" / "hosts"
    result = subprocess.run(
        [teemesh_exe(), "sidecar", "exec", "--hosts-file", str(hosts), "--", "getent", "hosts",
         "pg-master"], capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == web.vips["pg-master"]
    assert "pg-master" not in Path("/etc/hosts").read_text()  # the host file is untouched


def test_status_cli_shows_routes_and_backends(cluster: Cluster) -> None:
    result = run_teemesh(["sidecar", "status", "--api", cluster["db-0"].api, "--json"],
                         cluster.mesh.tmp / "status.log")  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["peer"] == "db/db-0" and doc["admission"]["state"] == "admitted"
    assert {b["name"]: b["health"] for b in doc["backends"]} == {
        "api": "passing", "digest": "passing", "pg": "passing"}  # fmt: skip


# -- losing peers ----------------------------------------------------------------------------


def test_a_killed_instance_stops_receiving_traffic(tmp_path) -> None:
    with cluster_of(tmp_path, with_ops=False) as cluster:
        web, db1 = cluster["web-0"], cluster["db-1"]
        db1.proc.process.send_signal(signal.SIGKILL)
        db1.proc.process.wait(10)
        hosts = {digest_call(web, "digest", cluster.ports.digest, b"k")[1] for _ in range(10)}
        assert hosts == {HOSTS["db-0"]}
        assert web.metric("teemesh_upstream_connect_failures_total", route="digest") >= 1


def test_a_revoked_peer_is_cut_off_within_seconds(tmp_path) -> None:
    with cluster_of(tmp_path, db_names=("db-0",), with_ops=False) as cluster:
        web = cluster["web-0"]
        held = web.connect("digest", cluster.ports.digest)
        held.sendall(b"a long session")
        time.sleep(0.3)
        state = cluster.mesh.tmp / "coordinator"
        result = run_teemesh(["admin", "--url", cluster.mesh.url, "--ca",
                              str(state / "mesh-ca.crt"), "--token-file",
                              str(state / "admin.token"), "revoke", "web", "web-0"],
                             cluster.mesh.tmp / "revoke.log")  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        started = time.monotonic()
        try:
            assert closed_by_peer(held, 10), "the revoked peer's session stayed open"
        finally:
            held.close()
        assert time.monotonic() - started < 5
        assert refused(web, "digest", cluster.ports.digest)
        assert cluster["db-0"].metric("teemesh_connections_cut_total", reason="revoked") >= 1


def _answer(web: Sidecar, cluster: Cluster) -> str | None:
    try:
        return digest_call(web, "digest", cluster.ports.digest, b"x")[1]
    except OSError:
        return None


def test_a_restarted_coordinator_is_checked_again_and_watched(tmp_path) -> None:
    """A restarted coordinator presents a new RA-TLS certificate, which no sidecar has seen: the
    sidecar has its admission helper check the evidence, then trusts it and watches again."""
    with cluster_of(tmp_path, with_ops=False) as cluster:
        mesh, web = cluster.mesh, cluster["web-0"]
        port = int(mesh.url.rpartition(":")[2])
        mesh.coordinator.stop()
        agent = mesh.tmp / "coordinator-agent.sock"
        with mesh.start_coordinator(agent, "coordinator", port=port):
            cluster["db-1"].terminate()  # deregisters through the new coordinator
            wait_for("web-0 to see db-1 leave", lambda: _route(web, "hello")["instances"]
                     == ["db-0"], timeout=30)  # fmt: skip
            # db-0's lease may lapse while the coordinator is down; it registers again at its
            # next heartbeat, so calls may fail for a moment before they flow to db-0 alone
            wait_for("a call answered by db-0", lambda: _answer(web, cluster) == HOSTS["db-0"])
            assert {_answer(web, cluster) for _ in range(5)} == {HOSTS["db-0"]}
            assert web.status()["admission"]["state"] == "admitted"
            assert '"event":"coordinators_checked","passed":1' in web.proc.output()


def test_sigterm_drains_open_tunnels_then_exits(tmp_path) -> None:
    """Also: the connection limit (two here) refuses a third tunnel at once, not later."""
    with cluster_of(tmp_path, db_names=("db-0",), with_ops=False,
                    web_extra={"max_connections": 2}) as cluster:  # fmt: skip
        web, db0 = cluster["web-0"], cluster["db-0"]
        held = web.connect("digest", cluster.ports.digest)
        held.sendall(b"in flight")
        with web.connect("digest", cluster.ports.digest) as second:
            second.sendall(b"second")
            wait_for("two open tunnels", lambda: web.status()["tunnels"]["egress"] == 2)
            assert refused(web, "digest", cluster.ports.digest)  # the third
            second.shutdown(socket.SHUT_WR)
            assert read_all(second).split()[0].decode() == hashlib.sha256(b"second").hexdigest()
        assert web.metric("teemesh_refusals_total", direction="egress",
                          reason="connection_limit") == 1  # fmt: skip
        db0.terminate()
        wait_for("db-0 to leave the catalog", lambda: _route(web, "digest")["instances"] == [])
        held.shutdown(socket.SHUT_WR)  # the open session still completes during the drain
        assert read_all(held).split()[0].decode() == hashlib.sha256(b"in flight").hexdigest()
        held.close()
        assert db0.proc.process.wait(10) == 0


# -- admission ---------------------------------------------------------------------------------


def test_admission_needs_the_pinned_coordinator_and_an_admitting_policy(tmp_path) -> None:
    mesh = Mesh(tmp_path)
    mesh_policy(mesh, {"web": (WEB_COMPOSE, [])})
    agent_cm, agent_sock = mesh.coordinator_agent()
    wrong_pin = coordinator_policy() | {"compose_hashes": ["00" * 32]}
    with agent_cm, mesh.start_coordinator(agent_sock, "coordinator"):
        with run_sidecar(mesh, "web-0", WEB_COMPOSE, "web", wait_ready=False,
                         extra={"coordinator_policy": wrong_pin}) as untrusting:  # fmt: skip
            wait_for("a failed attempt", lambda: untrusting.status()["admission"]["last_error"])
            status = untrusting.status()["admission"]
            assert status["state"] == "pending"
            assert "COMPOSE_HASH_NOT_ALLOWED" in status["last_error"]
            assert "admitted" not in mesh.coordinator.output()  # it never sent its evidence
        with run_sidecar(mesh, "db-0", DB_COMPOSE, "db", wait_ready=False) as refused:
            wait_for("a refusal", lambda: refused.status()["admission"]["state"] == "refused")
            assert "GROUP_NOT_ALLOWED" in refused.status()["admission"]["last_error"]
            assert refused.metric("teemesh_admissions_total", result="refused") == 1
            with pytest.raises(OSError):  # nothing listens for mesh traffic unadmitted
                socket.create_connection(("127.0.0.1", refused.ingress_port), timeout=1)
