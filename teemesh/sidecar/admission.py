"""Keeping this CVM admitted: run the admission helper, then again at half-life.

The helper (``teemesh.sidecar.admit``, a child process) checks the coordinators' evidence and
attests; this side only schedules it and uses what it prints. Transient failures (a coordinator
down, a spent nonce) are retried with backoff, starting on the next coordinator; a policy
refusal is retried slowly, since an operator may fix the policy. A renewal that fails keeps the
current certificate until it expires. Each new SVID is handed to ``on_svid`` (which swaps the
TLS contexts; open connections keep theirs).

Catalog connections trust a coordinator by its certificate's fingerprint, which the helper
vouched for. A coordinator that restarted has a new certificate: meeting one asks the helper
to check the coordinators again (at most every ``VET_INTERVAL`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teemesh.errors import PeerError
from teemesh.logs import log_event
from teemesh.net.tls import PemPair
from teemesh.sidecar.metrics import Metrics

log = logging.getLogger("teemesh.sidecar.admission")
RETRY_FIRST, RETRY_MAX, REFUSED_RETRY = 0.5, 15.0, 30.0
HELPER_TIMEOUT = 120.0
VET_INTERVAL = 5.0


@dataclass(frozen=True)
class Svid:
    """The identity the helper brought back, as the TLS-context factory takes it."""

    identity: PemPair
    ca_certificate: str
    spiffe_id: str
    serial: str
    expires_at: int
    renew_after: int


class CoordinatorPins:
    """The server check for catalog connections: a coordinator certificate the helper vetted."""

    def __init__(self, on_unknown: Callable[[], None]) -> None:
        self.fingerprints: frozenset[str] = frozenset()
        self.on_unknown = on_unknown

    def __call__(self, der: bytes) -> None:
        if hashlib.sha256(der).hexdigest() not in self.fingerprints:
            self.on_unknown()
            raise PeerError("this coordinator's certificate has not been checked yet")


class Admission:
    def __init__(
        self,
        launch: Path,
        coordinators: int,
        *,
        metrics: Metrics,
        on_svid: Callable[[Svid], None],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.launch = launch
        self.coordinators = coordinators
        self.metrics = metrics
        self.on_svid = on_svid
        self.wall_clock = wall_clock
        self.pins = CoordinatorPins(self.vet_soon)
        self.svid: Svid | None = None
        self.state = "pending"
        self.last_error: str | None = None
        self.admitted = asyncio.Event()
        self._renew_now = asyncio.Event()
        self._vet_now = asyncio.Event()
        self._last_vet = 0.0
        self._next = 0

    def status(self) -> dict[str, object]:
        svid = self.svid
        return {
            "state": self.state,
            "spiffe_id": svid.spiffe_id if svid else None,
            "serial": svid.serial if svid else None,
            "expires_at": svid.expires_at if svid else None,
            "renew_after": svid.renew_after if svid else None,
            "last_error": self.last_error,
        }

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.set_admission(state)

    async def run(self) -> None:
        """Admit, then renew for ever; cancelled at shutdown."""
        delay = RETRY_FIRST
        while True:
            reply = await self._helper("--first", str(self._next))
            if reply.get("ok"):
                delay = RETRY_FIRST
                self._accept(reply)
                assert self.svid is not None
                await self._until(self.svid.renew_after)
                self._set_state("renewing")
            elif reply.get("refused"):
                self._failed(str(reply.get("error")), refused=True)
                await self._until(self.wall_clock() + REFUSED_RETRY)
            else:
                self._failed(str(reply.get("error")), refused=False)
                self._next = (self._next + 1) % self.coordinators
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    def renew_now(self) -> None:
        """Renew at once (an operator's request), without waiting for half-life."""
        self._renew_now.set()

    def vet_soon(self) -> None:
        """Have the coordinators checked again: one presented a certificate not seen yet."""
        self._vet_now.set()

    async def _until(self, deadline: float) -> None:
        """Sleep until ``deadline`` or a renewal request, vetting coordinators on request."""
        while (wait := deadline - self.wall_clock()) > 0:
            renew = asyncio.ensure_future(self._renew_now.wait())
            vet = asyncio.ensure_future(self._vet_now.wait())
            try:
                await asyncio.wait({renew, vet}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                renew.cancel()
                vet.cancel()
            if self._renew_now.is_set():
                self._renew_now.clear()
                return
            if self._vet_now.is_set():
                self._vet_now.clear()
                await self._vet()

    async def _vet(self) -> None:
        pause = self._last_vet + VET_INTERVAL - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        self._last_vet = time.monotonic()
        reply = await self._helper("--vet-only")
        if reply.get("ok"):
            log_event(log, "coordinators_checked", passed=len(self.pins.fingerprints))
        else:
            log_event(log, "coordinators_check_failed", logging.WARNING, error=reply.get("error"))

    async def _helper(self, *args: str) -> dict[str, Any]:
        """Run the helper; its JSON reply, or a failure naming what went wrong."""
        command = [sys.executable, "-m", "teemesh.sidecar.admit", str(self.launch), *args]
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), HELPER_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            return {"ok": False, "error": f"the admission helper ran over {HELPER_TIMEOUT:g} s"}
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        try:
            reply = json.loads(out)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            status = process.returncode
            return {"ok": False, "error": f"the admission helper failed (exit {status}; see log)"}
        pins = reply.get("pins")
        if isinstance(pins, list) and (pins or reply.get("ok")):
            self.pins.fingerprints = frozenset(str(p) for p in pins)
        return reply

    def _accept(self, reply: dict[str, Any]) -> None:
        svid = Svid(
            (reply["certificate"], reply["key"]), reply["ca_certificate"], reply["spiffe_id"],
            reply["serial"], int(reply["expires_at"]), int(reply["renew_after"]),
        )  # fmt: skip
        renewed = self.svid is not None
        self.svid, self.last_error = svid, None
        self.on_svid(svid)
        self._set_state("admitted")
        self.metrics.renewals.labels("ok").inc()
        self.metrics.cert_expiry.set(svid.expires_at)
        self.admitted.set()
        expires = dt.datetime.fromtimestamp(svid.expires_at, dt.UTC).isoformat()
        log_event(log, "renewed" if renewed else "admitted", spiffe_id=svid.spiffe_id,
                  serial=svid.serial, coordinator=reply.get("coordinator"),
                  expires_at=expires)  # fmt: skip

    def _failed(self, error: str, *, refused: bool) -> None:
        self.last_error = error
        self.metrics.renewals.labels("refused" if refused else "failed").inc()
        if self.svid is not None and self.svid.expires_at > self.wall_clock():
            self._set_state("renewing")
        else:
            self._set_state("refused" if refused else ("expired" if self.svid else "pending"))
        log_event(log, "admission_failed", logging.WARNING, refused=refused, error=error)
