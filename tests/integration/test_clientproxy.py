"""dstack-vpc's client proxy in real sidecars: a workload's plain HTTP, routed into the mesh by
``x-dstack-target-*`` headers, to a real backend behind another CVM's sidecar.

A real coordinator admits every CVM; the caller's and target's sidecars are real processes;
the client is httpx (or a raw socket for hostile input) on the client proxy's port.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.server
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from meshkit import DB_COMPOSE, ROGUE_COMPOSE, WEB_COMPOSE, Mesh, svid_pem
from procs import free_port
from serverkit import exchange, serving
from sidecarkit import Sidecar, mesh_policy, run_sidecar, wait_for

from teemesh.identity.certs import cert_pem, pem_pair
from teemesh.identity.meshca import issue_svid, mesh_ca_cert, mesh_ca_key
from teemesh.identity.svid import spiffe_id
from teemesh.net.tls import tls_context
from teemesh.platform.agent_client import AgentClient
from teemesh.sidecar.clientproxy import ClientProxyListener
from teemesh.sidecar.config import Route, SidecarConfig
from teemesh.sidecar.metrics import Metrics
from teemesh.sidecar.plane import Plane

pytestmark = pytest.mark.integration


@dataclass
class Seen:
    """What the backend received, and a gate the streaming test opens."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)


class Recorder(http.server.BaseHTTPRequestHandler):
    """Records each request; answers in chunks (``/stream``: the second one once the test has
    read the first, so a proxy that buffered the response would never deliver it)."""

    protocol_version = "HTTP/1.1"
    seen: Seen

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.requests.append({"method": self.command, "path": self.path, "body": body,
                                   "headers": [(k.lower(), v) for k, v in self.headers.items()]})  # fmt: skip
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Backend", "db")
        self.end_headers()
        self._chunk(b"first;")
        if self.path == "/stream":
            self.seen.gate.wait(10)
        self._chunk(f"{self.command} {self.path}".encode())
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class World:
    mesh: Mesh
    seen: Seen
    backend_port: int
    web: int
    ops: int
    db_app: str
    db_instance: str
    web_info: dict[str, Any]
    routes: dict[str, Any]


def agent_info(mesh: Mesh, name: str) -> dict[str, Any]:
    with AgentClient(str(mesh.tmp / f"{name}.sock")) as agent:
        return agent.info()


def serves(sidecar: Sidecar, *peers: str) -> bool:
    routes = {r["name"]: r["instances"] for r in sidecar.status()["routes"]}
    return set(peers) <= set(routes["api"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    mesh = Mesh(tmp_path_factory.mktemp("clientproxy"))
    mesh_policy(mesh, {"web": (WEB_COMPOSE, []), "db": (DB_COMPOSE, ["api"]),
                       "ops": (ROGUE_COMPOSE, [])})  # fmt: skip
    seen = Seen()
    handler = type("Handler", (Recorder,), {"seen": seen})
    web_port, ops_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(serving(
            http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler), poll=0.1))  # fmt: skip
        port = backend.server_address[1]
        routes = {"api": {"backend": "api", "port": port, "callers": ["web"]}}
        agent_cm, agent_sock = mesh.coordinator_agent()
        stack.enter_context(agent_cm)
        stack.enter_context(mesh.start_coordinator(agent_sock, "coordinator"))
        stack.enter_context(run_sidecar(mesh, "db-0", DB_COMPOSE, "db", routes=routes,
                                        backends={"api": {"port": port}}))  # fmt: skip
        web = stack.enter_context(run_sidecar(mesh, "web-0", WEB_COMPOSE, "web", routes=routes,
            extra={"client_proxy": {"listen": f"127.0.0.1:{web_port}"}}))  # fmt: skip
        ops = stack.enter_context(run_sidecar(mesh, "ops-0", ROGUE_COMPOSE, "ops", routes=routes,
            extra={"client_proxy": {"listen": f"127.0.0.1:{ops_port}"}}))  # fmt: skip
        wait_for(
            "db-0 in the callers' catalog", lambda: serves(web, "db-0") and serves(ops, "db-0")
        )
        db = agent_info(mesh, "db-0")
        yield World(mesh, seen, port, web_port, ops_port, db["app_id"], db["instance_id"],
                    agent_info(mesh, "web-0"), routes)  # fmt: skip


def target(world: World, **more: str) -> dict[str, str]:
    return {"x-dstack-target-app": world.db_app,
            "x-dstack-target-port": str(world.backend_port), **more}  # fmt: skip


def test_a_request_reaches_the_target_app_and_its_response_streams_back(world: World) -> None:
    world.seen.requests.clear()
    headers = target(world, **{"host": "vpc-server", "x-custom": "kept",
                               "x-dstack-target-use-tls": "false"})  # fmt: skip
    url = f"http://127.0.0.1:{world.web}/stream?q=1"
    with httpx.stream("POST", url, headers=headers, content=b"the body", timeout=10) as reply:
        assert reply.status_code == 200
        assert reply.headers["x-backend"] == "db"
        chunks = reply.iter_bytes()
        first = next(chunks)
        assert first.startswith(b"first;")  # arrived while the backend still holds the rest
        world.seen.gate.set()
        body = first + b"".join(chunks)
    assert body == b"first;POST /stream?q=1"
    (request,) = world.seen.requests
    sent = dict(request["headers"])
    assert (request["method"], request["path"], request["body"]) == ("POST", "/stream?q=1",
                                                                     b"the body")  # fmt: skip
    assert sent["host"] == "vpc-server"
    assert sent["x-custom"] == "kept"
    assert not [k for k, _ in request["headers"] if k.startswith("x-dstack-target-")]


def test_forged_identity_headers_do_not_reach_the_backend(world: World) -> None:
    """A backend written for dstack-vpc may trust ``X-Dstack-App-Id``; only the auth service
    behind nginx may state it, so the proxy drops any a client wrote, in any case."""
    world.seen.requests.clear()
    forged = {"X-Dstack-App-Id": "ee" * 20, "x-teemesh-group": "admin",
              "X-TEEMESH-PEER": "admin-0", "x-client-verify": "SUCCESS",
              "X-Client-Cert": "-----BEGIN%20CERTIFICATE", "x-custom": "kept"}  # fmt: skip
    reply = httpx.get(f"http://127.0.0.1:{world.web}/who", headers=target(world, **forged),
                      timeout=10)  # fmt: skip
    assert (reply.status_code, reply.text) == (200, "first;GET /who")
    (request,) = world.seen.requests
    names = {k for k, _ in request["headers"]}
    assert "x-custom" in names
    assert not names & {"x-dstack-app-id", "x-teemesh-group", "x-teemesh-peer",
                        "x-client-verify", "x-client-cert"}  # fmt: skip


def test_one_instance_by_its_id(world: World) -> None:
    headers = target(world, **{"x-dstack-target-instance": world.db_instance})
    reply = httpx.get(f"http://127.0.0.1:{world.web}/one", headers=headers, timeout=10)
    assert (reply.status_code, reply.text) == (200, "first;GET /one")
    other = target(world, **{"x-dstack-target-instance": "ee" * 20})
    reply = httpx.get(f"http://127.0.0.1:{world.web}/one", headers=other, timeout=10)
    assert reply.status_code == 404
    assert "ee" * 20 in reply.json()["error"]


def test_what_does_not_exist_is_named(world: World) -> None:
    url = f"http://127.0.0.1:{world.web}/x"
    wrong_app = httpx.get(url, headers={**target(world), "x-dstack-target-app": "ab" * 20})
    assert wrong_app.status_code == 404
    assert "ab" * 20 in wrong_app.json()["error"]
    wrong_port = httpx.get(url, headers={**target(world), "x-dstack-target-port": "1"})
    assert wrong_port.status_code == 404
    assert "port 1" in wrong_port.json()["error"]
    no_default = httpx.get(url, headers={"x-dstack-target-app": world.db_app})
    assert no_default.status_code == 404  # port 443: nothing serves it
    bad_port = httpx.get(url, headers={**target(world), "x-dstack-target-port": "http"})
    assert bad_port.status_code == 400
    assert "x-dstack-target-port" in bad_port.json()["error"]


def test_a_caller_outside_the_routes_callers_is_refused(world: World) -> None:
    world.seen.requests.clear()
    reply = httpx.get(f"http://127.0.0.1:{world.ops}/x", headers=target(world), timeout=10)
    assert reply.status_code == 403
    assert "may not call" in reply.json()["error"]
    assert world.seen.requests == []


def test_the_guest_agent_fallback(world: World) -> None:
    base = f"http://127.0.0.1:{world.web}"
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/info").json() == world.web_info
    assert httpx.post(f"{base}/Info", content=b"{}").json() == world.web_info
    assert httpx.get(f"{base}/gateway").json() == {"gateway_domain": ""}
    assert httpx.get(f"{base}/version").json()["version"]
    unknown = httpx.get(f"{base}/no_such_method")
    assert unknown.status_code == 403
    assert "NoSuchMethod" in unknown.json()["error"]


@pytest.mark.parametrize(
    ("call", "method"),
    [("GET /get_key?path=x", "GetKey"), ("POST /get_tls_key", "GetTlsKey"),
     ("POST /sign", "Sign"), ("POST /emit_event", "EmitEvent"), ("GET /prpc/GetKey", "GetKey")],
)  # fmt: skip
def test_the_fallback_serves_no_secret_and_no_measurement(world: World, call: str,
                                                          method: str) -> None:  # fmt: skip
    """dstack-vpc passes these to dstack.sock for anything that reaches its port."""
    verb, path = call.split()
    body = b'{"event": "x", "payload": "00", "data": "00", "algorithm": "secp256k1"}'
    reply = httpx.request(verb, f"http://127.0.0.1:{world.web}{path}",
                          content=body if verb == "POST" else None, timeout=10)  # fmt: skip
    assert reply.status_code == 403
    error = reply.json()["error"]
    assert f"method {method} is not served through this proxy" in error
    assert "key" not in reply.json()


def raw(port: int, data: bytes) -> bytes:
    return exchange(port, data, half_close=True)


def test_hostile_input_gets_a_4xx_and_the_proxy_lives_on(world: World) -> None:
    assert raw(world.web, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert raw(world.web, huge).startswith(b"HTTP/1.1 431 ")
    too_long = (b"POST / HTTP/1.1\r\nHost: x\r\nx-dstack-target-app: " + world.db_app.encode()
                + b"\r\nContent-Length: 20000000\r\n\r\n")  # fmt: skip
    assert raw(world.web, too_long).startswith(b"HTTP/1.1 413 ")
    cut = raw(world.web, b"POST /info HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert cut == b"" or cut.startswith(b"HTTP/1.1 400 ")
    assert httpx.get(f"http://127.0.0.1:{world.web}/health").status_code == 200


class Impostor:
    """A TLS server with a real mesh certificate of another app: records what it receives."""

    def __init__(self, port: int, identity: tuple[str, str], tmp: Path) -> None:
        (tmp / "impostor.crt").write_text(identity[0])
        (tmp / "impostor.key").write_text(identity[1])
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tmp / "impostor.crt", tmp / "impostor.key")
        self.sock = socket.create_server(("127.0.0.1", port))
        self.handshakes = 0
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                with contextlib.suppress(OSError), conn:
                    conn.settimeout(5)
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        self.handshakes += 1
                        while data := tls.recv(65536):
                            self.received += data

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_no_byte_reaches_a_server_that_is_not_the_target(world: World) -> None:
    """db-x is admitted as db and registers 127.0.0.1:<port> as its ingress, but listens
    elsewhere; at 127.0.0.1:<port> answers a server with a real SVID of another app."""
    mesh, port = world.mesh, free_port()
    with mesh.admitted("ops-1", ROGUE_COMPOSE, "ops") as (svid, _agent):
        impostor = Impostor(port, svid_pem(svid), mesh.tmp)
    try:
        with run_sidecar(mesh, "db-x", DB_COMPOSE, "db", routes=world.routes,
                         backends={"api": {"port": world.backend_port}},
                         extra={"ingress": f"127.0.0.2:{port}"}):  # fmt: skip
            instance = agent_info(mesh, "db-x")["instance_id"]
            headers = target(world, **{"x-dstack-target-instance": instance})
            url = f"http://127.0.0.1:{world.web}/secret"

            def dialed() -> bool:
                reply = httpx.post(url, headers=headers, content=b"secret", timeout=10)
                assert reply.status_code in (404, 502), reply.text  # 404 until registered
                return reply.status_code == 502

            wait_for("a tunnel attempt to db-x", dialed)
            reply = httpx.post(url, headers=headers, content=b"secret", timeout=10)
            assert reply.status_code == 502
            assert "ops/ops-1" in reply.json()["error"]
    finally:
        impostor.close()
    assert impostor.handshakes >= 1
    assert impostor.received == b""
    assert not any(r["path"] == "/secret" for r in world.seen.requests)


def test_the_fallback_passes_the_query_as_arguments(world: World) -> None:
    reply = httpx.get(f"http://127.0.0.1:{world.web}/get_quote?report_data=abcd", timeout=10)
    assert reply.status_code == 200
    assert json.loads(reply.content)["report_data"] == "abcd" + "00" * 62


# -- in one process: a certificate a real coordinator never issues ----------------------------

APP, OTHER_APP = "ab" * 20, "cd" * 20
CA_KEY = mesh_ca_key(os.urandom(32))
CA = mesh_ca_cert(CA_KEY, "demo")


def svid_of(group: str, peer: str, app: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_svid(CA_KEY, CA, key.public_key(), spiffe=spiffe_id("demo", group, peer),
                      peer_id=peer, app_id=bytes.fromhex(app), now=dt.datetime.now(dt.UTC),
                      ttl=dt.timedelta(hours=1))  # fmt: skip
    return pem_pair(cert, key)


async def through_proxy(server_app: str) -> tuple[int, bytes]:
    """A request for app APP, to an instance the catalog says is db/db-0 of APP, whose server
    presents db/db-0 with ``server_app``: the proxy's status, and what the server received."""
    received = bytearray()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await reader.read(65536):
                received.extend(data)
        writer.close()

    server_tls = tls_context(server=True, identity=svid_of("db", "db-0", server_app),
                             verify=cert_pem(CA))  # fmt: skip
    server = await asyncio.start_server(record, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    config = SidecarConfig(cluster="demo", group="web", peer_id="web-0",
                           coordinators=("https://127.0.0.1:1",), coordinator_policy={},
                           address="127.0.0.1", routes={"api": Route("api", 8080)},
                           connect_timeout=2)  # fmt: skip
    plane = Plane(config, Metrics())
    plane.use_identity(svid_of("web", "web-0", "ee" * 20), cert_pem(CA))
    entry = {"service": "api", "group": "db", "peer_id": "db-0", "address": "127.0.0.1",
             "port": port, "app_id": APP, "instance_id": "11" * 20}  # fmt: skip
    plane.load_instances({"instances/api/db-0": json.dumps(entry)})
    proxy = await asyncio.get_running_loop().create_server(
        ClientProxyListener(plane, None), "127.0.0.1", 0
    )
    url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}/secret"
    headers = {"x-dstack-target-app": APP, "x-dstack-target-port": "8080"}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.post(url, headers=headers, content=b"secret")
        await asyncio.sleep(0.2)
    finally:
        proxy.close()
        server.close()
        await server.wait_closed()
    return reply.status_code, bytes(received)


async def connection_cap() -> list[bytes]:
    """Two clients hold the proxy's connections (the bound: ``max_connections`` 2, below
    ``MAX_CLIENTS``); a third is answered 503; once one has gone, a new one is served."""
    config = SidecarConfig(cluster="demo", group="web", peer_id="web-0",
                           coordinators=("https://127.0.0.1:1",), coordinator_policy={},
                           address="127.0.0.1", routes={"api": Route("api", 8080)},
                           max_connections=2)  # fmt: skip
    listener = ClientProxyListener(Plane(config, Metrics()), None)
    proxy = await asyncio.get_running_loop().create_server(listener, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"

    async def ask() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(health)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer

    answers = []
    try:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _reader, writer in held:
            writer.write(b"POST /info HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\n\r\n")
        for _ in range(100):  # until the proxy has accepted both
            if listener.clients.open == 2:
                break
            await asyncio.sleep(0.01)
        answers.append(await ask())
        # a client of its own that sends at once, as curl does: the 503, never a reset
        for _ in range(30):
            answers.append(await asyncio.to_thread(exchange, port, health))
        held[0][1].close()
        for _ in range(100):
            if listener.clients.open < 2:
                break
            await asyncio.sleep(0.01)
        answers.append(await ask())
        held[1][1].close()
    finally:
        proxy.close()
    return answers


def test_the_open_connections_are_bounded() -> None:
    """Each may buffer 10 MiB for 30 s: beyond the bound, 503 at once, before any byte."""
    full, *blocking, served = asyncio.run(connection_cap())
    for answer in (full, *blocking):
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"holds 2 connections already" in answer
    assert served.startswith(b"HTTP/1.1 200 ")


def test_a_peer_of_another_app_gets_no_byte() -> None:
    """Same group and peer id as the catalog entry, from the mesh CA, but another app id."""
    status, received = asyncio.run(through_proxy(OTHER_APP))
    assert status == 502
    assert received == b""
    # the control: the same server with the right app id gets the tunnel and the request
    status, received = asyncio.run(through_proxy(APP))
    assert status == 502  # it never answers the tunnel
    assert received.startswith(b"CONNECT api:8080 HTTP/1.1\r\n")
    assert b"secret" in received
