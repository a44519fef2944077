"""Intel TDX quotes (v4, and v5 with TD 1.0 / TD 1.5 bodies): parse and encode.

One byte layout serves real quotes and the simulated TEE's quotes, so the verifier's parsing
path is the same for both. Offsets follow Intel's DCAP quote library; the report body of a v4
quote starts at byte 48 and ``report_data`` sits at 568..632.
"""

from __future__ import annotations

from dataclasses import dataclass

from teemesh.attest._reader import Reader
from teemesh.errors import EvidenceError

HEADER_LEN = 48
TDX_TEE_TYPE = 0x81
ATT_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
MAX_QUOTE_LEN = 256 * 1024
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6
QE_REPORT_LEN = 384

# (field, size) in wire order; TD 1.5 appends the last two.
_TD10_LAYOUT: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", 64),
)
_TD15_EXTRA: tuple[tuple[str, int], ...] = (("tee_tcb_svn2", 16), ("mr_service_td", 48))
TD10_BODY_LEN = sum(size for _, size in _TD10_LAYOUT)  # 584
TD15_BODY_LEN = TD10_BODY_LEN + sum(size for _, size in _TD15_EXTRA)  # 648
_BODY_TYPE_TD10 = 2
_BODY_TYPE_TD15 = 3


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    def encode(self) -> bytes:
        return (
            self.version.to_bytes(2, "little")
            + self.att_key_type.to_bytes(2, "little")
            + self.tee_type.to_bytes(4, "little")
            + self.qe_svn.to_bytes(2, "little")
            + self.pce_svn.to_bytes(2, "little")
            + self.qe_vendor_id
            + self.user_data
        )


@dataclass(frozen=True)
class TdReport:
    """The TD report body: what the TDX module measured about the guest."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def debug(self) -> bool:
        """TUD.DEBUG, bit 0 of td_attributes: the host can read this TD's memory."""
        return bool(self.td_attributes[0] & 1)

    def encode(self) -> bytes:
        layout = _TD10_LAYOUT + (_TD15_EXTRA if self.mr_service_td is not None else ())
        out = b""
        for name, size in layout:
            value = getattr(self, name)
            if len(value) != size:
                raise ValueError(f"td_report.{name} must be {size} bytes, got {len(value)}")
            out += value
        return out


@dataclass(frozen=True)
class QuoteSignature:
    """The v4 ECDSA signature section; ``cert_data`` is kept raw, ``pck_chain_pem`` extracted."""

    signature: bytes
    attestation_key: bytes
    cert_data_type: int
    cert_data: bytes
    pck_chain_pem: bytes | None

    def encode(self) -> bytes:
        return (
            self.signature
            + self.attestation_key
            + self.cert_data_type.to_bytes(2, "little")
            + len(self.cert_data).to_bytes(4, "little")
            + self.cert_data
        )


@dataclass(frozen=True)
class Quote:
    header: QuoteHeader
    report: TdReport
    signature: QuoteSignature
    raw: bytes
    """The quote's own bytes, without trailing padding."""
    signed_len: int
    """Header and body: the bytes the attestation key signs."""

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[: self.signed_len]

    @property
    def from_intel_qe(self) -> bool:
        return self.header.qe_vendor_id == INTEL_QE_VENDOR_ID


def parse_quote(data: bytes) -> Quote:
    """Parse a TDX quote; trailing zero bytes are tolerated, anything else is an error."""
    if len(data) > MAX_QUOTE_LEN:
        raise EvidenceError(f"quote too large: {len(data)} bytes (max {MAX_QUOTE_LEN})")
    r = Reader(data, what="quote")
    header = QuoteHeader(
        version=r.u16("header.version"),
        att_key_type=r.u16("header.att_key_type"),
        tee_type=r.u32("header.tee_type"),
        qe_svn=r.u16("header.qe_svn"),
        pce_svn=r.u16("header.pce_svn"),
        qe_vendor_id=r.take(16, "header.qe_vendor_id"),
        user_data=r.take(20, "header.user_data"),
    )
    if header.version not in (4, 5):
        raise r.fail(f"unsupported quote version {header.version} (4 or 5)", "header.version", 0)
    if header.tee_type != TDX_TEE_TYPE:
        raise r.fail(f"tee_type 0x{header.tee_type:x} is not TDX (0x81)", "header.tee_type", 4)
    if header.att_key_type != ATT_KEY_ECDSA_P256:
        raise r.fail(
            f"attestation key type {header.att_key_type} is not ECDSA-P256 (2)",
            "header.att_key_type",
            2,
        )
    td15 = False
    if header.version == 5:
        body_type = r.u16("body_type")
        body_size = r.u32("body_size")
        expected = {_BODY_TYPE_TD10: TD10_BODY_LEN, _BODY_TYPE_TD15: TD15_BODY_LEN}.get(body_type)
        if expected is None:
            raise r.fail(f"body type {body_type} is not a TD report (2 or 3)", "body_type", 48)
        if body_size != expected:
            raise r.fail(f"body size {body_size}, expected {expected}", "body_size", 50)
        td15 = body_type == _BODY_TYPE_TD15
    layout = _TD10_LAYOUT + (_TD15_EXTRA if td15 else ())
    report = TdReport(**{name: r.take(size, f"td_report.{name}") for name, size in layout})
    signed_len = r.offset
    sig_len = r.u32("signature_data_len")
    sig = _parse_signature(Reader(r.take(sig_len, "signature_data"), what="quote.signature_data"))
    end = r.offset
    tail = data[end:]
    if tail.strip(b"\0"):
        first = end + next(i for i, b in enumerate(tail) if b)
        raise EvidenceError(
            "unexpected non-zero bytes after the quote", field="quote", offset=first
        )
    return Quote(header, report, sig, bytes(data[:end]), signed_len)


def _parse_signature(r: Reader) -> QuoteSignature:
    signature = r.take(64, "ecdsa_signature")
    attestation_key = r.take(64, "attestation_key")
    cert_type = r.u16("cert_data_type")
    cert_size = r.u32("cert_data_size")
    cert_data = r.take(cert_size, "cert_data")
    pck = _pck_chain(cert_type, cert_data)
    return QuoteSignature(signature, attestation_key, cert_type, cert_data, pck)


def _pck_chain(cert_type: int, cert_data: bytes) -> bytes | None:
    """The PEM PCK chain: directly (type 5) or nested in QE report data (type 6)."""
    if cert_type == CERT_DATA_PCK_CHAIN:
        return cert_data
    if cert_type != CERT_DATA_QE_REPORT:
        return None
    r = Reader(cert_data, what="quote.signature_data.qe_report_data")
    r.take(QE_REPORT_LEN, "qe_report")
    r.take(64, "qe_report_signature")
    r.take(r.u16("qe_auth_data_size"), "qe_auth_data")
    inner_type = r.u16("pck_cert_data_type")
    inner = r.take(r.u32("pck_cert_data_size"), "pck_cert_data")
    if inner_type != CERT_DATA_PCK_CHAIN:
        raise r.fail(f"nested certification data type {inner_type}, expected 5", "pck_cert_data")
    return inner
