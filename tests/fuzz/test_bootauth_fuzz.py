"""Fuzz boot authorization's parsers: each returns a value or raises ``InputError``, never else.

Targets: ``BootInfo.from_json`` (what the auth server reads from the KMS), ``BootDecision`` and
``AuthInfo.from_json`` (what ``WebhookAuth`` reads from a remote auth service), and the
auth-simple config parser. Whatever parses must also decide without raising and round-trip.
"""

from __future__ import annotations

import json
import re
from typing import Any

import fuzzkit
from fuzzkit import input_error_only
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from teemesh.config import ConfigError
from teemesh.platform.bootauth import (
    AuthInfo,
    AuthSimpleConfig,
    BootDecision,
    BootInfo,
    decide,
    parse_auth_config,
)
from teemesh.platform.kms import RootKeys, bootstrap_root_keys, root_keys_from_kms_key_reply

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEX = re.compile("(?:[0-9a-f]{2})*")

text = fuzzkit.TEXT | st.sampled_from(("UpToDate", "OutOfDate"))
hexish = fuzzkit.hexish()
json_values = fuzzkit.json_values(text)

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
    info = input_error_only(BootInfo.from_json, doc)
    if info is not None:
        _check_boot_info(info)


@FUZZ
@given(boot_docs())
def test_boot_info_mutated_documents(doc: dict[str, Any]) -> None:
    info = input_error_only(BootInfo.from_json, doc)
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
    decision = input_error_only(BootDecision.from_json, doc)
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
    info = input_error_only(AuthInfo.from_json, doc)
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
    config = input_error_only(parse_auth_config, data, source="x")
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
ROOT_DOC = bootstrap_root_keys().to_json()
"""Real roots, as a state file holds them: the seed the mutations start from."""


def _handover(doc: dict[str, Any]) -> dict[str, Any]:
    """The same fields as a GetKmsKey reply: the CA key and k256 key in ``keys[0]``."""
    entry = {k: v for k, v in doc.items() if k in {"ca_key", "k256_key"}}
    return {"keys": [entry], **{k: v for k, v in doc.items() if k not in {"ca_key", "k256_key"}}}


@st.composite
def root_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Real roots with up to two fields edited: dropped, truncated, one character changed, the
    value of another field, any JSON value; and perhaps an unknown field added."""
    doc: dict[str, Any] = dict(ROOT_DOC)
    for key in draw(st.lists(st.sampled_from(_ROOT_FIELDS), max_size=2, unique=True)):
        value = ROOT_DOC[key]
        how = draw(st.sampled_from(("keep", "drop", "truncate", "flip", "other", "json")))
        if how == "drop":
            del doc[key]
        elif how == "truncate":
            doc[key] = value[: draw(st.integers(0, len(value)))]
        elif how == "flip":
            at = draw(st.integers(0, len(value) - 1))
            doc[key] = value[:at] + draw(st.sampled_from("A/+=z0 \n-")) + value[at + 1 :]
        elif how == "other":
            doc[key] = ROOT_DOC[draw(st.sampled_from(_ROOT_FIELDS))]
        elif how == "json":
            doc[key] = draw(json_values)
    doc.update(draw(st.dictionaries(st.just("extra"), json_values, max_size=1)))
    return doc


def _parsed_roots(parse: Any, *args: Any, **kwargs: Any) -> RootKeys | None:
    """``parse``'s roots (which must round-trip), or None after an InputError naming the problem."""
    keys = input_error_only(parse, *args, **kwargs)
    if keys is not None:
        assert RootKeys.from_json(keys.to_json(), field="root").to_json() == keys.to_json()
    return keys


@settings(max_examples=300, deadline=None)
@example(dict(ROOT_DOC))
@given(root_docs())
def test_kms_root_keys_mutated(doc: dict[str, Any]) -> None:
    """A damaged state file or GetKmsKey reply is an InputError, never a crash; the same fields
    in either layout get the same answer."""
    root = _parsed_roots(RootKeys.from_json, doc, field="root")
    handed = _parsed_roots(root_keys_from_kms_key_reply, _handover(doc))
    event("parsed" if root is not None else "refused")
    assert (root is None) == (handed is None), (root, handed)
    if root is not None and handed is not None:
        assert root.to_json() == handed.to_json()
    if {k: doc.get(k) for k in _ROOT_FIELDS} == ROOT_DOC:
        assert root is not None and root.to_json() == ROOT_DOC


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.sampled_from((*_ROOT_FIELDS, "keys", "extra")), json_values, max_size=6)
    | json_values
)
def test_kms_root_keys_and_handover_replies_arbitrary_json(doc: Any) -> None:
    _parsed_roots(RootKeys.from_json, doc, field="root")
    _parsed_roots(root_keys_from_kms_key_reply, doc)
    _parsed_roots(root_keys_from_kms_key_reply, {"keys": [doc]})
