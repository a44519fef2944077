"""The X.509-free reader agrees with the X.509 library on every certificate the mesh makes."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teemesh.errors import InputError, PeerError
from teemesh.identity.certs import CertSpec, issue, new_p256_key
from teemesh.identity.der import der_time, oid_text, read_cert
from teemesh.identity.meshca import issue_svid, mesh_ca_cert, mesh_ca_key
from teemesh.identity.ratls import OID_APP_ID
from teemesh.identity.svid import APP_ID_OID, read_svid

NOW = dt.datetime(2026, 11, 22, 12, 0, 0, tzinfo=dt.UTC)
CA_KEY = mesh_ca_key(b"\x07" * 32)
CA = mesh_ca_cert(CA_KEY, "demo")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def svid(uri: str = "spiffe://demo/web/web-0", ttl: dt.timedelta = dt.timedelta(hours=1)):
    key = new_p256_key()
    return issue_svid(
        CA_KEY, CA, key.public_key(), spiffe=uri, peer_id="web-0", app_id=b"\xaa" * 20,
        now=NOW, ttl=ttl,
    )  # fmt: skip


def test_svid_fields_match_the_x509_library() -> None:
    cert = svid()
    fields = read_cert(der(cert))
    assert fields.serial == cert.serial_number
    assert fields.not_after == int(cert.not_valid_after_utc.timestamp())
    assert fields.uris == ("spiffe://demo/web/web-0",)
    assert OID_APP_ID.dotted_string == APP_ID_OID
    assert set(fields.extensions) == {e.oid.dotted_string for e in cert.extensions}


def test_read_svid_names_the_peer() -> None:
    cert = svid()
    peer = read_svid(der(cert), "demo")
    assert (peer.cluster, peer.group, peer.peer_id, peer.peer) == (
        "demo",
        "web",
        "web-0",
        "web/web-0",
    )
    assert peer.app_id == b"\xaa" * 20
    assert peer.serial == cert.serial_number
    assert peer.not_after == int(cert.not_valid_after_utc.timestamp())


def test_a_long_lived_certificate_uses_generalized_time() -> None:
    """After 2049 X.509 switches to GeneralizedTime; the CA runs to 2045, an SVID could not."""
    key = new_p256_key()
    late = dt.datetime(2051, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    cert = issue(CertSpec("x", NOW, late, uris=("spiffe://demo/a/b",)), key.public_key(), key)
    assert read_cert(der(cert)).not_after == int(late.timestamp())
    assert read_cert(der(CA)).not_after == int(CA.not_valid_after_utc.timestamp())


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("spiffe://other/web/web-0", "for cluster 'other'"),
        ("spiffe://demo/web", "not an SVID"),
        ("https://demo/web/web-0", "not an SVID"),
    ],
)
def test_certificates_that_name_no_peer_of_this_cluster(uri: str, message: str) -> None:
    with pytest.raises(PeerError, match=message):
        read_svid(der(svid(uri)), "demo")


def test_the_ca_certificate_is_no_svid() -> None:
    with pytest.raises(PeerError, match="not an SVID"):
        read_svid(der(CA), "demo")


@pytest.mark.parametrize("cut", [0, 1, 2, 10, 100, -1])
def test_truncated_certificates_are_input_errors(cut: int) -> None:
    data = der(svid())
    with pytest.raises(InputError):
        read_cert(data[:cut])
    with pytest.raises(PeerError, match="unreadable"):
        read_svid(data[:cut], "demo")


def test_oid_and_time_decoding() -> None:
    assert oid_text(bytes.fromhex("551d11"), field="x") == "2.5.29.17"
    assert oid_text(bytes.fromhex("2b0601040183e73d0103"), field="x") == "1.3.6.1.4.1.62397.1.3"
    assert der_time(0x17, b"491231235959Z", field="x") == 2524607999
    assert der_time(0x17, b"500101000000Z", field="x") == -631152000
    for bad in (b"", b"2026", b"20261322000000Z", b"2026112212000Z", b"491231235959+0100"):
        with pytest.raises(InputError):
            der_time(0x18, bad, field="x")
    with pytest.raises(InputError):
        oid_text(b"\x81", field="x")
