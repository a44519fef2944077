"""The store CAs: derived alike by every coordinator CVM, distinct per store and per app."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from teemesh.catalog.etcd import _refused_certificate
from teemesh.identity.ratls import spki_der
from teemesh.identity.storeca import STORES, MemberTls, StoreCa, get_key_path

SECRET = bytes(range(32))


def spki(ca: StoreCa) -> bytes:
    return spki_der(ca.key.public_key())


def test_every_replica_derives_the_same_ca_from_the_same_secret() -> None:
    one, two = StoreCa.derive(SECRET, "demo", "etcd"), StoreCa.derive(SECRET, "demo", "etcd")
    assert spki(one) == spki(two)
    assert one.cert.subject == two.cert.subject
    assert one.cert.serial_number == two.cert.serial_number
    assert one.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_each_store_and_each_secret_has_its_own_ca() -> None:
    keys = {spki(StoreCa.derive(SECRET, "demo", store)) for store in STORES}
    keys.add(spki(StoreCa.derive(b"\x01" * 32, "demo", "etcd")))
    assert len(keys) == len(STORES) + 1
    assert len({get_key_path(store) for store in STORES}) == len(STORES)


def test_a_leaf_serves_and_dials_under_the_ca_with_a_fresh_key() -> None:
    ca = StoreCa.derive(SECRET, "demo", "dcs")
    now = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
    chain, key = ca.issue_leaf("dcs member", names=("10.78.0.3", "coordinator-0"), now=now)
    certs = x509.load_pem_x509_certificates(chain.encode())
    assert certs[1] == ca.cert
    leaf = certs[0]
    leaf.verify_directly_issued_by(ca.cert)
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.78.0.3")]
    assert names.get_values_for_type(x509.DNSName) == ["coordinator-0"]
    assert leaf.not_valid_before_utc < now < leaf.not_valid_after_utc
    assert ca.issue_leaf("dcs member", now=now)[1] != key


def test_member_files_are_owner_only_and_give_etcd_its_flags(tmp_path: Path) -> None:
    ca = StoreCa.derive(SECRET, "demo", "etcd")
    files = MemberTls.write(tmp_path / "tls", ca, ca.issue_leaf("m", names=("127.0.0.1",)))
    for path in (files.ca, files.cert, files.key):
        assert path.stat().st_mode & 0o777 == 0o600
    peers = files.etcd_flags(clients=False)
    assert "--peer-client-cert-auth" in peers and "--client-cert-auth" not in peers
    assert f"--peer-trusted-ca-file={files.ca}" in peers
    both = files.etcd_flags(clients=True)
    assert both[: len(peers)] == peers
    assert {
        "--client-cert-auth",
        f"--trusted-ca-file={files.ca}",
        f"--key-file={files.key}",
    } <= set(both)


@pytest.mark.parametrize("store", STORES)
def test_the_ca_names_its_store_and_cluster(store: str) -> None:
    ca = StoreCa.derive(SECRET, "pg", store)  # type: ignore[arg-type]
    (common_name,) = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert common_name.value == f"teemesh {store} CA pg"


@pytest.mark.parametrize(
    ("reason", "retried"),
    [
        ("SSLV3_ALERT_BAD_CERTIFICATE", True),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", True),
        ("TLSV1_ALERT_UNKNOWN_CA", True),
        ("CERTIFICATE_VERIFY_FAILED", True),
        ("DECRYPTION_FAILED_OR_BAD_RECORD_MAC", False),
        ("UNEXPECTED_EOF_WHILE_READING", False),
        (None, False),
    ],
)
def test_the_catalog_client_asks_another_member_only_when_its_certificate_was_refused(
    reason: str | None, retried: bool
) -> None:
    """A refused certificate: etcd ran nothing, another member may be asked; any other TLS
    error may come after a request it applied, which must not run twice."""
    exc = ssl.SSLError(1, "alert")
    exc.reason = reason
    assert _refused_certificate(exc) is retried
