"""Evidence -> verdict: the quote's signature, the event log's replay, dstack's TCB rules, policy.

The TEE kind comes from the policy, never from the evidence: a ``tee: tdx`` policy sends every
quote to DCAP and refuses a simulated one outright; a ``tee: simulated`` policy accepts only
quotes signed by its pinned platform key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from teemesh.attest.dcap import CollateralStore, DcapRejected, verify_dcap
from teemesh.attest.evidence import Analysis, Evidence, analyze
from teemesh.attest.policy import Claims, Policy, Reason, Refusal, check_policy
from teemesh.attest.simulated import (
    SimulatedQuoteInvalid,
    is_simulated,
    load_platform_public_key,
    platform_key_id,
    verify_simulated_quote,
)
from teemesh.errors import InputError


@dataclass(frozen=True)
class Verdict:
    ok: bool
    tee: str
    tcb_status: str | None
    advisory_ids: tuple[str, ...]
    reasons: tuple[Refusal, ...]
    analysis: Analysis
    device_id: bytes | None = None
    """sha256 of the PPID for TDX; of the platform key id for the simulated TEE (one machine)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tee": self.tee,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "reasons": [r.to_json() for r in self.reasons],
        }


def verify_evidence(
    evidence: Evidence,
    policy: Policy,
    *,
    collateral: CollateralStore | None = None,
    now: int,
) -> Verdict:
    analysis = analyze(evidence)
    quote = evidence.quote

    def refused(*reasons: Refusal, tcb: str | None = None, adv: tuple[str, ...] = ()) -> Verdict:
        return Verdict(False, policy.tee, tcb, adv, reasons, analysis)

    if policy.tee == "tdx":
        if is_simulated(quote):
            return refused(
                Refusal(Reason.QUOTE_INVALID, "a simulated quote is never accepted for tee: tdx")
            )
        if collateral is None:
            raise InputError(
                "TDX verification needs collateral (a file or cache folder)", field="collateral"
            )
        try:
            result = verify_dcap(quote, collateral.for_quote(quote), now)
        except DcapRejected as exc:
            return refused(Refusal(Reason.QUOTE_INVALID, f"DCAP verification failed: {exc}"))
        tcb_status, advisories = result.tcb_status, result.advisory_ids
        device_id = result.device_id
    else:
        assert policy.platform_key is not None
        platform = load_platform_public_key(policy.platform_key.encode())
        try:
            tcb_status = verify_simulated_quote(quote, platform)
        except SimulatedQuoteInvalid as exc:
            return refused(Refusal(Reason.QUOTE_INVALID, f"simulated quote refused: {exc}"))
        advisories = ()
        device_id = hashlib.sha256(platform_key_id(platform)).digest()

    reasons: list[Refusal] = []
    if quote.report.debug:
        reasons.append(
            Refusal(Reason.DEBUG_TD, "the TD runs in debug mode (td_attributes.DEBUG set)")
        )
    if any(quote.report.mr_signer_seam):
        reasons.append(
            Refusal(Reason.QUOTE_INVALID, "mr_signer_seam is not zero: not Intel's TDX module")
        )
    identity = analysis.identity
    if analysis.replay is not None and not analysis.replay_matches:
        regs = (
            ", ".join(f"rtmr{i}" for i in analysis.replay.mismatches(quote.report.rtmrs)) or "rtmr3"
        )
        reasons.append(
            Refusal(Reason.EVENT_LOG_MISMATCH, f"event log replay differs from the quote: {regs}")
        )
        identity_claim = None
    else:
        identity_claim = identity
    claims = Claims(
        tee=policy.tee,
        tcb_status=tcb_status,
        advisory_ids=advisories,
        report_data=quote.report.report_data,
        identity=identity_claim,
        mr_system=analysis.measurements.mr_system,
    )
    reasons.extend(check_policy(claims, policy))
    return Verdict(
        not reasons, policy.tee, tcb_status, advisories, tuple(reasons), analysis, device_id
    )
