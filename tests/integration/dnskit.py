"""A real dnsmasq on loopback serving TXT records, for the gateway's custom domains.

It answers for ``.test`` only: other names there are NXDOMAIN, names elsewhere REFUSED. Waits
are bounded and the process is stopped by its PID; a missing dnsmasq fails (never skips).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest
from etcdkit import stop_process

WAIT = 10.0


def dnsmasq_exe() -> str:
    exe = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if exe is None:
        pytest.fail("dnsmasq is not installed: apt-get install dnsmasq-base (scripts/test does)")
    return exe


def free_udp_and_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = int(udp.getsockname()[1])
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", port))
    return port


def answers(port: int, name: str) -> bool:
    query = dns.message.make_query(name, "TXT")
    try:
        reply = dns.query.udp(query, "127.0.0.1", timeout=0.2, port=port)
    except (dns.exception.DNSException, OSError):
        return False
    return bool(reply.answer)


@contextlib.contextmanager
def dnsmasq(home: Path, records: dict[str, list[str]], extra: Sequence[str] = ()) -> Iterator[int]:
    """A dnsmasq serving ``records`` (TXT name -> strings) until the block ends; its port."""
    port = free_udp_and_tcp_port()
    log = home / "dnsmasq.log"
    args = [
        dnsmasq_exe(), "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=",
        "--no-resolv", "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
        f"--port={port}", "--local=/test/", "--log-facility=-", *extra,
        *(f"--txt-record={name},{','.join(values)}" for name, values in records.items()),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT
        probe = next(iter(records))
        while not answers(port, probe):
            if process.poll() is not None:
                pytest.fail(f"dnsmasq exited with {process.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"dnsmasq not answering after {WAIT} s: {log.read_text()}")
            time.sleep(0.05)
        yield port
    finally:
        stop_process(process)
