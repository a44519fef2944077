"""Just enough DER to read a certificate OpenSSL has already verified: pure, bounded, no crypto.

The sidecar reads the peer's identity (serial, expiry, SPIFFE URI, app id) on every tunnel;
doing it here keeps the data plane free of the X.509 library (15 MB of resident memory) and
costs a few microseconds. Anything unexpected raises ``InputError`` naming what.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass

from teemesh.errors import InputError

SEQUENCE, INTEGER, OCTET_STRING, OID, BOOLEAN = 0x30, 0x02, 0x04, 0x06, 0x01
UTC_TIME, GENERALIZED_TIME = 0x17, 0x18
EXPLICIT_0, EXPLICIT_3, URI_NAME = 0xA0, 0xA3, 0x86
SUBJECT_ALT_NAME = "2.5.29.17"


def read_tlv(data: bytes, pos: int, end: int, *, field: str) -> tuple[int, int, int]:
    """(tag, value start, value end) of the element at ``pos``, which must end by ``end``."""
    if pos + 2 > end:
        raise InputError("truncated DER element", field=field)
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise InputError("multi-byte DER tags are not supported", field=field)
    pos += 2
    if first & 0x80:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise InputError("bad DER length", field=field)
        size = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    else:
        size = first
    if pos + size > end:
        raise InputError("DER element runs past its container", field=field)
    return tag, pos, pos + size


def children(data: bytes, start: int, end: int, *, field: str) -> list[tuple[int, int, int]]:
    """The elements inside a constructed value, in order."""
    out, pos = [], start
    while pos < end:
        tag, value, pos = read_tlv(data, pos, end, field=field)
        out.append((tag, value, pos))
    return out


def octet_string(der: bytes, *, field: str) -> bytes:
    """The content of a DER OCTET STRING that is the whole of ``der``."""
    tag, start, end = read_tlv(der, 0, len(der), field=field)
    if tag != OCTET_STRING or end != len(der):
        raise InputError("not a DER OCTET STRING", field=field)
    return der[start:end]


def oid_text(raw: bytes, *, field: str) -> str:
    if not raw or raw[-1] & 0x80:
        raise InputError("bad OBJECT IDENTIFIER", field=field)
    arcs, value = [], 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def der_time(tag: int, raw: bytes, *, field: str) -> int:
    """A UTCTime or GeneralizedTime (``...Z``, seconds precision) as a Unix timestamp."""
    text = raw.decode("ascii", errors="replace")
    if tag == UTC_TIME and len(text) == 13:
        year = int(text[:2]) if text[:2].isdigit() else -1
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    if len(text) != 15 or not text[:14].isdigit() or text[14] != "Z":
        raise InputError(f"unsupported certificate time {text!r}", field=field)
    parts = [int(text[i : i + n]) for i, n in ((0, 4), (4, 2), (6, 2), (8, 2), (10, 2), (12, 2))]
    if not (1 <= parts[1] <= 12 and 1 <= parts[2] <= 31 and parts[3] < 24 and parts[4] < 60):
        raise InputError(f"invalid certificate time {text!r}", field=field)
    return calendar.timegm((*parts, 0, 0, 0))


@dataclass(frozen=True)
class CertFields:
    """What the mesh reads of a certificate: who it names and how long it holds."""

    serial: int
    not_after: int
    uris: tuple[str, ...]
    extensions: dict[str, bytes]
    """Each extension's value (the content of its extnValue), by dotted OID."""


def read_cert(der: bytes, *, field: str = "certificate") -> CertFields:
    """Serial, notAfter, URI SANs and extensions of a DER certificate; nothing is verified."""
    tag, start, end = read_tlv(der, 0, len(der), field=field)
    if tag != SEQUENCE or end != len(der):
        raise InputError("not a DER certificate", field=field)
    tag, start, end = read_tlv(der, start, end, field=field)
    if tag != SEQUENCE:
        raise InputError("no TBSCertificate", field=field)
    parts = children(der, start, end, field=field)
    if parts and parts[0][0] == EXPLICIT_0:
        parts = parts[1:]
    if len(parts) < 6 or parts[0][0] != INTEGER or parts[3][0] != SEQUENCE:
        raise InputError("malformed TBSCertificate", field=field)
    serial = int.from_bytes(der[parts[0][1] : parts[0][2]], "big", signed=True)
    validity = children(der, parts[3][1], parts[3][2], field=field)
    if len(validity) != 2 or validity[1][0] not in (UTC_TIME, GENERALIZED_TIME):
        raise InputError("malformed validity", field=field)
    tag, start, end = validity[1]
    not_after = der_time(tag, der[start:end], field=field)
    extensions: dict[str, bytes] = {}
    for tag, start, end in parts[6:]:
        if tag == EXPLICIT_3:
            extensions = _extensions(der, start, end, field=field)
    uris: tuple[str, ...] = ()
    if SUBJECT_ALT_NAME in extensions:
        uris = _uri_names(extensions[SUBJECT_ALT_NAME], field=field)
    return CertFields(serial, not_after, uris, extensions)


def _extensions(der: bytes, start: int, end: int, *, field: str) -> dict[str, bytes]:
    tag, start, end = read_tlv(der, start, end, field=field)
    if tag != SEQUENCE:
        raise InputError("malformed extensions", field=field)
    out: dict[str, bytes] = {}
    for tag, ext_start, ext_end in children(der, start, end, field=field):
        items = children(der, ext_start, ext_end, field=field) if tag == SEQUENCE else []
        if len(items) == 3 and items[1][0] == BOOLEAN:
            items = [items[0], items[2]]
        if len(items) != 2 or items[0][0] != OID or items[1][0] != OCTET_STRING:
            raise InputError("malformed extension", field=field)
        oid = oid_text(der[items[0][1] : items[0][2]], field=field)
        if oid in out:
            raise InputError(f"extension {oid} appears twice", field=field)
        out[oid] = der[items[1][1] : items[1][2]]
    return out


def _uri_names(value: bytes, *, field: str) -> tuple[str, ...]:
    tag, start, end = read_tlv(value, 0, len(value), field=field)
    if tag != SEQUENCE or end != len(value):
        raise InputError("malformed subjectAltName", field=field)
    names = children(value, start, end, field=field)
    return tuple(value[s:e].decode("ascii", errors="replace") for t, s, e in names if t == URI_NAME)
