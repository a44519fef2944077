"""Test servers in a thread (``serving(server)`` answers until the block ends), and a raw
client for what a well-behaved HTTP client would not send."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import TypeVar

S = TypeVar("S", bound=socketserver.BaseServer)


@contextlib.contextmanager
def serving(server: S, poll: float = 0.5) -> Iterator[S]:
    """``server`` answering from a thread (checking for shutdown every ``poll`` s) until the
    block ends; then shut down and closed."""
    thread = threading.Thread(target=server.serve_forever, args=(poll,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class Hello(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 GET: ``hello from <the address it serves on> <path>``, so a reply names the
    instance that answered."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.answer(f"hello from {self.server.server_address[0]} {self.path}\n".encode())

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class HeaderEcho(Hello):
    """HTTP/1.1 GET: the request's headers (lower-case names) as JSON: what a backend saw."""

    def do_GET(self) -> None:
        self.answer(json.dumps({k.lower(): v for k, v in self.headers.items()}).encode())


def exchange(port: int, data: bytes, *, half_close: bool = False, timeout: float = 10) -> bytes:
    """Send ``data`` to ``127.0.0.1:port`` (then shut our side down, with ``half_close``) and
    read everything until the server closes; a reset raises."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    """Everything ``sock`` receives until the far end closes."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
