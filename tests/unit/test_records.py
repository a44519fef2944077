"""The coordinator's records and the rules on them (``coordinator.records``), without a store.

Each ``recheck`` refusal test changes exactly one thing in the policy the record was admitted
under, so dropping the check it names makes that test fail; the unchanged policy admits.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from teemesh.attest.dstack import KeyProvider, compose_hash
from teemesh.attest.simulated import PlatformKey
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.coordinator.records import (
    AdmissionRecord,
    InstanceUpdate,
    LiveCert,
    PolicyEpoch,
    Registration,
    Revocation,
    instance_value,
    parse_request,
    recheck,
)
from teemesh.errors import InputError

COMPOSE = compose_hash(b'{"name":"web"}').hex()
OS_IMAGE = "c5" * 32
APP_ID = "44" * 20
MR_SYSTEM = "5a" * 32

RECORD = AdmissionRecord(
    group="web",
    peer_id="web-1",
    instance_id="ea" * 20,
    app_id=APP_ID,
    compose_hash=COMPOSE,
    os_image_hash=OS_IMAGE,
    key_provider=("kms", "ab"),
    mr_system=MR_SYSTEM,
    tee="tdx",
    tcb_status="UpToDate",
    advisory_ids=(),
    admitted_at=1_800_000_000,
    certs=(LiveCert(0x1234, 1_800_003_600),),
)


def policy(web: dict[str, Any] | None = None, **top: Any) -> ClusterPolicy:
    """The policy RECORD was admitted under, with ``web``'s rules changed (None: no group)."""
    rules = {
        "compose_hashes": [COMPOSE],
        "os_images": [OS_IMAGE],
        "app_ids": [APP_ID],
        "mr_systems": [MR_SYSTEM],
        "key_providers": [{"name": "kms", "id": "ab"}],
        "peer_ids": ["web-0", "web-1"],
        "services": ["web"],
    }
    groups = {"db": {"services": ["db"]}}
    if web is not None:
        groups["web"] = rules | web
    return ClusterPolicy.model_validate({"cluster": "demo", "groups": groups, **top})


# --------------------------------------------------------------------------- AdmissionRecord


def hex_of(size: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=size, max_size=size).map(bytes.hex)


labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
records = st.builds(
    AdmissionRecord,
    group=labels,
    peer_id=labels,
    instance_id=hex_of(20),
    app_id=hex_of(20),
    compose_hash=hex_of(32) | st.just(""),
    os_image_hash=hex_of(32) | st.just(""),
    key_provider=st.none() | st.tuples(st.text(max_size=8), hex_of(4)),
    mr_system=hex_of(32),
    tee=st.sampled_from(["tdx", "simulated"]),
    tcb_status=st.sampled_from(["UpToDate", "OutOfDate"]) | st.text(max_size=8),
    advisory_ids=st.lists(st.text(max_size=12), max_size=3).map(tuple),
    admitted_at=st.integers(0, 2**40),
    certs=st.lists(
        st.builds(LiveCert, serial=st.integers(1, 2**159), not_after=st.integers(0, 2**40)),
        max_size=3,
    ).map(tuple),
    revoked=st.none() | st.text(max_size=20),
)


@settings(max_examples=300)
@given(record=records)
def test_an_admission_record_round_trips_through_the_store(record: AdmissionRecord) -> None:
    again = AdmissionRecord.from_bytes(record.to_bytes())
    assert again == record
    assert type(again.advisory_ids) is tuple and type(again.certs) is tuple
    assert hash(again) == hash(record)
    assert again.to_bytes() == record.to_bytes()
    public = record.to_public()
    assert public["certs"] == [
        {"serial": f"{c.serial:x}", "not_after": c.not_after} for c in record.certs
    ]
    assert public["not_after"] == max((c.not_after for c in record.certs), default=0)


def test_live_certs_are_those_not_yet_expired() -> None:
    record = replace(RECORD, certs=(LiveCert(1, 100), LiveCert(2, 200)))
    assert record.live_certs(99.5) == (LiveCert(1, 100), LiveCert(2, 200))
    assert record.live_certs(100) == (LiveCert(2, 200),)
    assert record.live_certs(200) == ()
    assert record.not_after == 200
    assert replace(record, certs=()).not_after == 0


def test_the_identity_a_record_keeps() -> None:
    identity = RECORD.identity()
    assert identity.compose_hash == bytes.fromhex(COMPOSE)
    assert identity.os_image_hash == bytes.fromhex(OS_IMAGE)
    assert identity.key_provider == KeyProvider("kms", "ab")
    bare = replace(RECORD, compose_hash="", os_image_hash="", key_provider=None).identity()
    assert bare.compose_hash is None and bare.os_image_hash is None and bare.key_provider is None


# --------------------------------------------------------------------------- recheck


def codes(record: AdmissionRecord, pol: ClusterPolicy) -> list[str]:
    return [r.code.value for r in recheck(record, pol)]


def test_the_unchanged_policy_still_admits() -> None:
    assert recheck(RECORD, policy({})) == ()
    assert recheck(AdmissionRecord.from_bytes(RECORD.to_bytes()), policy({})) == ()


def test_a_change_elsewhere_in_the_policy_still_admits() -> None:
    assert recheck(RECORD, policy({"services": ["web", "web-admin"]})) == ()
    assert recheck(RECORD, policy({}, lease_ttl_seconds=30)) == ()
    assert recheck(RECORD, policy({"compose_hashes": ["00" * 32, COMPOSE]})) == ()
    assert recheck(RECORD, policy({"key_providers": [{"name": "kms"}]})) == ()  # any id
    assert recheck(RECORD, policy({"peer_ids": None})) == ()  # any peer id


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"peer_ids": ["web-0"]}, "PEER_ID_NOT_ALLOWED"),
        ({"peer_ids": []}, "PEER_ID_NOT_ALLOWED"),
        ({"compose_hashes": ["00" * 32]}, "COMPOSE_HASH_NOT_ALLOWED"),
        ({"os_images": ["00" * 32]}, "OS_IMAGE_NOT_ALLOWED"),
        ({"key_providers": [{"name": "none"}]}, "KEY_PROVIDER_NOT_ALLOWED"),
        ({"key_providers": [{"name": "kms", "id": "cd"}]}, "KEY_PROVIDER_NOT_ALLOWED"),
        ({"app_ids": ["00" * 20]}, "APP_ID_NOT_ALLOWED"),
        ({"mr_systems": ["00" * 32]}, "MR_SYSTEM_NOT_ALLOWED"),
        ({"allowed_tcb_statuses": ["OutOfDate"]}, "TCB_STATUS_NOT_ALLOWED"),
    ],
)
def test_a_policy_that_no_longer_admits_the_record(change: dict[str, Any], code: str) -> None:
    assert codes(RECORD, policy(change)) == [code]


def test_a_policy_without_the_group_refuses_it() -> None:
    refusals = recheck(RECORD, policy(None))
    assert [r.code.value for r in refusals] == ["GROUP_NOT_ALLOWED"]
    assert "'web'" in refusals[0].message


def test_advisories_admitted_at_the_time_must_stay_allowed() -> None:
    record = replace(RECORD, advisory_ids=("INTEL-SA-00837",))
    assert codes(record, policy({"allowed_advisory_ids": ["INTEL-SA-00837"]})) == []
    assert codes(record, policy({})) == ["ADVISORY_NOT_ALLOWED"]


def test_what_was_not_measured_cannot_match_a_pin() -> None:
    record = replace(RECORD, compose_hash="", os_image_hash="", key_provider=None)
    assert codes(record, policy({})) == [
        "OS_IMAGE_NOT_ALLOWED",
        "COMPOSE_HASH_NOT_ALLOWED",
        "KEY_PROVIDER_NOT_ALLOWED",
    ]
    unpinned = {"compose_hashes": None, "os_images": None, "key_providers": None}
    assert codes(record, policy(unpinned)) == []


def test_a_record_admitted_under_another_tee_is_refused() -> None:
    pem = PlatformKey.generate().public_pem().decode()
    simulated = policy({}, tee="simulated", platform_key=pem)
    assert codes(RECORD, simulated) == ["QUOTE_INVALID"]
    assert codes(replace(RECORD, tee="simulated"), simulated) == []


@settings(max_examples=100)
@given(record=records)
def test_recheck_reads_a_stored_record_as_the_original(record: AdmissionRecord) -> None:
    record = replace(record, group="web", peer_id="web-1", tee="tdx")
    again = AdmissionRecord.from_bytes(record.to_bytes())
    for pol in (policy({}), policy({"allowed_advisory_ids": list(record.advisory_ids)})):
        assert recheck(again, pol) == recheck(record, pol)


# --------------------------------------------------------------------------- requests


REGISTRATION = {"service": "web", "address": "10.0.0.1", "port": 8080}


def field_of(model: type[Any], doc: Any) -> str:
    with pytest.raises(InputError) as info:
        parse_request(model, doc)
    assert info.value.field is not None
    return info.value.field


def test_a_good_registration_parses_with_its_defaults() -> None:
    reg = parse_request(Registration, REGISTRATION)
    assert (reg.service, reg.address, reg.port, reg.tags, reg.health) == (
        "web", "10.0.0.1", 8080, {}, "passing",
    )  # fmt: skip
    assert parse_request(Registration, REGISTRATION | {"address": "[fe80::1]"}).port == 8080


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"service": "Web!"}, "service"),
        ({"service": 5}, "service"),
        ({"address": "a b"}, "address"),
        ({"address": "x" * 254}, "address"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": 2**80}, "port"),
        ({"port": "eighty"}, "port"),
        ({"port": 80.5}, "port"),
        ({"tags": {"Bad Key": "v"}}, "tags"),
        ({"tags": {"k": ""}}, "tags"),
        ({"tags": {"k": "v" * 257}}, "tags"),
        ({"tags": {f"t{i}": "v" for i in range(33)}}, "tags"),
        ({"health": "dead"}, "health"),
        ({"peer_id": "web-9"}, "peer_id"),  # who it is comes from the SVID, never the body
    ],
)
def test_a_bad_registration_field_is_named(change: dict[str, Any], field: str) -> None:
    assert field_of(Registration, REGISTRATION | change) == field


def test_every_bad_field_is_named_at_once() -> None:
    doc = {"service": "Web!", "address": "a b", "port": 0, "extra": 1}
    assert field_of(Registration, doc) == "address,extra,port,service"
    with pytest.raises(InputError) as info:
        parse_request(Registration, doc)
    for name in ("service:", "address:", "port:", "extra:"):
        assert name in str(info.value)


def test_missing_fields_are_named() -> None:
    assert field_of(Registration, {}) == "address,port,service"
    assert field_of(Registration, {"service": "web"}) == "address,port"


@pytest.mark.parametrize("doc", [None, [], "web", 5, [REGISTRATION]])
def test_a_body_that_is_not_an_object_names_the_body(doc: Any) -> None:
    assert field_of(Registration, doc) == "body"


def test_an_instance_update_names_its_bad_fields() -> None:
    assert parse_request(InstanceUpdate, {}).model_dump(exclude_none=True) == {}
    assert parse_request(InstanceUpdate, {"health": "warning"}).health == "warning"
    assert field_of(InstanceUpdate, {"health": "dead", "tags": {"K": "v"}}) == "health,tags"
    assert field_of(InstanceUpdate, {"service": "web"}) == "service"


def test_the_catalog_entry_takes_who_it_is_from_the_admission() -> None:
    reg = parse_request(Registration, REGISTRATION | {"tags": {"role": "primary"}})
    doc = json.loads(instance_value(reg, RECORD))
    assert doc == {
        "service": "web",
        "group": "web",
        "peer_id": "web-1",
        "address": "10.0.0.1",
        "port": 8080,
        "tags": {"role": "primary"},
        "health": "passing",
        "app_id": APP_ID,
        "instance_id": RECORD.instance_id,
    }


# --------------------------------------------------------------------------- the policy


def test_a_service_owned_by_two_groups_is_refused() -> None:
    groups = {"web": {"services": ["api", "web"]}, "db": {"services": ["db", "api"]}}
    with pytest.raises(ValidationError, match="'api' is already owned by group web"):
        ClusterPolicy.model_validate({"cluster": "demo", "groups": groups})


def test_services_owned_once_are_fine() -> None:
    groups = {"web": {"services": ["api", "web", "api"]}, "db": {"services": ["db"]}}
    pol = ClusterPolicy.model_validate({"cluster": "demo", "groups": groups})
    assert pol.groups["db"].services == ("db",)


def test_a_policy_epoch_round_trips_and_its_digest_ignores_key_order() -> None:
    pol = policy({})
    epoch = PolicyEpoch(3, PolicyEpoch.digest_of(pol), pol, 1_800_000_000)
    again = PolicyEpoch.from_bytes(epoch.to_bytes())
    assert again == epoch and again.policy == pol and again.published_at == 1_800_000_000
    reordered = ClusterPolicy.model_validate(
        dict(reversed(list(pol.model_dump(mode="json").items())))
    )
    assert PolicyEpoch.digest_of(reordered) == epoch.digest
    assert PolicyEpoch.digest_of(policy({"peer_ids": None})) != epoch.digest


def test_a_revocation_names_its_serial_in_hex() -> None:
    entry = Revocation(0xABC, "web", "web-1", "gone", 1_800_003_600, 1_800_000_000)
    assert json.loads(entry.to_bytes())["serial"] == "abc"


def test_a_number_past_jsons_digit_limit_is_an_input_error() -> None:
    from teemesh.encoding import load_json
    from teemesh.errors import InputError

    with pytest.raises(InputError, match="body"):
        load_json(b'{"port": ' + b"9" * 5000 + b"}", field="body")
