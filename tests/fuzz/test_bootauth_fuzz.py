"""Fuzz boot authorization's parsers: each returns a value or raises ``InputError``, never else.

Targets: ``BootInfo.from_json`` (what the auth server reads from the KMS), ``BootDecision`` and
``AuthInfo.from_json`` (what ``WebhookAuth`` reads from a remote auth service), and the
auth-simple config parser. Whatever parses must also decide without raising and round-trip.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teemesh.config import ConfigError
from teemesh.errors import InputError
from teemesh.platform.bootauth import (
    AuthInfo,
    AuthSimpleConfig,
    BootDecision,
    BootInfo,
    decide,
    parse_auth_config,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEX = re.compile("(?:[0-9a-f]{2})*")

text = st.text(max_size=16) | st.sampled_from(("\ud800", "UpToDate", "OutOfDate", "0x"))
hexish = (
    st.binary(max_size=40).map(bytes.hex)
    | st.binary(max_size=40).map(lambda b: "0x" + b.hex().upper())
    | st.sampled_from(("", "0x", "0X", "abc", "zz", "0xg0", "ab" * 32, "AB" * 20))
    | st.text(max_size=12)
)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text | hexish
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)

BOOT_FIELDS = (
    "teeVariant",
    "attestationMode",
    "mrAggregated",
    "osImageHash",
    "mrSystem",
    "appId",
    "composeHash",
    "instanceId",
    "deviceId",
    "keyProviderInfo",
    "tcbStatus",
    "advisoryIds",
)
GOOD_BOOT = {
    "teeVariant": "dstack-tdx",
    "mrAggregated": "ab" * 32,
    "osImageHash": "cd" * 32,
    "mrSystem": "ef" * 32,
    "appId": "12" * 20,
    "composeHash": "34" * 32,
    "instanceId": "56" * 20,
    "deviceId": "78" * 32,
    "keyProviderInfo": "7b7d",
    "tcbStatus": "UpToDate",
    "advisoryIds": [],
}


def _input_error_only(parse: Any, *args: Any, **kwargs: Any) -> Any:
    """The parser's value, or None when it raised InputError; anything else fails the test."""
    try:
        return parse(*args, **kwargs)
    except InputError as exc:
        assert str(exc), "an InputError must say what is wrong"
        return None


@st.composite
def boot_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly-valid BootInfo documents: some fields dropped, some replaced, some added."""
    doc = dict(GOOD_BOOT)
    for key in draw(st.sets(st.sampled_from(BOOT_FIELDS), max_size=3)):
        doc.pop(key, None)
    for key in draw(st.sets(st.sampled_from(BOOT_FIELDS), max_size=3)):
        doc[key] = draw(hexish | json_values | st.lists(text, max_size=3))
    doc.update(draw(st.dictionaries(text, json_values, max_size=2)))
    return doc


def _check_boot_info(info: BootInfo) -> None:
    doc = info.to_json()
    for key in ("mrAggregated", "osImageHash", "appId", "composeHash", "deviceId"):
        assert HEX.fullmatch(doc[key]), (key, doc[key])
    assert json.loads(json.dumps(doc)) == doc
    assert BootInfo.from_json(doc) == info
    config = parse_auth_config("{}", source="x")
    for kind in ("app", "kms"):
        assert not decide(config, info, kind).is_allowed


@FUZZ
@given(json_values)
def test_boot_info_arbitrary_json(doc: Any) -> None:
    info = _input_error_only(BootInfo.from_json, doc)
    if info is not None:
        _check_boot_info(info)


@FUZZ
@given(boot_docs())
def test_boot_info_mutated_documents(doc: dict[str, Any]) -> None:
    info = _input_error_only(BootInfo.from_json, doc)
    if info is not None:
        _check_boot_info(info)


@FUZZ
@given(
    json_values
    | st.fixed_dictionaries(
        {}, optional={"isAllowed": json_values, "reason": json_values, "gatewayAppId": json_values}
    )
)
def test_boot_decision_arbitrary_json(doc: Any) -> None:
    decision = _input_error_only(BootDecision.from_json, doc)
    if decision is not None:
        assert BootDecision.from_json(decision.to_json()) == decision


@FUZZ
@given(
    json_values
    | st.fixed_dictionaries(
        {"status": st.sampled_from(("ok", "error")) | json_values},
        optional={
            key: json_values | st.integers(min_value=-1)
            for key in ("kmsContractAddr", "gatewayAppId", "chainId", "appImplementation")
        },
    )
)
def test_auth_info_arbitrary_json(doc: Any) -> None:
    info = _input_error_only(AuthInfo.from_json, doc)
    if info is not None:
        assert AuthInfo.from_json(info.to_json()) == info


# --------------------------------------------------------------------------- config parser

CONFIG_KEYS = (
    "gatewayAppId",
    "kmsContractAddr",
    "chainId",
    "appImplementation",
    "osImages",
    "allowedTcbStatuses",
    "allowedAdvisoryIds",
    "kms",
    "apps",
)
hex_lists = st.lists(hexish, max_size=3)
rules = st.fixed_dictionaries(
    {},
    optional={
        "devices": hex_lists | json_values,
        "allowAnyDevice": st.booleans() | json_values,
        "composeHashes": hex_lists | json_values,
        "mrAggregated": hex_lists | json_values,
    },
)
config_fields: dict[str, st.SearchStrategy[Any]] = {
    "gatewayAppId": text | json_values,
    "kmsContractAddr": text,
    "chainId": st.integers(min_value=-1, max_value=2**64) | json_values,
    "appImplementation": text,
    "osImages": hex_lists | json_values,
    "allowedTcbStatuses": st.lists(text, max_size=3) | json_values,
    "allowedAdvisoryIds": st.lists(text, max_size=3),
    "kms": rules | json_values,
    "apps": st.dictionaries(hexish, rules | json_values, max_size=3) | json_values,
}


@st.composite
def plausible_configs(draw: st.DrawFn) -> dict[str, Any]:
    chosen = draw(st.sets(st.sampled_from(CONFIG_KEYS)))
    doc = {key: draw(config_fields[key]) for key in chosen}
    doc.update(draw(st.dictionaries(text, json_values, max_size=1)))
    return doc


def _check_config(config: AuthSimpleConfig) -> None:
    """A parsed config is normalised (lowercase hex, no 0x) and decides without raising."""
    entries = [*config.os_images, *config.kms.mr_aggregated, *config.kms.devices]
    for app_id, rule in config.apps.items():
        entries += [app_id, *rule.compose_hashes, *rule.devices]
    for entry in entries:
        assert HEX.fullmatch(entry), entry
    info = BootInfo.from_json(GOOD_BOOT)
    for kind in ("app", "kms"):
        decision = decide(config, info, kind)
        assert decision.gateway_app_id == config.gateway_app_id
        assert decision.is_allowed == (decision.reason == "")


@FUZZ
@given(st.binary(max_size=200) | json_values.map(json.dumps))
def test_config_arbitrary_bytes(data: bytes | str) -> None:
    config = _input_error_only(parse_auth_config, data, source="x")
    if config is not None:
        _check_config(config)


@FUZZ
@given(plausible_configs())
def test_config_plausible_documents(doc: dict[str, Any]) -> None:
    try:
        config = parse_auth_config(json.dumps(doc), source="auth.json")
    except ConfigError as exc:
        assert exc.problems and all(": " in p for p in exc.problems), exc.problems
        assert str(exc).startswith(f"auth.json: {len(exc.problems)} problem(s):")
        return
    _check_config(config)


# --------------------------------------------------------------------------- the KMS's own parsers

_ROOT_FIELDS = ("ca_key", "ca_cert", "k256_key", "temp_ca_key", "temp_ca_cert")


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.sampled_from((*_ROOT_FIELDS, "keys", "extra")), json_values, max_size=6)
    | json_values
)
def test_kms_root_keys_and_handover_replies(doc: Any) -> None:
    """A damaged state file or a hostile GetKmsKey reply is an InputError, never a crash."""
    from teemesh.platform.kms import RootKeys, root_keys_from_kms_key_reply

    for parse in (
        lambda: RootKeys.from_json(doc, field="root"),
        lambda: root_keys_from_kms_key_reply(doc),
        lambda: root_keys_from_kms_key_reply({"keys": [doc]}),
    ):
        with contextlib.suppress(InputError):
            parse()
