"""A bounded cursor over bytes: every short read names the field and offset."""

from __future__ import annotations

from teemesh.errors import EvidenceError


class Reader:
    """Reads fields in order; running out of bytes raises ``EvidenceError``, never IndexError."""

    def __init__(self, data: bytes, *, what: str, offset: int = 0) -> None:
        self.data = data
        self.what = what
        self.offset = offset

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or size > self.remaining:
            raise EvidenceError(
                f"truncated: needs {size} bytes, only {max(self.remaining, 0)} left",
                field=f"{self.what}.{field}",
                offset=self.offset,
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def fail(self, message: str, field: str, offset: int | None = None) -> EvidenceError:
        return EvidenceError(
            message, field=f"{self.what}.{field}", offset=self.offset if offset is None else offset
        )
