from __future__ import annotations

import dcap_qvl
import pytest
from conftest import vector_path

from teemesh.attest.quote import TD10_BODY_LEN, TD15_BODY_LEN, parse_quote
from teemesh.errors import EvidenceError

FIELDS = ("mr_config_id", "mr_owner", "mr_owner_config", "rtmr0", "rtmr1", "rtmr2", "rtmr3")


def _quote_bytes(name: str) -> bytes:
    return vector_path(name).read_bytes()


def test_simulator_vector_fields_match_expected(expected: dict) -> None:
    want = expected["simulator/attestation.bin"]["quote"]
    data = _quote_bytes("dstack/simulator/attestation.quote.bin")
    quote = parse_quote(data)
    assert len(data) == want["len"]
    assert quote.header.version == want["version"]
    assert quote.header.att_key_type == want["att_key_type"]
    assert f"0x{quote.header.tee_type:x}" == want["tee_type"]
    assert quote.header.qe_vendor_id.hex() == want["qe_vendor_id"]
    assert len(quote.signature.encode()) == want["signature_data_len"]
    assert len(data) - len(quote.raw) == want["trailing_zero_bytes"]
    assert quote.report.mr_td.hex() == want["mrtd"]
    for name in (*FIELDS, "report_data", "td_attributes", "xfam", "tee_tcb_svn"):
        assert getattr(quote.report, name).hex() == want[name], name
    assert quote.from_intel_qe and not quote.report.debug


def test_dcap_vector_fields_match_dcap_qvl() -> None:
    """expected.json has no entry for dcap-qvl's quote: dcap-qvl's own parser is the reference."""
    data = _quote_bytes("dcap-qvl/tdx_quote")
    quote = parse_quote(data)
    reference = dcap_qvl.parse_quote(data)
    header = reference.header
    assert (quote.header.version, quote.header.att_key_type) == (4, 2)
    assert quote.header.version == header.version
    assert quote.header.att_key_type == header.attestation_key_type
    assert quote.header.tee_type == header.tee_type == 0x81
    assert (quote.header.qe_svn, quote.header.pce_svn) == (header.qe_svn, header.pce_svn)
    assert quote.header.qe_vendor_id == bytes(header.qe_vendor_id)
    assert quote.header.user_data == bytes(header.user_data)
    theirs = reference.report
    renamed = {"rtmr0": "rt_mr0", "rtmr1": "rt_mr1", "rtmr2": "rt_mr2", "rtmr3": "rt_mr3"}
    names = (
        *FIELDS,
        *("mr_td", "mr_seam", "mr_signer_seam", "seam_attributes"),
        *("report_data", "td_attributes", "xfam", "tee_tcb_svn"),
    )
    for name in names:
        assert getattr(quote.report, name) == bytes(getattr(theirs, renamed.get(name, name))), name
    assert quote.from_intel_qe and not quote.report.debug


def test_get_quote_vector_matches_expected(vectors, expected) -> None:
    import json

    doc = json.loads((vectors / "dstack/verifier/quote-report.json").read_text())
    quote = parse_quote(bytes.fromhex(doc["quote"]))
    want = expected["verifier/quote-report.json"]["quote"]
    assert quote.report.rtmr3.hex() == want["rtmr3"]
    assert quote.report.report_data.hex() == want["report_data"]


def test_dcap_vector_has_pck_chain() -> None:
    quote = parse_quote(_quote_bytes("dcap-qvl/tdx_quote"))
    assert quote.signature.cert_data_type == 6
    assert quote.signature.pck_chain_pem is not None
    assert quote.signature.pck_chain_pem.count(b"BEGIN CERTIFICATE") == 3


def test_encode_round_trip_is_byte_identical() -> None:
    data = _quote_bytes("dcap-qvl/tdx_quote")
    quote = parse_quote(data)
    rebuilt = quote.header.encode() + quote.report.encode()
    sig = quote.signature.encode()
    rebuilt += len(sig).to_bytes(4, "little") + sig
    assert rebuilt == quote.raw == data[: len(quote.raw)]
    assert not data[len(quote.raw) :].strip(b"\0")


@pytest.mark.parametrize(
    ("cut", "field", "offset"),
    [
        (0, "header.version", 0),
        (10, "header.pce_svn", 10),
        (200, "td_report.mr_td", 184),
        (530, "td_report.rtmr3", 520),
        (600, "td_report.report_data", 568),
        (633, "signature_data_len", 632),
        (700, "signature_data", 636),
    ],
)
def test_truncation_names_field_and_offset(cut: int, field: str, offset: int) -> None:
    data = _quote_bytes("dcap-qvl/tdx_quote")
    with pytest.raises(EvidenceError) as err:
        parse_quote(data[:cut])
    assert field in str(err.value)
    assert f"offset {offset}" in str(err.value)


def test_non_zero_trailing_bytes_are_refused() -> None:
    data = bytearray(_quote_bytes("dcap-qvl/tdx_quote"))
    data[-5] = 1
    with pytest.raises(EvidenceError, match=f"offset {len(data) - 5}: unexpected non-zero bytes"):
        parse_quote(bytes(data))


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"\x03\x00", "unsupported quote version 3"),
        (4, b"\x00\x00\x00\x00", "tee_type 0x0 is not TDX"),
        (2, b"\x03\x00", "attestation key type 3"),
    ],
)
def test_bad_header_fields(offset: int, value: bytes, message: str) -> None:
    data = bytearray(_quote_bytes("dcap-qvl/tdx_quote"))
    data[offset : offset + len(value)] = value
    with pytest.raises(EvidenceError, match=message):
        parse_quote(bytes(data))


def test_oversized_quote_refused() -> None:
    with pytest.raises(EvidenceError, match="too large"):
        parse_quote(b"\x04\x00" + bytes(300 * 1024))


def _v5(data: bytes, body_type: int) -> bytes:
    """Re-wrap a v4 quote as v5 with the given body type (TD1.5 gets zero extra fields)."""
    v4 = parse_quote(data)
    body = v4.report.encode()
    size = TD10_BODY_LEN
    if body_type == 3:
        body += bytes(TD15_BODY_LEN - TD10_BODY_LEN)
        size = TD15_BODY_LEN
    header = b"\x05\x00" + v4.header.encode()[2:]
    sig = v4.signature.encode()
    return (
        header
        + body_type.to_bytes(2, "little")
        + size.to_bytes(4, "little")
        + body
        + len(sig).to_bytes(4, "little")
        + sig
    )


@pytest.mark.parametrize("body_type", [2, 3])
def test_v5_quotes_parse(body_type: int) -> None:
    data = _quote_bytes("dstack/simulator/attestation.quote.bin")
    quote = parse_quote(_v5(data, body_type))
    assert quote.header.version == 5
    assert quote.report.rtmr3 == parse_quote(data).report.rtmr3
    assert (quote.report.mr_service_td is not None) == (body_type == 3)


def test_v5_unknown_body_type_refused() -> None:
    data = _v5(_quote_bytes("dstack/simulator/attestation.quote.bin"), 2)
    bad = data[:48] + (9).to_bytes(2, "little") + data[50:]
    with pytest.raises(EvidenceError, match="body type 9"):
        parse_quote(bad)
