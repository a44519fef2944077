"""Signed cluster policies (teemesh.coordinator.policy_signing): only what the measured signer
signed loads, whatever else the environment holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teemesh.config import ConfigError
from teemesh.coordinator.policy import parse_cluster_policy
from teemesh.coordinator.policy_signing import (
    load_signing_key,
    new_signing_key,
    sign_policy,
    signer_hex,
    verified_policy,
)
from teemesh.coordinator.service import check_serial
from teemesh.errors import InputError

POLICY = {"cluster": "shop", "tee": "tdx", "groups": {"api": {"compose_hashes": ["ab" * 32]}}}
KEY, PEM = new_signing_key()
SIGNER = signer_hex(KEY)


def test_a_signed_policy_loads_as_the_policy_it_signs() -> None:
    signed = sign_policy(POLICY, KEY)
    assert "\n" not in signed  # one line: an env file's value
    assert verified_policy(signed, SIGNER, "$P") == POLICY
    loaded = parse_cluster_policy(signed, "$P", signer=SIGNER)
    assert loaded.groups["api"].compose_hashes == ("ab" * 32,)


def test_the_signature_covers_the_canonical_document_not_its_layout() -> None:
    signed = json.loads(sign_policy(POLICY, KEY))
    spread = json.dumps(signed, indent=4, sort_keys=True)  # the same document, laid out otherwise
    assert spread != sign_policy(POLICY, KEY)
    assert verified_policy(spread, SIGNER, "$P") == POLICY


@pytest.mark.parametrize(
    "extra",
    [{"note": "\U0001f600 caf\u00e9"}, {"ratio": 1e20}, {"ratio": 0.1}, {"big": 2**62}],
    ids=["astral-and-accents", "exponent", "fraction", "big-int"],
)
def test_what_a_signer_writes_verifies(extra: dict[str, object]) -> None:
    doc = POLICY | extra
    assert verified_policy(sign_policy(doc, KEY), SIGNER, "$P") == doc


@pytest.mark.parametrize(
    "policy_text",
    ["{d: 2001-01-01}", "&a [*a]", "!!binary aGk=", "{1: a}", "[1, 2"],
)
def test_yaml_that_no_signer_wrote_is_refused_cleanly(policy_text: str) -> None:
    """Only JSON is read: what YAML adds (dates, aliases, binary) never reaches the check."""
    text = f'{{"policy": {policy_text}, "signature": "{"ab" * 64}"}}'
    with pytest.raises(ConfigError) as info:
        verified_policy(text, SIGNER, "$P")
    assert "invalid JSON" in info.value.problems[0]


@pytest.mark.parametrize(
    ("serial", "in_force", "refused"),
    [
        (None, None, False), (5, None, False), (6, 5, False),
        (5, 5, True), (4, 5, True), (None, 5, True),
    ],
)  # fmt: skip
def test_a_signed_policy_is_replaced_only_by_a_later_one(
    serial: int | None, in_force: int | None, refused: bool
) -> None:
    if refused:
        with pytest.raises(InputError, match="only a policy signed later"):
            check_serial(serial, in_force)
    else:
        check_serial(serial, in_force)


def change_hash(doc: dict) -> None:  # type: ignore[type-arg]
    doc["policy"]["groups"]["api"]["compose_hashes"] = ["cd" * 32]


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (change_hash, "signature: not made by the policy signer"),
        (lambda d: d["policy"].update(tee="simulated"), "signature: not made by the policy signer"),
        (lambda d: d.update(signature="00" * 64), "signature: not made by the policy signer"),
        (lambda d: d.update(signature="00"), "signature: expected 64 bytes in hex"),
        (lambda d: d.update(signature=7), "signature: expected 64 bytes in hex"),
        (lambda d: d.pop("signature"), "expected a signed policy"),
        (lambda d: d.update(extra=1), "expected a signed policy"),
        (lambda d: d.update(policy=[1]), "policy: expected the cluster policy"),
    ],
)
def test_a_changed_document_is_refused(tamper: object, problem: str) -> None:
    doc = json.loads(sign_policy(POLICY, KEY))
    tamper(doc)  # type: ignore[operator]
    with pytest.raises(ConfigError) as info:
        verified_policy(json.dumps(doc), SIGNER, "$P")
    assert info.value.source == "$P"
    assert problem in info.value.problems[0]


def test_another_key_s_signature_and_unsigned_text_are_refused() -> None:
    other, _ = new_signing_key()
    with pytest.raises(ConfigError, match="not made by the policy signer"):
        verified_policy(sign_policy(POLICY, other), SIGNER, "$P")
    with pytest.raises(ConfigError, match="expected a signed policy"):
        parse_cluster_policy(json.dumps(POLICY), "$P", signer=SIGNER)
    with pytest.raises(ConfigError, match="invalid JSON"):
        verified_policy("{", SIGNER, "$P")
    with pytest.raises(ConfigError, match="policy signer: expected 32 bytes"):
        verified_policy(sign_policy(POLICY, KEY), "abcd", "$P")


def test_signing_keys_load_from_their_pem(tmp_path: Path) -> None:
    path = tmp_path / "policy.key"
    path.write_bytes(PEM)
    assert signer_hex(load_signing_key(path)) == SIGNER
    path.write_text("not a key")
    with pytest.raises(InputError, match="not a PEM private key"):
        load_signing_key(path)
    with pytest.raises(InputError, match="cannot read it"):
        load_signing_key(tmp_path / "missing.key")


def test_only_an_ed25519_key_signs(tmp_path: Path) -> None:
    from teemesh.attest.simulated import PlatformKey  # a P-256 key, PEM

    path = tmp_path / "p256.key"
    path.write_bytes(PlatformKey.generate().private_pem())
    with pytest.raises(InputError, match="not an Ed25519 key"):
        load_signing_key(path)
