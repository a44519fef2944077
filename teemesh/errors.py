"""One root exception, split by who is at fault.

    MeshError
     ├── InputError        the caller's input is wrong (a file, a request, a spec): fix the input
     │    └── EvidenceError   attestation evidence that cannot be parsed; names field and offset
     ├── Refused           well-formed, but policy says no (an attestation or boot not allowed)
     ├── PeerError         a remote party failed or misbehaved: maybe retry, maybe elsewhere
     └── InternalError     our own fault or the environment's: a bug to report

Foreign exceptions (ssl, cryptography, dcap-qvl, etcd) are translated at the edge that calls
them, with ``raise ... from exc``, so callers only ever catch these.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error teemesh raises on purpose."""


class InputError(MeshError):
    """The caller's input is malformed or inconsistent; ``field`` names where."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.problem = message
        super().__init__(f"{field}: {message}" if field else message)


class EvidenceError(InputError):
    """Attestation evidence (quote, event log, attestation blob) that cannot be parsed."""

    def __init__(self, message: str, *, field: str | None = None, offset: int | None = None):
        self.offset = offset
        where = field or "evidence"
        if offset is not None:
            where = f"{where} at offset {offset}"
        super().__init__(message, field=where)


class Refused(MeshError):
    """A well-formed request that policy refuses; ``reasons`` say why, each one a sentence."""

    def __init__(self, reasons: str | list[str] | tuple[str, ...]) -> None:
        self.reasons = (reasons,) if isinstance(reasons, str) else tuple(reasons)
        super().__init__("; ".join(self.reasons))


class PeerError(MeshError):
    """A remote party failed, refused, or sent something we cannot accept."""


class InternalError(MeshError):
    """An invariant of ours broke; never caused by the caller."""
