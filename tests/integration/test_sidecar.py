"""Sidecars as users run them: real coordinator, agents, sidecar processes and backends."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
from meshkit import DB_COMPOSE, WEB_COMPOSE, Mesh
from sidecarkit import mesh_policy, run_sidecar, wait_for

pytestmark = pytest.mark.integration


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"hello from {self.server.server_address[0]} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_backend(host: str, port: int) -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer((host, port), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def http_get(sock: socket.socket, path: str, host: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_http_by_route_name(tmp_path):
    mesh = Mesh(tmp_path)
    mesh_policy(mesh, {"web": (WEB_COMPOSE, []), "db": (DB_COMPOSE, ["api"])})
    agent_cm, agent_sock = mesh.coordinator_agent()
    with agent_cm, mesh.start_coordinator(agent_sock, "c0"):
        from procs import free_port

        port = free_port()
        with (
            http_backend("127.0.0.1", port),
            run_sidecar(mesh, "db-0", DB_COMPOSE, "db", backends={"api": {"port": port}}),
            run_sidecar(
                mesh, "web-0", WEB_COMPOSE, "web", routes={"api": {"backend": "api", "port": port}}
            ) as web,
        ):
            wait_for(
                "the api route to have an instance",
                lambda: web.status()["routes"][0]["instances"] == ["db-0"],
            )
            with web.connect("api", port) as sock:
                reply = http_get(sock, "/hello", "api")
            assert reply.startswith(b"HTTP/1.1 200"), reply
            assert reply.endswith(b"hello from 127.0.0.1 /hello\n")
