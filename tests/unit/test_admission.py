"""Admission: the binding, the policy checks and the stateful rules, on a real SQLite store.

Each refusal test flips exactly one thing in an otherwise admissible request, so removing the
check it names makes the test fail.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from teemesh.attest.dstack import KeyProvider, compose_hash
from teemesh.attest.simulated import OsImage, PlatformKey, SimulatedCvm
from teemesh.catalog.sqlite import SqliteStore
from teemesh.clock import ManualClock
from teemesh.coordinator.admission import AdmissionRequest, admission_report_data
from teemesh.coordinator.errors import AdmissionRefused
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.coordinator.service import Coordinator
from teemesh.errors import InputError
from teemesh.identity.certs import new_p256_key
from teemesh.identity.meshca import mesh_ca_cert, mesh_ca_key
from teemesh.identity.ratls import OID_APP_ID, extension_bytes

COMPOSE = b'{"name":"web"}'
PLATFORM = PlatformKey.generate()
OS = OsImage("os")


def _policy(**group: Any) -> ClusterPolicy:
    rules = {
        "compose_hashes": [compose_hash(COMPOSE).hex()],
        "os_images": [OS.os_image_hash.hex()],
        "key_providers": [{"name": "kms"}],
        **group,
    }
    return ClusterPolicy.model_validate(
        {
            "cluster": "demo",
            "tee": "simulated",
            "platform_key": PLATFORM.public_pem().decode(),
            "groups": {"web": rules},
        }
    )


def _cvm(platform: PlatformKey = PLATFORM, compose: bytes = COMPOSE, **kw: Any) -> SimulatedCvm:
    return SimulatedCvm(platform, OS, compose, KeyProvider("kms", "ab"), **kw)


def _csr(key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web-1")])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM).decode()


class World:
    def __init__(self, tmp: Path, policy: ClusterPolicy) -> None:
        self.clock = ManualClock(1_800_000_000)
        self.tmp, self.policy = tmp, policy
        self.ca_key = mesh_ca_key(b"\x07" * 32)

    async def __aenter__(self) -> Coordinator:
        self.store = await SqliteStore.open(self.tmp / "catalog.db", clock=self.clock)
        ca = mesh_ca_cert(self.ca_key, self.policy.cluster)
        coordinator = Coordinator(self.policy, self.store, self.ca_key, ca, clock=self.clock)
        await coordinator.start()
        return coordinator

    async def __aexit__(self, *exc: object) -> None:
        await self.store.aclose()


def request(
    coord: Coordinator,
    nonce: str,
    cvm: SimulatedCvm,
    *,
    peer_id: str = "web-1",
    group: str = "web",
    tamper: Callable[[dict[str, Any]], None] | None = None,
    bind_key=None,
) -> AdmissionRequest:
    key = new_p256_key()
    report_data = admission_report_data(
        "demo", group, peer_id, bytes.fromhex(nonce), (bind_key or key).public_key()
    )
    doc = {"group": group, "peer_id": peer_id, "nonce": nonce, "csr": _csr(key)}
    doc |= cvm.get_quote_reply(report_data)
    if tamper:
        tamper(doc)
    return AdmissionRequest.from_json(doc)


def admit(tmp: Path, cvm: SimulatedCvm, policy: ClusterPolicy | None = None, **kw: Any):
    async def run():
        async with World(tmp, policy or _policy()) as coord:
            nonce = (await coord.challenge())["nonce"]
            return await coord.attest(request(coord, nonce, cvm, **kw)), coord

    return asyncio.run(run())


def refused_with(code: str, tmp: Path, cvm: SimulatedCvm, **kw: Any) -> str:
    with pytest.raises(AdmissionRefused) as info:
        admit(tmp, cvm, **kw)
    codes = [r.code for r in info.value.refusals]
    assert code in codes, info.value
    return str(info.value)


def test_an_admitted_peer_gets_a_short_lived_svid(tmp_path: Path) -> None:
    cvm = _cvm()
    reply, _coord = admit(tmp_path, cvm)
    cert = x509.load_pem_x509_certificate(reply["certificate"].encode())
    ca = x509.load_pem_x509_certificate(reply["ca_certificate"].encode())
    cert.verify_directly_issued_by(ca)
    assert reply["spiffe_id"] == "spiffe://demo/web/web-1"
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [reply["spiffe_id"]]
    assert extension_bytes(cert, OID_APP_ID) == cvm.app_id
    life = cert.not_valid_after_utc - dt.datetime.fromtimestamp(1_800_000_000, dt.UTC)
    assert life == dt.timedelta(hours=1)
    assert reply["renew_after"] == 1_800_000_000 + 1800


def test_the_mesh_ca_is_the_same_for_every_replica() -> None:
    a, b = mesh_ca_key(b"\x01" * 32), mesh_ca_key(b"\x01" * 32)
    ca_a, ca_b = mesh_ca_cert(a, "demo"), mesh_ca_cert(b, "demo")
    assert ca_a.public_key() == ca_b.public_key()
    assert ca_a.serial_number == ca_b.serial_number and ca_a.subject == ca_b.subject
    assert mesh_ca_key(b"\x02" * 32).public_key() != a.public_key()


def test_replayed_unknown_and_expired_nonces(tmp_path: Path) -> None:
    async def run() -> None:
        async with World(tmp_path, _policy()) as coord:
            nonce = (await coord.challenge())["nonce"]
            await coord.attest(request(coord, nonce, _cvm(instance_id=b"\x01" * 20)))
            with pytest.raises(AdmissionRefused, match="NONCE_INVALID: unknown or already used"):
                await coord.attest(request(coord, nonce, _cvm(instance_id=b"\x01" * 20)))
            with pytest.raises(AdmissionRefused, match="NONCE_INVALID"):
                await coord.attest(request(coord, "ab" * 32, _cvm()))
            late = (await coord.challenge())["nonce"]
            coord.clock.advance(61)  # type: ignore[attr-defined]
            with pytest.raises(AdmissionRefused, match="NONCE_INVALID: nonce expired"):
                await coord.attest(request(coord, late, _cvm()))

    asyncio.run(run())


def test_report_data_bound_to_another_csr_key(tmp_path: Path) -> None:
    refused_with("REPORT_DATA_MISMATCH", tmp_path, _cvm(), bind_key=new_p256_key())


def test_report_data_bound_to_another_peer_id(tmp_path: Path) -> None:
    def swap(doc: dict[str, Any]) -> None:
        doc["peer_id"] = "web-2"

    refused_with("REPORT_DATA_MISMATCH", tmp_path, _cvm(), tamper=swap)


@pytest.mark.parametrize(
    ("rule", "code"),
    [
        ({"compose_hashes": ["00" * 32]}, "COMPOSE_HASH_NOT_ALLOWED"),
        ({"app_ids": ["00" * 20]}, "APP_ID_NOT_ALLOWED"),
        ({"os_images": ["00" * 32]}, "OS_IMAGE_NOT_ALLOWED"),
        ({"key_providers": [{"name": "none"}]}, "KEY_PROVIDER_NOT_ALLOWED"),
        ({"peer_ids": ["web-9"]}, "PEER_ID_NOT_ALLOWED"),
    ],
)
def test_group_policy_refusals(tmp_path: Path, rule: dict, code: str) -> None:
    refused_with(code, tmp_path, _cvm(), policy=_policy(**rule))


def test_debug_td_forged_and_foreign_quotes(tmp_path: Path) -> None:
    refused_with("DEBUG_TD", tmp_path / "a", _cvm(debug=True))
    refused_with("QUOTE_INVALID", tmp_path / "b", _cvm(platform=PlatformKey.generate()))

    def forge(doc: dict[str, Any]) -> None:
        quote = bytearray(bytes.fromhex(doc["quote"]))
        quote[200] ^= 1  # inside the TD report: the platform signature no longer covers it
        doc["quote"] = quote.hex()

    refused_with("QUOTE_INVALID", tmp_path / "c", _cvm(), tamper=forge)
    refused_with("GROUP_NOT_ALLOWED", tmp_path / "d", _cvm(), group="db")


def test_a_simulated_quote_is_refused_by_a_tdx_cluster(tmp_path: Path) -> None:
    policy = ClusterPolicy.model_validate({"cluster": "demo", "tee": "tdx", "groups": {"web": {}}})
    with pytest.raises(AdmissionRefused, match="never accepted for tee: tdx"):
        admit(tmp_path, _cvm(), policy=policy)


def test_one_live_instance_per_peer_id(tmp_path: Path) -> None:
    async def run() -> None:
        async with World(tmp_path, _policy()) as coord:
            first, second = _cvm(), _cvm()
            nonce = (await coord.challenge())["nonce"]
            await coord.attest(request(coord, nonce, first))
            nonce = (await coord.challenge())["nonce"]
            with pytest.raises(AdmissionRefused, match="PEER_ID_IN_USE"):
                await coord.attest(request(coord, nonce, second))
            nonce = (await coord.challenge())["nonce"]  # the same instance renews
            await coord.attest(request(coord, nonce, first))
            coord.clock.advance(3601)  # type: ignore[attr-defined]
            nonce = (await coord.challenge())["nonce"]  # its certificate expired: free again
            await coord.attest(request(coord, nonce, second))

    asyncio.run(run())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"group": "Web!"}, "group"),
        ({"peer_id": ""}, "peer_id"),
        ({"nonce": "abc"}, "nonce"),
        ({"nonce": "00" * 16}, "nonce"),
        ({"csr": "not a csr"}, "csr"),
        ({"csr": 5}, "csr"),
        ({"quote": "zz"}, "quote"),
    ],
)
def test_malformed_requests_name_the_field(change: dict, field: str) -> None:
    doc = {"group": "web", "peer_id": "web-1", "nonce": "00" * 32, "csr": _csr(new_p256_key())}
    doc |= _cvm().get_quote_reply(b"")
    with pytest.raises(InputError) as info:
        AdmissionRequest.from_json({**doc, **change})
    assert info.value.field is not None and info.value.field.startswith(field)


def test_a_replica_starting_with_another_policy_adopts_the_one_in_force(tmp_path: Path) -> None:
    """A replica restarted with an old file must not roll the cluster back; a reload may."""

    async def run() -> None:
        world = World(tmp_path, _policy())
        async with world as first:
            in_force = await first.current()
            ca = mesh_ca_cert(world.ca_key, "demo")
            stale = _policy(peer_ids=["web-9"])
            other = Coordinator(stale, world.store, world.ca_key, ca, clock=world.clock)
            adopted, revoked = await other.start()
            assert (adopted.epoch, adopted.digest, revoked) == (in_force.epoch, in_force.digest, ())
            assert other.policy == first.policy != stale
            published, _ = await other.publish_policy(stale)
            assert published.epoch == in_force.epoch + 1
            assert (await first.current()).policy == stale

    asyncio.run(run())
