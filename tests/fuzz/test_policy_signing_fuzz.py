"""Fuzz the signed policy reader: whatever the environment holds, ``verified_policy`` returns
the signed policy or raises an InputError; and no document but the signed one verifies."""

from __future__ import annotations

import json
from typing import Any

import fuzzkit
from fuzzkit import input_error_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teemesh.coordinator.policy_signing import (
    new_signing_key,
    sign_policy,
    signer_hex,
    verified_policy,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY, _ = new_signing_key()
SIGNER = signer_hex(KEY)
POLICY = {"cluster": "shop", "tee": "tdx", "groups": {"api": {"compose_hashes": ["ab" * 32]}}}
SIGNED = json.loads(sign_policy(POLICY, KEY))


@FUZZ
@given(text=st.text(max_size=300) | st.sampled_from((sign_policy(POLICY, KEY), "{}", "[]")))
def test_any_text_is_a_signed_policy_or_refused(text: str) -> None:
    input_error_only(verified_policy, text, SIGNER, "$P")


@FUZZ
@given(
    policy=st.just(POLICY) | fuzzkit.json_values(),
    signature=st.sampled_from((SIGNED["signature"], "00" * 64)) | fuzzkit.json_values(),
)
def test_only_the_signed_document_verifies(policy: Any, signature: Any) -> None:
    text = json.dumps({"policy": policy, "signature": signature})
    verified = input_error_only(verified_policy, text, SIGNER, "$P")
    if verified is not None:
        assert verified == POLICY


@FUZZ
@given(policy_text=st.text(max_size=120) | st.sampled_from(("{}", "[]", "1e999", '"\\ud800"')))
def test_any_policy_text_beside_a_well_formed_signature_is_refused_cleanly(
    policy_text: str,
) -> None:
    """Past the envelope's checks, right up to the signature check: still only InputError."""
    text = f'{{"policy": {policy_text}, "signature": "{SIGNED["signature"]}"}}'
    verified = input_error_only(verified_policy, text, SIGNER, "$P")
    assert verified is None or verified == POLICY
