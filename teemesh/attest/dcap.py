"""Intel DCAP verification of real TDX quotes, through dcap-qvl with stored collateral.

Collateral (TCB info, QE identity, CRLs) expires; it is read from a file or a cache folder and
never fetched here, and tests pin the verification time to the collateral's validity window.
dcap-qvl is imported only when a TDX quote is checked: processes that never see one (the sidecar
on a simulated mesh) do not load it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teemesh.attest.quote import Quote
from teemesh.encoding import load_json
from teemesh.errors import InputError

MAX_COLLATERAL_LEN = 1024 * 1024


class DcapRejected(Exception):
    """dcap-qvl refused the quote; the message is dcap-qvl's reason."""


@dataclass(frozen=True)
class DcapResult:
    tcb_status: str
    advisory_ids: tuple[str, ...]
    device_id: bytes
    """sha256 of the platform's PPID, as dstack names a machine."""


@dataclass(frozen=True)
class Collateral:
    fmspc: str
    text: str
    source: str


class CollateralStore:
    """Collateral from one JSON file, or a folder of them indexed by each file's FMSPC."""

    def __init__(self, entries: dict[str, Collateral]) -> None:
        self._by_fmspc = entries

    @classmethod
    def open(cls, path: Path) -> CollateralStore:
        if path.is_dir():
            files = sorted(path.glob("*.json"))
            if not files:
                raise InputError("no *.json collateral files in the folder", field=str(path))
        elif path.is_file():
            files = [path]
        else:
            raise InputError("no such file or folder", field=str(path))
        entries: dict[str, Collateral] = {}
        for file in files:
            item = _read_collateral(file)
            entries.setdefault(item.fmspc, item)
        return cls(entries)

    def for_quote(self, quote: Quote) -> Collateral:
        fmspc = quote_fmspc(quote)
        found = self._by_fmspc.get(fmspc)
        if found is None:
            have = ", ".join(sorted(self._by_fmspc)) or "none"
            raise InputError(
                f"no collateral for the quote's platform FMSPC {fmspc} (have: {have})",
                field="collateral",
            )
        return found


def _read_collateral(file: Path) -> Collateral:
    try:
        if file.stat().st_size > MAX_COLLATERAL_LEN:
            raise InputError("collateral file too large", field=str(file))
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read collateral: {exc}", field=str(file)) from exc
    doc: Any = load_json(text, field=str(file))
    try:
        tcb_info = load_json(doc["tcb_info"], field=f"{file}: tcb_info")
        fmspc = str(tcb_info["fmspc"]).lower()
    except (KeyError, TypeError) as exc:
        raise InputError(
            "not dcap-qvl collateral JSON (needs tcb_info with an fmspc)", field=str(file)
        ) from exc
    return Collateral(fmspc, text, str(file))


def quote_fmspc(quote: Quote) -> str:
    import dcap_qvl  # noqa: PLC0415

    pem = quote.signature.pck_chain_pem
    if not pem:
        raise InputError("the quote carries no PCK certificate chain", field="quote")
    try:
        ext = dcap_qvl.parse_pck_extension_from_pem(pem)
    except ValueError as exc:
        raise InputError(f"unreadable PCK certificate: {exc}", field="quote") from exc
    return bytes(ext.fmspc).hex()


def verify_dcap(quote: Quote, collateral: Collateral, now: int) -> DcapResult:
    """Verify the Intel signature chain and TCB level; raise ``DcapRejected`` on refusal."""
    import dcap_qvl  # noqa: PLC0415

    if not 0 <= now < 2**63:
        raise InputError(f"{now} is not a UNIX time", field="now")
    try:
        parsed = dcap_qvl.QuoteCollateralV3.from_json(collateral.text)
    except ValueError as exc:
        raise InputError(
            f"collateral rejected by dcap-qvl: {exc}", field=collateral.source
        ) from exc
    try:
        report = dcap_qvl.verify(quote.raw, parsed, now)
    except ValueError as exc:
        message = str(exc).removeprefix("Verification failed: ")
        raise DcapRejected(message) from exc
    return DcapResult(
        tcb_status=str(report.status),
        advisory_ids=tuple(str(a) for a in report.advisory_ids),
        device_id=hashlib.sha256(bytes(report.ppid)).digest(),
    )
