"""Conformance: dstack's own Python SDK (dstack-sdk 0.5.4) against `teemesh agent`, a real process."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import vector_path
from cryptography import x509
from procs import started

from teemesh.attest.evidence import analyze, load_evidence
from teemesh.attest.policy import Policy
from teemesh.attest.quote import parse_quote
from teemesh.errors import EvidenceError
from teemesh.identity.ratls import verify_ratls_cert
from teemesh.platform import keys

pytestmark = pytest.mark.integration
import dstack_sdk  # noqa: E402  (a test dependency: installed by scripts/test)

COMPOSE = b'{"manifest_version":2,"name":"conformance","runner":"docker-compose"}\n'
SIM_APP_ID = bytes.fromhex(
    "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
)  # the app appkeys.json belongs to


@dataclass
class RunningAgent:
    socket: Path
    state: Path
    process: subprocess.Popen[bytes]

    def post(self, path: str, body: object = None, **kw) -> httpx.Response:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://agent") as client:
            return (
                client.post(path, json=body, **kw) if body is not None else client.post(path, **kw)
            )


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> Iterator[RunningAgent]:
    tmp = tmp_path_factory.mktemp("agent")
    (tmp / "app-compose.json").write_bytes(COMPOSE)
    sock = tmp / "dstack.sock"
    args = [
        "agent", "--socket", str(sock), "--tappd-socket", str(tmp / "tappd.sock"),
        "--state", str(tmp / "state"), "--app-compose", str(tmp / "app-compose.json"),
        "--app-keys", str(vector_path("dstack/simulator/appkeys.json")),
    ]  # fmt: skip
    with started(args, tmp / "agent.log", sock.exists) as proc:
        yield RunningAgent(sock, tmp / "state", proc.process)
    assert not sock.exists(), "the agent removes its socket on shutdown"


@pytest.fixture()
def client(agent):
    # Not `with`: the SDK's sync __enter__ hands back its async client.
    sdk = dstack_sdk.DstackClient(str(agent.socket))
    yield sdk
    if sdk.async_client._sync_client is not None:
        sdk.async_client._sync_client.close()


def _platform_policy(agent: RunningAgent) -> Policy:
    return Policy(tee="simulated", platform_key=(agent.state / "platform.pub").read_text())


def test_get_key_matches_dstack_vectors_and_chain_recovers(client, expected) -> None:
    want = expected["simulator/appkeys.json"]
    reply = client.get_key("/test/path", "signing")
    assert reply.key == want["derived"]["GetKey"]["/test/path"]["key"]
    sig0, sig1 = reply.decode_signature_chain()
    pub = want["derived"]["GetKey"]["/test/path"]["secp256k1_pubkey"]
    app_pub = keys.recover_signer(sig0, keys.keccak256(f"signing:{pub}".encode()))
    assert app_pub.hex() == want["upstream_asserted"]["app_k256_pubkey_compressed"]
    root = keys.recover_signer(sig1, keys.kms_digest(b"dstack-kms-issued", SIM_APP_ID, app_pub))
    assert root.hex() == want["upstream_asserted"]["kms_root_k256_pubkey_compressed"]


def test_get_key_ed25519(client, expected) -> None:
    reply = client.get_key("vms", "x", algorithm="ed25519")
    assert reply.key == expected["simulator/appkeys.json"]["derived"]["GetKey"]["vms"]["key"]


def test_get_quote_replays_with_the_sdk(client, agent) -> None:
    reply = client.get_quote("test")
    quote = parse_quote(reply.decode_quote())
    assert quote.report.report_data == b"test".ljust(64, b"\0")
    sdk_rtmrs = reply.replay_rtmrs()
    assert [sdk_rtmrs[i] for i in range(4)] == [r.hex() for r in quote.report.rtmrs]
    analysis = analyze(load_evidence(json.dumps(reply.model_dump()).encode()))
    assert analysis.replay_matches
    assert analysis.identity.compose_hash == hashlib.sha256(COMPOSE).digest()


def test_info(client) -> None:
    info = client.info()
    assert len(info.tcb_info.mrtd) == 96 and len(info.tcb_info.rtmr3) == 96
    assert info.compose_hash == hashlib.sha256(COMPOSE).hexdigest()
    assert info.app_id == info.compose_hash[:40]
    assert info.app_name == "conformance"
    assert info.tcb_info.app_compose == COMPOSE.decode()
    assert json.loads(info.key_provider_info)["name"] == "none"


def test_get_tls_key_is_fresh_and_ra_tls_verifies(client, agent) -> None:
    a = client.get_tls_key(
        subject="svc", alt_names=["svc.local"], usage_ra_tls=True, usage_client_auth=True
    )
    b = client.get_tls_key(subject="svc")
    assert a.key != b.key
    leaf = x509.load_pem_x509_certificate(a.certificate_chain[0].encode())
    ca = x509.load_pem_x509_certificate(a.certificate_chain[1].encode())
    leaf.verify_directly_issued_by(ca)
    assert leaf.subject.rfc4514_string() == "CN=svc"
    verdict = verify_ratls_cert(leaf, _platform_policy(agent), now=int(time.time()))
    assert verdict.ok, verdict.reasons
    plain = x509.load_pem_x509_certificate(b.certificate_chain[0].encode())
    with pytest.raises(EvidenceError, match="no attestation"):
        verify_ratls_cert(plain, _platform_policy(agent), now=0)


def test_get_tls_key_validity_and_app_info(client) -> None:
    reply = client.get_tls_key(
        subject="x", not_before=1_700_000_000, not_after=1_800_000_000, with_app_info=True
    )
    leaf = x509.load_pem_x509_certificate(reply.certificate_chain[0].encode())
    assert int(leaf.not_valid_before_utc.timestamp()) == 1_700_000_000
    assert int(leaf.not_valid_after_utc.timestamp()) == 1_800_000_000
    oids = {e.oid.dotted_string for e in leaf.extensions}
    assert "1.3.6.1.4.1.62397.1.9" in oids


@pytest.mark.parametrize("algorithm", ["ed25519", "secp256k1", "secp256k1_prehashed"])
def test_sign_and_verify(client, algorithm: str) -> None:
    data = hashlib.sha256(b"msg").digest() if algorithm.endswith("prehashed") else b"msg"
    signed = client.sign(algorithm, data)
    assert client.verify(
        algorithm, data, signed.decode_signature(), signed.decode_public_key()
    ).valid
    bad = bytes([signed.decode_signature()[0] ^ 1]) + signed.decode_signature()[1:]
    assert not client.verify(algorithm, data, bad, signed.decode_public_key()).valid
    assert len(signed.signature_chain) == 3


def test_emit_event_extends_rtmr3_and_is_logged(client, agent) -> None:
    before = parse_quote(client.get_quote("x").decode_quote()).report.rtmr3
    client.emit_event("deploy-step", "hello")
    reply = client.get_quote("x")
    assert parse_quote(reply.decode_quote()).report.rtmr3 != before
    analysis = analyze(load_evidence(json.dumps(reply.model_dump()).encode()))
    assert analysis.replay_matches
    assert ("deploy-step", b"hello") in analysis.identity.app_events
    log = agent.state / "runtime_events.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "deploy-step"


def test_version(client) -> None:
    assert client.version().version == "0.5.7"


def test_legacy_tappd_client(agent) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tappd = dstack_sdk.TappdClient(str(agent.socket.parent / "tappd.sock"))
        raw = tappd.tdx_quote("abc", "raw")
        hashed = tappd.tdx_quote("abc", "sha256")
        derived = tappd.derive_key("/p", "subj")
        again = tappd.derive_key("/p", "subj")
        tappd.async_client._sync_client.close()
    assert parse_quote(bytes.fromhex(raw.quote)).report.report_data == bytes(61) + b"abc"
    want = hashlib.sha256(b"app-data:abc").digest().ljust(64, b"\0")
    assert parse_quote(bytes.fromhex(hashed.quote)).report.report_data == want
    assert derived.key == again.key  # deterministic per path


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/GetQuote", {"report_data": "zz"}, "GetQuote.report_data: not hex"),
        ("/GetQuote", {"report_data": "00" * 65}, "at most 64 bytes"),
        ("/GetKey", {"path": "a", "algorithm": "rsa"}, "algorithm"),
        ("/Sign", {"algorithm": "secp256k1_prehashed", "data": "00"}, "expected 32 bytes"),
        ("/Nope", {}, "no such method"),
        ("/prpc/Tappd.TdxQuote", {"report_data": "00", "hash_algorithm": "md5"}, "hash_algorithm"),
        ("/EmitEvent", {"event": "", "payload": ""}, "EmitEvent.event"),
        ("/GetTlsKey", {"not_before": "soon"}, "GetTlsKey.not_before"),
    ],
)
def test_bad_requests_get_400_naming_the_field(agent, path: str, body: dict, field: str) -> None:
    response = agent.post(path, body)
    assert response.status_code == 400
    assert field in response.json()["error"]


def test_lone_surrogate_in_json_is_refused(agent) -> None:
    response = agent.post("/GetKey?json", content=b'{"path": "\\ud800"}')
    assert response.status_code == 400
    assert "body.path: not valid Unicode" in response.json()["error"]


def test_wrong_content_type_and_bad_json(agent) -> None:
    proto = agent.post(
        "/GetQuote", content=b"\x0a\x01x", headers={"content-type": "application/octet-stream"}
    )
    assert proto.status_code == 400 and "protobuf" in proto.json()["error"]
    broken = agent.post("/GetQuote?json", content=b"{")
    assert broken.status_code == 400 and "invalid JSON" in broken.json()["error"]
    listed = agent.post("/GetQuote?json", content=b"[1]")
    assert listed.status_code == 400 and "JSON object" in listed.json()["error"]


def test_get_with_query_arguments_and_0x_hex(agent) -> None:
    transport = httpx.HTTPTransport(uds=str(agent.socket))
    with httpx.Client(transport=transport, base_url="http://agent") as c:
        reply = c.get("/GetQuote", params={"report_data": "0x1234"}).json()
    assert reply["report_data"] == "1234" + "00" * 62
    assert "0x" not in reply["quote"]


def test_socket_is_owner_only(agent) -> None:
    assert stat.S_IMODE(agent.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE((agent.state / "platform.key").stat().st_mode) == 0o600
