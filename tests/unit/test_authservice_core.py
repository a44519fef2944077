"""dstack-vpc's auth service contract: what nginx's auth_request hears for each certificate."""

from __future__ import annotations

import datetime as dt
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from teemesh.identity.meshca import issue_svid, mesh_ca_cert, mesh_ca_key
from teemesh.identity.svid import spiffe_id
from teemesh.sidecar.authservice import Trust, decide

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
APP_ID = bytes.fromhex("ab" * 20)
CA_KEY = mesh_ca_key(b"\x01" * 32)
CA = mesh_ca_cert(CA_KEY, "pg")
OTHER_KEY = mesh_ca_key(b"\x02" * 32)
OTHER_CA = mesh_ca_cert(OTHER_KEY, "pg")


def svid(
    group: str = "web", peer: str = "web-0", *, cluster: str = "pg", signer: tuple = (CA_KEY, CA)
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return issue_svid(signer[0], signer[1], key.public_key(), spiffe=spiffe_id(cluster, group, peer),
                      peer_id=peer, app_id=APP_ID, now=NOW, ttl=dt.timedelta(hours=1))  # fmt: skip


def escaped(cert: x509.Certificate) -> str:
    """As nginx sends $ssl_client_escaped_cert."""
    return quote(cert.public_bytes(Encoding.PEM).decode(), safe="")


def trust(**changes: object) -> Trust:
    fields: dict[str, object] = {
        "cluster": "pg",
        "ca_pem": CA.public_bytes(Encoding.PEM),
        "now": NOW.timestamp() + 60,
    }
    return Trust(**(fields | changes))  # type: ignore[arg-type]


def auth(cert: x509.Certificate | None, verify: str = "SUCCESS", **changes: object):  # type: ignore[no-untyped-def]
    headers = {"x-client-verify": verify}
    if cert is not None:
        headers["x-client-cert"] = escaped(cert)
    return decide("GET", "/auth", headers, trust(**changes))


def test_a_mesh_certificate_gets_its_app_id_group_and_peer() -> None:
    got = auth(svid())
    assert got.status == 200, got.reason
    assert dict(got.headers) == {
        "x-dstack-app-id": APP_ID.hex(),
        "x-teemesh-group": "web",
        "x-teemesh-peer": "web-0",
    }


@pytest.mark.parametrize(
    ("cert", "verify", "changes", "reason"),
    [
        (svid(), "NONE", {}, "did not verify"),
        (svid(), "FAILED:unable to verify", {}, "did not verify"),
        (None, "SUCCESS", {}, "no client certificate"),
        (svid(signer=(OTHER_KEY, OTHER_CA)), "SUCCESS", {}, "refused"),
        (svid(cluster="other"), "SUCCESS", {}, "cluster"),
        (svid(), "SUCCESS", {"now": NOW.timestamp() + 7200}, "refused"),
        (svid(), "SUCCESS", {"now": NOW.timestamp() - 3600}, "refused"),
    ],
)
def test_what_is_not_a_current_mesh_certificate_is_401(
    cert: x509.Certificate | None, verify: str, changes: dict[str, object], reason: str
) -> None:
    got = auth(cert, verify, **changes)
    assert got.status == 401
    assert reason in got.reason
    assert got.headers == ()


def test_a_revoked_certificate_is_401() -> None:
    cert = svid()
    got = auth(cert, revoked=frozenset({cert.serial_number}))
    assert (got.status, got.headers) == (401, ())
    assert "revoked" in got.reason


def test_callers_limit_the_groups_with_a_403() -> None:
    assert auth(svid("web", "web-1"), callers=frozenset({"web"})).status == 200
    got = auth(svid("postgres", "postgres-0"), callers=frozenset({"web"}))
    assert (got.status, got.headers) == (403, ())
    assert "postgres" in got.reason


def test_a_ca_rotation_bundle_accepts_both_generations() -> None:
    bundle = CA.public_bytes(Encoding.PEM) + OTHER_CA.public_bytes(Encoding.PEM)
    assert auth(svid(signer=(OTHER_KEY, OTHER_CA)), ca_pem=bundle).status == 200


def test_health_paths_and_methods() -> None:
    assert decide("GET", "/health", {}, trust()).status == 200
    assert decide("GET", "/auth?x=1", {}, trust()).status == 401
    assert decide("POST", "/auth", {}, trust()).status == 405
    assert decide("GET", "/other", {}, trust()).status == 404


def test_garbage_and_oversized_certificates_are_401() -> None:
    for text in ("%%%", quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"),
                 "A" * 20000):  # fmt: skip
        got = decide("GET", "/auth", {"x-client-verify": "SUCCESS", "x-client-cert": text},
                     trust())  # fmt: skip
        assert got.status == 401, text[:20]


@given(st.dictionaries(st.sampled_from(["x-client-verify", "x-client-cert", "x-other"]),
                       st.text(max_size=300)))  # fmt: skip
def test_any_headers_get_an_answer_never_an_exception(headers: dict[str, str]) -> None:
    assert decide("GET", "/auth", headers, trust()).status in (200, 401, 403)
