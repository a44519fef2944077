"""Health of the CVM's own backends: a TCP connect, or an HTTP GET expecting 2xx.

``HealthState`` is the pure part: ``rise`` passes in a row make a backend passing, ``fall``
failures make it critical, so one slow answer does not flap the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib

from teemesh.sidecar.config import HealthCheck


class HealthState:
    def __init__(self, check: HealthCheck, initial: str = "critical") -> None:
        self.check = check
        self.status = initial
        self._streak = 0
        self._last: bool | None = None

    def observe(self, ok: bool) -> bool:
        """Record one probe; True when the status changed."""
        self._streak = self._streak + 1 if ok == self._last else 1
        self._last = ok
        wanted = "passing" if ok else "critical"
        needed = self.check.rise if ok else self.check.fall
        if wanted != self.status and self._streak >= needed:
            self.status = wanted
            return True
        return False


async def probe(host: str, port: int, check: HealthCheck) -> bool:
    """One probe of ``<host>:<port>``; any failure or timeout is False."""
    try:
        return await asyncio.wait_for(_probe(host, port, check), check.timeout)
    except (OSError, TimeoutError, ValueError):
        return False


async def _probe(host: str, port: int, check: HealthCheck) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if check.http is None:
            return True
        writer.write(
            f"GET {check.http} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: teemesh-health\r\nConnection: close\r\n\r\n".encode()
        )
        status_line = await reader.readline()
        parts = status_line.split(b" ", 2)
        return len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1][:1] == b"2"
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
