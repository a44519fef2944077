from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import vector_path

from teemesh.attest.dcap import CollateralStore, DcapRejected, quote_fmspc, verify_dcap
from teemesh.attest.quote import parse_quote
from teemesh.errors import InputError

PINNED = 1751000000


def _quote(data: bytes | None = None):
    return parse_quote(data or vector_path("dcap-qvl/tdx_quote").read_bytes())


def _store() -> CollateralStore:
    return CollateralStore.open(vector_path("dcap-qvl/tdx_quote_collateral.json"))


def test_real_quote_verifies_up_to_date() -> None:
    quote = _quote()
    result = verify_dcap(quote, _store().for_quote(quote), PINNED)
    assert result.tcb_status == "UpToDate"
    assert result.advisory_ids == ()
    assert len(result.device_id) == 32


def test_tampered_quote_is_rejected() -> None:
    data = bytearray(vector_path("dcap-qvl/tdx_quote").read_bytes())
    data[600] ^= 1
    quote = _quote(bytes(data))
    with pytest.raises(DcapRejected, match="signature is invalid"):
        verify_dcap(quote, _store().for_quote(quote), PINNED)


def test_expired_collateral_is_rejected() -> None:
    quote = _quote()
    with pytest.raises(DcapRejected, match="Expired"):
        verify_dcap(quote, _store().for_quote(quote), 1_800_000_000)


def test_collateral_folder_is_indexed_by_fmspc(tmp_path: Path) -> None:
    text = vector_path("dcap-qvl/tdx_quote_collateral.json").read_text()
    (tmp_path / "anything.json").write_text(text)
    quote = _quote()
    assert quote_fmspc(quote) == "b0c06f000000"
    assert CollateralStore.open(tmp_path).for_quote(quote).fmspc == "b0c06f000000"


def test_missing_platform_collateral_names_the_fmspc() -> None:
    doc = json.loads(vector_path("dstack/verifier/quote-report.json").read_text())
    other = parse_quote(bytes.fromhex(doc["quote"]))
    with pytest.raises(
        InputError, match="no collateral for the quote's platform FMSPC 90c06f000000"
    ):
        _store().for_quote(other)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{}", "not dcap-qvl collateral"), ("nope", "invalid JSON at line 1")],
)
def test_bad_collateral_files(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(InputError, match=message):
        CollateralStore.open(tmp_path / "c.json")


def test_collateral_that_dcap_qvl_refuses(tmp_path: Path) -> None:
    doc = json.loads(vector_path("dcap-qvl/tdx_quote_collateral.json").read_text())
    doc["pck_crl"] = "zz"
    (tmp_path / "c.json").write_text(json.dumps(doc))
    quote = _quote()
    with pytest.raises(InputError, match="collateral rejected by dcap-qvl"):
        verify_dcap(quote, CollateralStore.open(tmp_path).for_quote(quote), PINNED)


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no \*\.json collateral"):
        CollateralStore.open(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        CollateralStore.open(tmp_path / "nope")
