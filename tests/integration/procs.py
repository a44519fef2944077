"""Real teemesh processes for integration tests: start, wait until ready, always stop by PID."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from etcdkit import stop_process


def teemesh_exe() -> str:
    exe = Path(sys.executable).parent / "teemesh"
    if not exe.exists():
        pytest.fail(f"the teemesh command is not installed next to {sys.executable}")
    return str(exe)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)


def run_teemesh(
    args: list[str], log: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a command that should exit by itself (a refused start, for instance)."""
    result = subprocess.run(
        [teemesh_exe(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    log.write_text(result.stdout + result.stderr)
    return result


@contextlib.contextmanager
def started(
    args: list[str], log: Path, ready: Callable[[], bool], timeout: float = 30
) -> Iterator[Proc]:
    with log.open("wb") as out:
        process = subprocess.Popen([teemesh_exe(), *args], stdout=out, stderr=subprocess.STDOUT)
    proc = Proc(process, log)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"teemesh {args[0]} exited with {process.returncode}: {proc.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"teemesh {args[0]} not ready after {timeout} s: {proc.output()}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.stop()
