"""The coordinator's refusals, shared by its server side and its clients (sidecars), so a client
imports these without the store, the CA or the HTTP stack."""

from __future__ import annotations

from typing import TYPE_CHECKING

from teemesh.errors import MeshError, Refused

if TYPE_CHECKING:  # the sidecar's data plane imports this module, not the attestation core
    from teemesh.attest.policy import Reason, Refusal


class AdmissionRefused(Refused):
    """403 with reason codes; each also names the peer so the log line says who."""

    def __init__(self, refusals: tuple[Refusal, ...]) -> None:
        self.refusals = refusals
        super().__init__([f"{r.code}: {r.message}" for r in refusals])


def refuse(code: Reason, message: str) -> AdmissionRefused:
    from teemesh.attest.policy import Refusal  # noqa: PLC0415

    return AdmissionRefused((Refusal(code, message),))


class NotRegistered(MeshError):
    """The instance or the peer's lease is not there (any more); ``status`` is 404 or 410."""

    def __init__(self, message: str, status: int = 404) -> None:
        self.status = status
        super().__init__(message)


def lease_gone() -> NotRegistered:
    return NotRegistered("the peer's lease has expired: register its services again", 410)
