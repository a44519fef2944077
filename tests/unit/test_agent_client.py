"""The guest-agent client's transport: Unix socket or http:// URL, JSON both ways, PeerErrors.

A throwaway HTTP server in a thread stands in for the agent; what it saw is recorded.
"""

from __future__ import annotations

import json
import socket
import socketserver
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from serverkit import serving

from teemesh.errors import PeerError
from teemesh.platform.agent_client import AgentClient, default_endpoint

Reply = tuple[int, bytes]


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append((self.path, self.headers.get("Host"), self.headers, body))
        status, content = self.server.reply(self.path, body)
        self.send_response(status)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *args: object) -> None:
        pass

    def address_string(self) -> str:
        return "agent"


class _Tcp(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True


class _Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _echo(path: str, body: bytes) -> Reply:
    return 200, json.dumps({"path": path, "args": json.loads(body)}).encode()


@contextmanager
def _serve(server: Any, reply: Any = _echo) -> Iterator[Any]:
    server.seen = []
    server.reply = reply
    with serving(server, poll=0.05):
        yield server


@pytest.fixture
def unix_agent(tmp_path: Path) -> Iterator[Any]:
    with _serve(_Unix(str(tmp_path / "agent.sock"), _Handler)) as server:
        server.endpoint = str(tmp_path / "agent.sock")
        yield server


@pytest.fixture
def tcp_agent() -> Iterator[Any]:
    with _serve(_Tcp(("127.0.0.1", 0), _Handler)) as server:
        server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        yield server


def test_unix_socket_posts_json_with_the_dstack_host(unix_agent: Any) -> None:
    with AgentClient(unix_agent.endpoint) as agent:
        reply = agent.call("GetKey", {"path": "é/x", "purpose": ""})
        assert agent.call("Info") == {"path": "/Info", "args": {}}
    assert reply == {"path": "/GetKey", "args": {"path": "é/x", "purpose": ""}}
    path, host, headers, body = unix_agent.seen[0]
    assert (path, host) == ("/GetKey", "dstack")
    assert headers["Content-Type"] == "application/json"
    assert body == '{"path":"é/x","purpose":""}'.encode()


def test_http_url_with_and_without_a_path_prefix(tcp_agent: Any) -> None:
    with AgentClient(tcp_agent.endpoint) as agent:
        assert agent.call("Info")["path"] == "/Info"
    with AgentClient(tcp_agent.endpoint + "/prpc/") as agent:
        assert agent.call("Attest", {"report_data": "00"})["path"] == "/prpc/Attest"
    assert tcp_agent.seen[0][1] == tcp_agent.endpoint.removeprefix("http://")


def test_typed_helpers_parse_hex_replies(unix_agent: Any) -> None:
    replies = {"/Attest": {"attestation": "0a0b"}, "/GetKey": {"key": "zz"}, "/Info": [1]}
    unix_agent.reply = lambda path, _body: (200, json.dumps(replies[path]).encode())
    agent = AgentClient(unix_agent.endpoint)
    assert agent.attest(b"\x01" * 64) == b"\x0a\x0b"
    assert json.loads(unix_agent.seen[0][3]) == {"report_data": "01" * 64}
    with pytest.raises(PeerError, match=r"^guest agent .* GetKey: .*GetKey\.key"):
        agent.get_key("a")
    with pytest.raises(PeerError, match="Info: expected a JSON object"):
        agent.info()


@pytest.mark.parametrize(
    ("status", "content", "message"),
    [
        (400, b'{"error": "bad app_id"}', "GetKey: HTTP 400: 'bad app_id'"),
        (500, b"[1, 2]", r"GetKey: HTTP 500: \[1, 2\]"),
        (200, b"<html>", "GetKey: HTTP 200, not JSON"),
        (502, b"", "GetKey: HTTP 502, not JSON"),
        (200, b"\xff", "GetKey: HTTP 200, not JSON"),
    ],
)
def test_refusals_and_garbage_are_peer_errors(
    unix_agent: Any, status: int, content: bytes, message: str
) -> None:
    unix_agent.reply = lambda _path, _body: (status, content)
    with pytest.raises(PeerError, match=f"^guest agent {unix_agent.endpoint} {message}$"):
        AgentClient(unix_agent.endpoint).call("GetKey")


def test_unreachable_endpoints_are_peer_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.sock")
    with pytest.raises(PeerError, match=rf"^guest agent {missing} Info: .*No such file"):
        AgentClient(missing).call("Info")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(PeerError, match=rf"^guest agent http://127.0.0.1:{port} Info: "):
        AgentClient(f"http://127.0.0.1:{port}").call("Info")
    with pytest.raises(PeerError, match=r"^guest agent http://host:port Info: .*port"):
        AgentClient("http://host:port").call("Info")  # a bad URL too, when first used


def test_a_silent_agent_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(path)
        silent.listen()
        with pytest.raises(PeerError, match=rf"^guest agent {path} Info: timed out$"):
            AgentClient(path, timeout=0.2).call("Info")


def test_a_closed_client_refuses_to_send(unix_agent: Any) -> None:
    agent = AgentClient(unix_agent.endpoint)
    agent.close()
    with pytest.raises(RuntimeError, match="closed"):
        agent.call("Info")


def test_default_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSTACK_SIMULATOR_ENDPOINT", raising=False)
    assert default_endpoint() == "/var/run/dstack.sock"
    monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", "http://127.0.0.1:8090")
    assert default_endpoint() == "http://127.0.0.1:8090"
    assert AgentClient().endpoint == "http://127.0.0.1:8090"
