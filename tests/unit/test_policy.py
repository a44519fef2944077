"""One row per policy field: a value that admits, a value that refuses, and the reason code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from teemesh.attest.dstack import DstackIdentity, KeyProvider
from teemesh.attest.policy import Claims, Policy, Reason, check_policy, load_policy
from teemesh.config import ConfigError, parse_model

COMPOSE = "aa" * 32
APP = "bb" * 20
OS = "cc" * 32
MR_SYSTEM = "dd" * 32
KP_ID = "3059"

IDENTITY = DstackIdentity(
    app_id=bytes.fromhex(APP),
    compose_hash=bytes.fromhex(COMPOSE),
    instance_id=b"\x01" * 20,
    key_provider=KeyProvider("kms", KP_ID),
    key_provider_payload=KeyProvider("kms", KP_ID).payload(),
    os_image_hash=bytes.fromhex(OS),
    app_events=(),
)
CLAIMS = Claims(
    tee="tdx",
    tcb_status="UpToDate",
    advisory_ids=(),
    report_data=b"nonce".ljust(64, b"\0"),
    identity=IDENTITY,
    mr_system=bytes.fromhex(MR_SYSTEM),
)

TABLE = [
    # field, admitting value, refusing value, reason
    ("compose_hashes", ["0x" + COMPOSE.upper()], ["ee" * 32], Reason.COMPOSE_HASH_NOT_ALLOWED),
    ("app_ids", [APP], ["ee" * 20], Reason.APP_ID_NOT_ALLOWED),
    ("os_images", [OS], [], Reason.OS_IMAGE_NOT_ALLOWED),
    ("mr_systems", [MR_SYSTEM], ["ee" * 32], Reason.MR_SYSTEM_NOT_ALLOWED),
    ("key_providers", [{"name": "kms"}], [{"name": "local-sgx"}], Reason.KEY_PROVIDER_NOT_ALLOWED),
    (
        "key_providers",
        [{"name": "kms", "id": KP_ID}],
        [{"name": "kms", "id": "ff"}],
        Reason.KEY_PROVIDER_NOT_ALLOWED,
    ),
    ("allowed_tcb_statuses", ["UpToDate"], ["OutOfDate"], Reason.TCB_STATUS_NOT_ALLOWED),
    ("report_data", b"nonce".hex(), "6e6f6e63", Reason.REPORT_DATA_MISMATCH),
]


@pytest.mark.parametrize(("field", "good", "bad", "reason"), TABLE)
def test_policy_field(field: str, good, bad, reason: Reason) -> None:
    admitting = parse_model(Policy, {field: good}, source="t")
    assert check_policy(CLAIMS, admitting) == ()
    refusing = parse_model(Policy, {field: bad}, source="t")
    (refusal,) = check_policy(CLAIMS, refusing)
    assert refusal.code == reason


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("compose_hashes", [COMPOSE], Reason.COMPOSE_HASH_NOT_ALLOWED),
        ("app_ids", [APP], Reason.APP_ID_NOT_ALLOWED),
        ("os_images", [OS], Reason.OS_IMAGE_NOT_ALLOWED),
        ("key_providers", [{"name": "kms"}], Reason.KEY_PROVIDER_NOT_ALLOWED),
    ],
)
def test_pinned_but_not_measured_is_refused(field: str, value, reason: Reason) -> None:
    empty = DstackIdentity(None, None, None, None, None, None, ())
    claims = dataclasses.replace(CLAIMS, identity=empty)
    (refusal,) = check_policy(claims, parse_model(Policy, {field: value}, source="t"))
    assert refusal.code == reason and "no " in refusal.message


def test_advisories_refused_unless_listed() -> None:
    claims = dataclasses.replace(CLAIMS, advisory_ids=("INTEL-SA-00837",))
    (refusal,) = check_policy(claims, Policy())
    assert refusal.code == Reason.ADVISORY_NOT_ALLOWED
    assert check_policy(claims, Policy(allowed_advisory_ids=("INTEL-SA-00837",))) == ()


def test_defaults_are_strict() -> None:
    policy = Policy()
    assert policy.tee == "tdx"
    assert policy.allowed_tcb_statuses == ("UpToDate",)
    assert policy.allowed_advisory_ids == ()
    for status in ("SWHardeningNeeded", "OutOfDate", "Revoked"):
        (refusal,) = check_policy(dataclasses.replace(CLAIMS, tcb_status=status), policy)
        assert refusal.code == Reason.TCB_STATUS_NOT_ALLOWED


def test_every_failing_reason_is_reported() -> None:
    policy = parse_model(
        Policy,
        {
            "compose_hashes": [],
            "app_ids": [],
            "os_images": [],
            "allowed_tcb_statuses": ["OutOfDate"],
        },
        source="t",
    )
    codes = {r.code for r in check_policy(CLAIMS, policy)}
    assert codes == {
        Reason.COMPOSE_HASH_NOT_ALLOWED,
        Reason.APP_ID_NOT_ALLOWED,
        Reason.OS_IMAGE_NOT_ALLOWED,
        Reason.TCB_STATUS_NOT_ALLOWED,
    }


def test_identity_checks_skipped_when_log_unproven() -> None:
    claims = dataclasses.replace(CLAIMS, identity=None)
    assert check_policy(claims, Policy(compose_hashes=("ee" * 32,))) == ()


def test_all_model_errors_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        parse_model(
            Policy,
            {
                "tee": "sgx",
                "compose_hashes": ["xy"],
                "app_ids": ["aa"],
                "colour": 1,
                "allowed_tcb_statuses": ["Fine"],
            },
            source="p.yaml",
        )
    text = str(err.value)
    for part in (
        "tee:",
        "compose_hashes.0: not hex",
        "app_ids.0: expected 20 bytes",
        "colour:",
        "allowed_tcb_statuses.0",
    ):
        assert part in text
    assert len(err.value.problems) == 5


def test_simulated_needs_platform_key_and_tdx_refuses_one() -> None:
    with pytest.raises(ConfigError, match="tee: simulated needs platform_key"):
        parse_model(Policy, {"tee": "simulated"}, source="t")
    with pytest.raises(ConfigError, match="platform_key is only for tee: simulated"):
        parse_model(Policy, {"platform_key": "-----BEGIN"}, source="t")


def test_load_policy_resolves_platform_key_path(tmp_path: Path) -> None:
    (tmp_path / "platform.pub").write_text("-----BEGIN PUBLIC KEY-----\n")
    (tmp_path / "p.yaml").write_text("tee: simulated\nplatform_key: platform.pub\n")
    assert load_policy(tmp_path / "p.yaml").platform_key.startswith("-----BEGIN PUBLIC KEY")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tee: [", "line 1 column"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("tee: simulated\nplatform_key: missing.pem\n", "cannot read"),
    ],
)
def test_load_policy_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_policy(tmp_path / "p.yaml")


def test_empty_policy_file_is_the_default(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("")
    assert load_policy(tmp_path / "p.yaml") == Policy()
