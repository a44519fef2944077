"""Keeping this CVM admitted: attest through the guest agent, then renew at half-life.

Transient failures (a coordinator down, a spent nonce) are retried with backoff, on the next
coordinator; a policy refusal is retried slowly, since an operator may fix the policy. A renewal
that fails keeps the current certificate until it expires. Each new SVID is handed to
``on_svid`` (which swaps the TLS contexts; open connections keep theirs).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable

from teemesh.coordinator.client import AdmissionClient, Svid
from teemesh.errors import MeshError, Refused
from teemesh.logs import log_event
from teemesh.net.attested_https import ServerCheck
from teemesh.platform.agent_client import AgentClient
from teemesh.sidecar.metrics import Metrics

log = logging.getLogger("teemesh.sidecar.admission")
RETRY_FIRST, RETRY_MAX, REFUSED_RETRY = 0.5, 15.0, 30.0


class Admission:
    def __init__(
        self,
        urls: tuple[str, ...],
        coordinator_check: ServerCheck,
        agent: AgentClient,
        *,
        cluster: str,
        group: str,
        peer_id: str,
        metrics: Metrics,
        on_svid: Callable[[Svid], None],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.clients = [AdmissionClient(u, coordinator_check, agent) for u in urls]
        self.who = (cluster, group, peer_id)
        self.metrics = metrics
        self.on_svid = on_svid
        self.wall_clock = wall_clock
        self.svid: Svid | None = None
        self.state = "pending"
        self.last_error: str | None = None
        self.admitted = asyncio.Event()
        self._renew_now = asyncio.Event()
        self._next = 0

    def status(self) -> dict[str, object]:
        svid = self.svid
        return {
            "state": self.state,
            "spiffe_id": svid.spiffe_id if svid else None,
            "serial": f"{svid.certificate.serial_number:x}" if svid else None,
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
            client = self.clients[self._next]
            try:
                svid = await asyncio.to_thread(client.admit, *self.who)
            except Refused as exc:
                self._failed(str(exc), refused=True)
                await asyncio.sleep(REFUSED_RETRY)
                continue
            except MeshError as exc:
                self._failed(f"{client.https.url}: {exc}", refused=False)
                self._next = (self._next + 1) % len(self.clients)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self._accept(svid)
            with contextlib.suppress(TimeoutError):
                wait = max(svid.renew_after - self.wall_clock(), 1.0)
                await asyncio.wait_for(self._renew_now.wait(), wait)
            self._renew_now.clear()
            self._set_state("renewing")

    def renew_now(self) -> None:
        """Renew at once (an operator's request), without waiting for half-life."""
        self._renew_now.set()

    def _accept(self, svid: Svid) -> None:
        renewed = self.svid is not None
        self.svid, self.last_error = svid, None
        self.on_svid(svid)
        self._set_state("admitted")
        self.metrics.renewals.labels("ok").inc()
        self.metrics.cert_expiry.set(svid.expires_at)
        self.admitted.set()
        expires = dt.datetime.fromtimestamp(svid.expires_at, dt.UTC).isoformat()
        log_event(log, "renewed" if renewed else "admitted", spiffe_id=svid.spiffe_id,
                  serial=f"{svid.certificate.serial_number:x}", expires_at=expires)  # fmt: skip

    def _failed(self, error: str, *, refused: bool) -> None:
        self.last_error = error
        self.metrics.renewals.labels("refused" if refused else "failed").inc()
        if self.svid is not None and self.svid.expires_at > self.wall_clock():
            self._set_state("renewing")
        else:
            self._set_state("refused" if refused else ("expired" if self.svid else "pending"))
        log_event(log, "admission_failed", logging.WARNING, refused=refused, error=error)
