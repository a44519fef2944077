"""The gateway as public clients meet it: real TLS clients (Python's ssl, curl, httpx over
HTTP/2) against a gateway sidecar in front of a small mesh, all real processes on loopback.

The mesh: group ``web`` (web-0, web-1; each serves ``site`` over HTTP/1.1, ``tls`` with its own
certificate, ``h2`` as cleartext HTTP/2, and ``private``, which is not public) behind gateway-0,
whose wildcard certificate covers ``*.mesh.test``; and ops-0, a mesh member that reaches web's
sidecars through the gateway transport.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import socketserver
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from dnskit import dnsmasq
from meshkit import ROGUE_COMPOSE, WEB_COMPOSE, Mesh
from procs import free_port
from serverkit import Hello, read_all, serving
from sidecarkit import Sidecar, mesh_policy, run_sidecar, wait_for

from teemesh.attest.dstack import compose_hash, default_app_id
from teemesh.identity.certs import local_web_pki

pytestmark = pytest.mark.integration

GATEWAY_COMPOSE = b'{"manifest_version":2,"name":"gateway","runner":"docker-compose"}'
BASE = "mesh.test"
HOSTS = {"web-0": "127.0.2.1", "web-1": "127.0.2.2"}
INSTANCE_IDS = {"web-0": "aa" * 20, "web-1": "bb" * 20}
APP = default_app_id(compose_hash(WEB_COMPOSE)).hex()
HELLO_TIMEOUT = 2.0


class TlsHello(http.server.ThreadingHTTPServer):
    """An app that terminates its own TLS (what passthrough and custom domains reach)."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext) -> None:
        super().__init__(address, Hello)
        self.context = context

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        return self.context.wrap_socket(sock, server_side=True), address


class H2c(socketserver.BaseRequestHandler):
    """Cleartext HTTP/2 with prior knowledge: what the gateway forwards ``g`` names as."""

    def handle(self) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        self.request.sendall(conn.data_to_send())
        host = self.server.server_address[0]
        while data := self.request.recv(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    path = dict(event.headers).get(b":path", b"").decode()
                    body = f"h2 from {host} {path}\n".encode()
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                      ("content-length", str(len(body)))])  # fmt: skip
                    conn.send_data(event.stream_id, body, end_stream=True)
            self.request.sendall(conn.data_to_send())


class H2cServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class Ports:
    site: int
    tls: int
    h2: int
    private: int


@dataclass
class Edge:
    """The running mesh as a public client sees it."""

    tmp: Path
    port: int
    ca: Path
    app_ca: Path
    ports: Ports
    gateway: Sidecar
    web: dict[str, Sidecar]
    ops: Sidecar

    def name(self, port: int, suffix: str = "", ident: str = APP) -> str:
        return f"{ident}-{port}{suffix}.{BASE}"

    def client_context(self, ca: Path | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(ca or self.ca))

    def get(self, server_name: str, path: str = "/", ca: Path | None = None) -> bytes:
        """GET over TLS to the gateway, naming ``server_name``; the whole reply."""
        context = self.client_context(ca)
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\n"
                        "Connection: close\r\n\r\n".encode())  # fmt: skip
            return read_all(tls)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("gateway")
    mesh = Mesh(tmp)
    mesh_policy(mesh, {"web": (WEB_COMPOSE, ["site", "tls", "h2", "private"]),
                       "gateway": (GATEWAY_COMPOSE, []), "ops": (ROGUE_COMPOSE, [])})  # fmt: skip
    ports = Ports(free_port(), free_port(), free_port(), free_port())
    ca_pem, (cert, key) = local_web_pki([f"*.{BASE}", BASE])
    (tmp / "ca.pem").write_text(ca_pem)
    (tmp / "tls.pem").write_text(cert)
    (tmp / "tls.key").touch(mode=0o600)
    (tmp / "tls.key").write_text(key)
    app_ca, (app_cert, app_key) = local_web_pki(["custom.test", "*.wild.test", f"*.{BASE}"])
    (tmp / "app-ca.pem").write_text(app_ca)
    (tmp / "app.pem").write_text(app_cert + app_key)
    app_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    app_context.load_cert_chain(tmp / "app.pem")
    records = {  # served by a real dnsmasq: the gateway looks custom domains up in DNS
        "_dstack-app-address.custom.test": [f"{APP}:{ports.tls}"],
        "_dstack-app-address-wildcard.wild.test": [f"{APP}:{ports.tls}"],
        "_dstack-app-address.lost.test": [f"{'cc' * 20}:{ports.tls}"],
    }
    public_port = free_port()
    gateway_settings = {
        "base_domain": BASE,
        "certificate": str(tmp / "tls.pem"),
        "key": str(tmp / "tls.key"),
        "listen": f"127.0.0.1:{public_port}",
        "public": [{"group": "web", "backend": b, "port": getattr(ports, b)}
                   for b in ("site", "tls", "h2")],
        "client_hello_timeout": HELLO_TIMEOUT,
    }  # fmt: skip
    web_routes = {name: {"backend": name, "port": getattr(ports, name)}
                  for name in ("site", "tls", "h2", "private")}  # fmt: skip
    web_routes["private"]["callers"] = ["web"]
    with contextlib.ExitStack() as stack:
        dns_port = stack.enter_context(dnsmasq(tmp, records))
        gateway_settings["nameservers"] = [f"127.0.0.1:{dns_port}"]
        for host in HOSTS.values():
            stack.enter_context(serving(http.server.ThreadingHTTPServer((host, ports.site), Hello)))
            stack.enter_context(serving(TlsHello((host, ports.tls), app_context)))
            stack.enter_context(serving(H2cServer((host, ports.h2), H2c)))
            stack.enter_context(serving(http.server.ThreadingHTTPServer((host, ports.private),
                                                                        Hello)))  # fmt: skip
        agent_cm, agent_sock = mesh.coordinator_agent()
        stack.enter_context(agent_cm)
        stack.enter_context(mesh.start_coordinator(agent_sock, "coordinator"))
        web = {}
        for name, host in HOSTS.items():
            backends = {b: {"port": getattr(ports, b), "host": host}
                        for b in ("site", "tls", "h2", "private")}  # fmt: skip
            web[name] = stack.enter_context(run_sidecar(
                mesh, name, WEB_COMPOSE, "web", backends=backends, routes=web_routes,
                agent_args=("--instance-id", INSTANCE_IDS[name]),
            ))  # fmt: skip
        gateway = stack.enter_context(run_sidecar(
            mesh, "gateway-0", GATEWAY_COMPOSE, "gateway", routes=web_routes,
            extra={"gateway": gateway_settings},
        ))  # fmt: skip
        ops = stack.enter_context(run_sidecar(
            mesh, "ops-0", ROGUE_COMPOSE, "ops", routes=web_routes,
            extra={"via_gateway": {"address": f"127.0.0.1:{public_port}", "base_domain": BASE}},
        ))  # fmt: skip
        result = Edge(tmp, public_port, tmp / "ca.pem", tmp / "app-ca.pem", ports, gateway, web,
                      ops)  # fmt: skip
        for sidecar in (gateway, ops):
            wait_for(f"{sidecar.name} to see both web instances", lambda s=sidecar: all(
                len(r["instances"]) == 2 for r in s.status()["routes"]))  # fmt: skip
        yield result


# -- terminated, passthrough, HTTP/2 ---------------------------------------------------------


def test_a_terminated_name_reaches_every_instance_of_the_app(edge: Edge) -> None:
    answers = set()
    for _ in range(8):
        reply = edge.get(edge.name(edge.ports.site), "/hello")
        assert reply.startswith(b"HTTP/1.1 200"), reply
        answers.add(reply.rsplit(b"\n", 2)[-2])
    assert answers == {b"hello from 127.0.2.1 /hello", b"hello from 127.0.2.2 /hello"}


def test_curl_trusts_the_gateway_with_the_local_ca(edge: Edge) -> None:
    name = edge.name(edge.ports.site)
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(edge.ca),
         "--resolve", f"{name}:{edge.port}:127.0.0.1", f"https://{name}:{edge.port}/curl"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello from 127.0.2.") and result.stdout.endswith("/curl\n")


def test_passthrough_reaches_a_backend_that_terminates_its_own_tls(edge: Edge) -> None:
    name = edge.name(edge.ports.tls, "s")
    reply = edge.get(name, "/own-tls", ca=edge.app_ca)  # the app's certificate, not the gateway's
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"/own-tls\n"), reply
    with pytest.raises(ssl.SSLCertVerificationError):
        edge.get(name, "/", ca=edge.ca)


def test_a_g_name_is_terminated_with_alpn_h2_and_forwarded_as_http2(edge: Edge) -> None:
    name = edge.name(edge.ports.h2, "g")
    transport = httpx.HTTPTransport(http2=True, verify=edge.client_context(),
                                    retries=0)  # fmt: skip
    with httpx.Client(transport=transport, timeout=10) as client:
        for path in ("/one", "/two"):  # two streams on one connection
            reply = client.get(f"https://127.0.0.1:{edge.port}{path}", headers={"Host": name},
                               extensions={"sni_hostname": name})  # fmt: skip
            assert reply.http_version == "HTTP/2"
            assert reply.text.startswith("h2 from 127.0.2.") and reply.text.endswith(f"{path}\n")


def test_an_instance_id_reaches_that_instance_only(edge: Edge) -> None:
    name = edge.name(edge.ports.site, ident=INSTANCE_IDS["web-1"])
    for _ in range(4):
        assert edge.get(name, "/one").endswith(b"hello from 127.0.2.2 /one\n")


def test_a_custom_domain_is_passed_through_by_its_dns_txt_record(edge: Edge) -> None:
    for name in ("custom.test", "shop.wild.test"):
        reply = edge.get(name, "/custom", ca=edge.app_ca)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"/custom\n"), (name, reply)


def test_the_gateway_answers_health_itself(edge: Edge) -> None:
    reply = edge.get(f"health.{BASE}", "/")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\nok\n"), reply


# -- refusals: never a hang ------------------------------------------------------------------


@pytest.mark.parametrize(
    "server_name",
    [
        f"{'dd' * 20}-80.{BASE}",  # no such app or instance
        "PRIVATE",  # a port that is not public (filled in below)
        "nowhere.test",  # a custom domain without a record
        "lost.test",  # a record naming an app that is not there
        f"{APP}-1-2.{BASE}",  # not dstack's rule
    ],
)
def test_a_name_that_leads_nowhere_gets_an_alert(edge: Edge, server_name: str) -> None:
    if server_name == "PRIVATE":
        server_name = edge.name(edge.ports.private)
    started = time.monotonic()
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        edge.get(server_name)
    assert time.monotonic() - started < 5


def test_garbage_instead_of_a_client_hello_is_closed(edge: Edge) -> None:
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        assert closed(sock)


def test_a_silent_client_is_closed_after_the_timeout(edge: Edge) -> None:
    before = edge.gateway.metric("teemesh_refusals_total", direction="gateway", reason="timeout")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", edge.port), timeout=HELLO_TIMEOUT + 5) as sock:
        assert closed(sock)
    assert HELLO_TIMEOUT - 0.5 < time.monotonic() - started < HELLO_TIMEOUT + 3
    after = edge.gateway.metric("teemesh_refusals_total", direction="gateway", reason="timeout")
    assert after == before + 1


def test_a_client_hello_split_into_single_bytes_still_routes(edge: Edge) -> None:
    name = edge.name(edge.ports.site)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = edge.client_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        for byte in outgoing.read():
            sock.sendall(bytes([byte]))
            time.sleep(0.001)
        while True:  # the rest of the handshake, then one request
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(f"GET /split HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        reply = b""
        while b"/split\n" not in reply:
            data = sock.recv(65536)
            assert data, reply
            incoming.write(data)
            # drain every record received: one read may stop after a session ticket and leave
            # the reply in the BIO while the next recv waits for bytes that already came
            while chunk := _read_some(tls):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")


def _read_some(tls: ssl.SSLObject) -> bytes:
    """What ``tls`` can decrypt from its BIO now; b"" when it needs more bytes (or closed)."""
    try:
        return tls.read(65536)
    except ssl.SSLWantReadError:
        return b""


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- the gateway transport -------------------------------------------------------------------


def test_the_gateway_transport_carries_mesh_tunnels_end_to_end(edge: Edge) -> None:
    """ops-0 dials web's sidecars through the gateway's passthrough; web still sees ops-0's own
    certificate, so its route ``callers`` apply: ``private`` (callers [web]) is refused."""
    before = edge.gateway.metric("teemesh_connections_total", direction="gateway", name="mesh")
    answers = set()
    for _ in range(6):
        with edge.ops.connect("site", edge.ports.site) as sock:
            sock.sendall(b"GET /via HTTP/1.1\r\nHost: site\r\nConnection: close\r\n\r\n")
            reply = read_all(sock)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        answers.add(reply.rsplit(b"\n", 2)[-2])
    assert answers == {b"hello from 127.0.2.1 /via", b"hello from 127.0.2.2 /via"}
    after = edge.gateway.metric("teemesh_connections_total", direction="gateway", name="mesh")
    assert after == before + 6  # one raw passage per tunnel, resumed TLS sessions included
    with edge.ops.connect("private", edge.ports.private) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: private\r\n\r\n")
        assert closed(sock)  # no reply: reset
    refused = edge.web["web-0"].metric("teemesh_refusals_total", direction="ingress",
                                       reason="caller_not_allowed")  # fmt: skip
    refused += edge.web["web-1"].metric("teemesh_refusals_total", direction="ingress",
                                        reason="caller_not_allowed")  # fmt: skip
    assert refused >= 1
