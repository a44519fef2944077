from __future__ import annotations

import json

import pytest
from conftest import vector_path

from teemesh.attest.dcap import CollateralStore
from teemesh.attest.dstack import KeyProvider, compose_hash
from teemesh.attest.evidence import load_evidence
from teemesh.attest.policy import Policy, Reason
from teemesh.attest.simulated import OsImage, PlatformKey, SimulatedCvm
from teemesh.attest.verify import verify_evidence
from teemesh.errors import InputError

PINNED = 1751000000
COMPOSE = b'{"name": "api"}\n'


@pytest.fixture(scope="module")
def platform() -> PlatformKey:
    return PlatformKey.generate()


def _sim_policy(platform: PlatformKey, **kw) -> Policy:
    return Policy(tee="simulated", platform_key=platform.public_pem().decode(), **kw)


def _sim_evidence(platform: PlatformKey, **kw):
    cvm = SimulatedCvm(platform, OsImage("img"), COMPOSE, KeyProvider("kms", "aa"), **kw)
    return load_evidence(json.dumps(cvm.get_quote_reply(b"rd")).encode()), cvm


def _codes(verdict) -> set[Reason]:
    return {r.code for r in verdict.reasons}


def test_real_tdx_quote_accepted_with_collateral() -> None:
    evidence = load_evidence(vector_path("dcap-qvl/tdx_quote").read_bytes())
    store = CollateralStore.open(vector_path("dcap-qvl"))
    verdict = verify_evidence(evidence, Policy(), collateral=store, now=PINNED)
    assert verdict.ok and verdict.tcb_status == "UpToDate"
    assert verdict.to_json() == {
        "ok": True,
        "tee": "tdx",
        "tcb_status": "UpToDate",
        "advisory_ids": [],
        "reasons": [],
    }


def test_tdx_without_collateral_is_bad_input() -> None:
    evidence = load_evidence(vector_path("dcap-qvl/tdx_quote").read_bytes())
    with pytest.raises(InputError, match="needs collateral"):
        verify_evidence(evidence, Policy(), now=PINNED)


def test_simulated_quote_refused_by_tdx_policy(platform) -> None:
    evidence, _ = _sim_evidence(platform)
    verdict = verify_evidence(evidence, Policy(), collateral=None, now=PINNED)
    assert not verdict.ok and _codes(verdict) == {Reason.QUOTE_INVALID}
    assert "simulated" in verdict.reasons[0].message


def test_simulated_quote_accepted_by_its_platform(platform) -> None:
    evidence, _ = _sim_evidence(platform)
    policy = _sim_policy(
        platform,
        compose_hashes=(compose_hash(COMPOSE).hex(),),
        os_images=(OsImage("img").os_image_hash.hex(),),
        key_providers=({"name": "kms", "id": "aa"},),
        report_data=b"rd".hex(),
    )
    verdict = verify_evidence(evidence, policy, now=PINNED)
    assert verdict.ok, verdict.reasons
    assert verdict.tee == "simulated"


def test_real_quote_refused_by_simulated_policy(platform) -> None:
    evidence = load_evidence(vector_path("dcap-qvl/tdx_quote").read_bytes())
    verdict = verify_evidence(evidence, _sim_policy(platform), now=PINNED)
    assert _codes(verdict) == {Reason.QUOTE_INVALID}


def test_other_platform_refused(platform) -> None:
    evidence, _ = _sim_evidence(PlatformKey.generate())
    verdict = verify_evidence(evidence, _sim_policy(platform), now=PINNED)
    assert _codes(verdict) == {Reason.QUOTE_INVALID}
    assert "another platform key" in verdict.reasons[0].message


def test_debug_td_refused(platform) -> None:
    evidence, _ = _sim_evidence(platform, debug=True)
    assert _codes(verify_evidence(evidence, _sim_policy(platform), now=PINNED)) == {Reason.DEBUG_TD}


def test_out_of_date_tcb_refused_by_default(platform) -> None:
    evidence, _ = _sim_evidence(platform, tcb_status="OutOfDate")
    verdict = verify_evidence(evidence, _sim_policy(platform), now=PINNED)
    assert _codes(verdict) == {Reason.TCB_STATUS_NOT_ALLOWED}
    assert verdict.tcb_status == "OutOfDate"


def test_forged_event_log_is_a_mismatch_and_identity_is_not_trusted(platform) -> None:
    _, cvm = _sim_evidence(platform)
    reply = cvm.get_quote_reply(b"rd")
    log = json.loads(reply["event_log"])
    forged = next(e for e in log if e["event"] == "compose-hash")
    forged["event_payload"] = "ee" * 32
    forged["digest"] = ""
    reply["event_log"] = json.dumps(log)
    evidence = load_evidence(json.dumps(reply).encode())
    policy = _sim_policy(platform, compose_hashes=("ee" * 32,))
    verdict = verify_evidence(evidence, policy, now=PINNED)
    assert _codes(verdict) == {Reason.EVENT_LOG_MISMATCH}
    assert "rtmr3" in verdict.reasons[0].message


def test_policy_refusals_listed_together(platform) -> None:
    evidence, _ = _sim_evidence(platform)
    policy = _sim_policy(platform, compose_hashes=(), app_ids=("00" * 20,), report_data="ff")
    verdict = verify_evidence(evidence, policy, now=PINNED)
    assert _codes(verdict) == {
        Reason.COMPOSE_HASH_NOT_ALLOWED,
        Reason.APP_ID_NOT_ALLOWED,
        Reason.REPORT_DATA_MISMATCH,
    }
