"""`teemesh kms` end to end: real KMS, guest-agent and auth-simple processes on loopback.

The KMS runs in a simulated CVM (its own `teemesh agent`), serves TLS with an RA-TLS
certificate, asks a real auth-simple webhook before releasing keys, and hands app keys to the
agent of another simulated CVM, which checks the KMS's attestation first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from etcdkit import free_ports
from procs import Proc, free_port, port_open, run_teemesh, started

from teemesh.attest.dstack import compose_hash
from teemesh.attest.evidence import analyze, load_evidence
from teemesh.attest.policy import Policy
from teemesh.attest.simulated import OsImage, PlatformKey
from teemesh.errors import PeerError, Refused
from teemesh.identity.certs import CertSpec, issue, load_key_pem, new_p256_key
from teemesh.identity.ratls import spki_der
from teemesh.platform import keys
from teemesh.platform.agent_client import AgentClient
from teemesh.platform.kms_client import KmsClient, KmsPolicy, attested_client_cert

pytestmark = pytest.mark.integration

OS_IMAGE = "dstack-0.5.7-sim"
KMS_COMPOSE = b'{"manifest_version":2,"name":"kms","runner":"docker-compose","no_instance_id":true}'
APP_COMPOSE = (
    b'{"manifest_version":2,"name":"web","runner":"docker-compose","kms_enabled":true,'
    b'"allowed_envs":["API_TOKEN","GREETING"]}'
)
OTHER_COMPOSE = b'{"manifest_version":2,"name":"intruder","runner":"docker-compose"}'


@dataclass
class Cluster:
    tmp: Path
    platform_key: Path
    policy: Path
    auth_config: Path
    auth_url: str
    kms_url: str
    kms_state: Path
    kms_agent: Path
    kms_logs: list[Path]
    trust: KmsPolicy

    def kms_args(self, url: str, state: Path, agent: Path, *extra: str) -> list[str]:
        port = url.rsplit(":", 1)[1]
        return [
            "kms", "serve", "--listen", f"127.0.0.1:{port}", "--state", str(state),
            "--agent", str(agent), "--policy", str(self.policy), *extra,
        ]  # fmt: skip

    def write_auth(self, **changes: object) -> None:
        doc = json.loads(self.auth_config.read_text())
        doc.update(changes)
        self.auth_config.write_text(json.dumps(doc))


def _agent_args(tmp: Path, name: str, compose: bytes, platform_key: Path, *extra: str) -> list[str]:
    (tmp / f"{name}.json").write_bytes(compose)
    return [
        "agent", "--socket", str(tmp / f"{name}.sock"), "--state", str(tmp / name),
        "--platform-key", str(platform_key), "--app-compose", str(tmp / f"{name}.json"),
        "--os-image", OS_IMAGE, *extra,
    ]  # fmt: skip


def _boot_mr_aggregated(agent_socket: Path) -> str:
    with AgentClient(str(agent_socket)) as client:
        analysis = analyze(load_evidence(client.attest(b"")))
    assert analysis.measurements.mr_aggregated_boottime is not None
    return analysis.measurements.mr_aggregated_boottime.hex()


def _kms_ready(url: str):
    def ready() -> bool:
        try:
            return (
                httpx.get(f"{url}/prpc/GetTempCaCert", verify=False, timeout=1).status_code == 200
            )
        except httpx.HTTPError:
            return False

    return ready


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("kms")
    platform = PlatformKey.generate()
    key_path = tmp / "platform.key"
    key_path.write_bytes(platform.private_pem())
    (tmp / "platform.pub").write_bytes(platform.public_pem())
    policy = tmp / "policy.yaml"
    policy.write_text("tee: simulated\nplatform_key: platform.pub\n")
    kms_agent = tmp / "kms-agent.sock"
    auth_port, kms_port = free_ports(2)  # distinct: two free_port() calls may both get one
    with started(
        _agent_args(tmp, "kms-agent", KMS_COMPOSE, key_path),
        tmp / "kms-agent.log",
        kms_agent.exists,
    ):
        auth_config = tmp / "auth.json"
        app_id = compose_hash(APP_COMPOSE)[:20].hex()
        auth_config.write_text(
            json.dumps(
                {
                    "gatewayAppId": "gw-app",
                    "osImages": ["0x" + OsImage(OS_IMAGE).os_image_hash.hex()],
                    "kms": {
                        "mrAggregated": [_boot_mr_aggregated(kms_agent)],
                        "allowAnyDevice": True,
                    },
                    "apps": {
                        app_id: {
                            "composeHashes": [compose_hash(APP_COMPOSE).hex()],
                            "allowAnyDevice": True,
                        }
                    },
                }
            )
        )
        auth_url = f"http://127.0.0.1:{auth_port}"
        with started(
            [
                "kms",
                "auth-simple",
                "--config",
                str(auth_config),
                "--listen",
                f"127.0.0.1:{auth_port}",
            ],
            tmp / "auth.log",
            lambda: port_open(auth_port),
        ):
            kms_url = f"https://127.0.0.1:{kms_port}"
            trust = KmsPolicy(
                Policy(
                    tee="simulated",
                    platform_key=platform.public_pem().decode(),
                    compose_hashes=(compose_hash(KMS_COMPOSE).hex(),),
                )
            )
            base = Cluster(
                tmp, key_path, policy, auth_config, auth_url, kms_url, tmp / "kms-a",
                kms_agent, [], trust,
            )  # fmt: skip
            args = base.kms_args(kms_url, base.kms_state, kms_agent, "--auth-webhook", auth_url)
            with started(args, tmp / "kms-a.log", _kms_ready(kms_url)) as kms:
                base.kms_logs.append(kms.log)
                yield base
            _assert_logs_keep_secrets(base)  # every KMS's whole log, its shutdown included


def _assert_logs_keep_secrets(cluster: Cluster, *secrets: str) -> None:
    """No KMS log of the module shows a private key, a root key or any of ``secrets``."""
    roots = json.loads((cluster.kms_state / "root-keys.json").read_text())
    pem_lines = [
        line
        for name in ("ca_key", "temp_ca_key")
        for line in roots[name].splitlines()
        if line and not line.startswith("-----")
    ]
    assert cluster.kms_logs, "no KMS log to check"
    for log in cluster.kms_logs:
        text = log.read_text()
        for secret in ("PRIVATE KEY", roots["k256_key"], *pem_lines, *secrets):
            assert secret not in text, f"{log.name} shows a secret ({secret[:12]}...)"


@contextlib.contextmanager
def _kms(cluster: Cluster, args: list[str], name: str, url: str) -> Iterator[Proc]:
    """A further KMS process; its log joins the ones checked for secrets (here, once it has
    stopped, and again at the end of the module)."""
    log = cluster.tmp / f"{name}.log"
    with started(args, log, _kms_ready(url)) as kms:
        cluster.kms_logs.append(log)
        yield kms
    _assert_logs_keep_secrets(cluster)


def _meta(cluster: Cluster, url: str | None = None) -> dict:
    return KmsClient(url or cluster.kms_url, cluster.trust).call("GetMeta")


def _app_agent(cluster: Cluster, name: str, compose: bytes, *extra: str):
    args = _agent_args(
        cluster.tmp, name, compose, cluster.platform_key,
        "--kms-url", cluster.kms_url, "--kms-policy", str(cluster.tmp / "kms-policy.yaml"), *extra,
    )  # fmt: skip
    (cluster.tmp / "kms-policy.yaml").write_text(
        "tee: simulated\nplatform_key: platform.pub\n"
        f"compose_hashes: [{compose_hash(KMS_COMPOSE).hex()}]\n"
    )
    return args


def test_root_keys_are_owner_only_and_survive_a_restart(cluster: Cluster) -> None:
    root = cluster.kms_state / "root-keys.json"
    assert stat.S_IMODE(root.stat().st_mode) == 0o600
    assert stat.S_IMODE((cluster.kms_state / "rpc.key").stat().st_mode) == 0o600
    before = _meta(cluster)
    saved = root.read_bytes()
    # a second process on the same state (another port) presents the same roots
    other_url = f"https://127.0.0.1:{free_port()}"
    args = cluster.kms_args(
        other_url, cluster.kms_state, cluster.kms_agent, "--auth-webhook", cluster.auth_url
    )
    with _kms(cluster, args, "kms-restart", other_url) as kms:
        after = _meta(cluster, other_url)
        assert "loaded" in kms.output()
    assert root.read_bytes() == saved
    assert after["ca_cert"] == before["ca_cert"]
    assert after["k256_pubkey"] == before["k256_pubkey"]


def test_meta_and_the_server_certificate(cluster: Cluster) -> None:
    client = KmsClient(cluster.kms_url, cluster.trust)
    meta = client.call("GetMeta")
    assert meta["gateway_app_id"] == "gw-app"
    assert meta["is_dev"] is False
    assert len(bytes.fromhex(meta["k256_pubkey"])) == 33
    ca = x509.load_pem_x509_certificate(meta["ca_cert"].encode())
    assert client.server_cert is not None
    client.server_cert.verify_directly_issued_by(ca)


def test_a_client_refuses_a_kms_that_fails_its_policy(cluster: Cluster) -> None:
    stranger = PlatformKey.generate().public_pem().decode()
    wrong_platform = KmsPolicy(Policy(tee="simulated", platform_key=stranger))
    with pytest.raises(PeerError, match="signed by another platform key"):
        KmsClient(cluster.kms_url, wrong_platform).call("GetMeta")
    wrong_app = KmsPolicy(cluster.trust.policy.model_copy(update={"compose_hashes": ("00" * 32,)}))
    with pytest.raises(PeerError, match="COMPOSE_HASH_NOT_ALLOWED"):
        KmsClient(cluster.kms_url, wrong_app).call("GetMeta")


def test_get_app_key_needs_an_attested_client_certificate(cluster: Cluster) -> None:
    with pytest.raises(Refused, match="needs a client certificate"):
        KmsClient(cluster.kms_url, cluster.trust).call("GetAppKey")
    temp = KmsClient(cluster.kms_url, cluster.trust).call("GetTempCaCert")
    ca = x509.load_pem_x509_certificate(temp["temp_ca_cert"].encode())
    ca_key = load_key_pem(temp["temp_ca_key"], field="temp_ca_key")
    key = new_p256_key()
    now = dt.datetime.now(dt.UTC)
    plain = issue(
        CertSpec("no-quote", now, now + dt.timedelta(hours=1), client_auth=True),
        key.public_key(),
        ca_key,
        ca,
    )
    with pytest.raises(Refused, match="carries no attestation"):
        KmsClient(cluster.kms_url, cluster.trust, client_cert=(plain, key)).call("GetAppKey")
    # evidence lifted from another key: the quote binds a different SPKI
    with AgentClient(str(cluster.kms_agent)) as agent:
        stolen = agent.attest(b"\x01" * 64)
    lifted = attested_client_cert(temp, lambda report_data: stolen)
    with pytest.raises(Refused, match="REPORT_DATA_MISMATCH"):
        KmsClient(cluster.kms_url, cluster.trust, client_cert=lifted).call("GetAppKey")


def test_bad_requests_name_the_field(cluster: Cluster) -> None:
    client = KmsClient(cluster.kms_url, cluster.trust)
    with pytest.raises(PeerError, match=r"HTTP 400.*GetAppEnvEncryptPubKey\.app_id"):
        client.call("GetAppEnvEncryptPubKey", {"app_id": "zz"})
    with pytest.raises(PeerError, match=r"HTTP 400.*no such method"):
        client.call("Nope")


def test_app_agent_gets_keys_and_decrypts_its_env(cluster: Cluster) -> None:
    app_id = compose_hash(APP_COMPOSE)[:20]
    client = KmsClient(cluster.kms_url, cluster.trust)
    meta = client.call("GetMeta")
    env_key = client.call("GetAppEnvEncryptPubKey", {"app_id": app_id.hex()})
    public_key = bytes.fromhex(env_key["public_key"])
    digest = keys.env_pubkey_digest(app_id, public_key, env_key["timestamp"])
    signer = keys.recover_signer(bytes.fromhex(env_key["signature_v1"]), digest)
    assert signer == bytes.fromhex(meta["k256_pubkey"])
    sealed = keys.encrypt_env(
        {"API_TOKEN": "s3cr3t value", "GREETING": "it's 'quoted'", "NOT_ALLOWED": "x"}, public_key
    )
    (cluster.tmp / "app.env").write_bytes(sealed)
    args = _app_agent(cluster, "app", APP_COMPOSE, "--encrypted-env", str(cluster.tmp / "app.env"))
    sock = cluster.tmp / "app.sock"
    with started(args, cluster.tmp / "app.log", sock.exists) as app:
        with AgentClient(str(sock)) as agent:
            info = agent.info()
            reply = agent.call("GetKey", {"path": "db", "purpose": "signing"})
            tls = agent.call("GetTlsKey", {"subject": "web", "usage_ra_tls": True})
        env_file = cluster.tmp / "app" / "decrypted-env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert (
            env_file.read_text()
            == "API_TOKEN='s3cr3t value'\nGREETING='it'\"'\"'s '\"'\"'quoted'\"'\"''\n"
        )
        assert "NOT_ALLOWED" in app.output()
        assert "s3cr3t" not in app.output()
    provider = json.loads(info["key_provider_info"])
    ca = x509.load_pem_x509_certificate(meta["ca_cert"].encode())
    leaf, app_ca, root_ca = (
        x509.load_pem_x509_certificate(c.encode()) for c in tls["certificate_chain"]
    )
    leaf.verify_directly_issued_by(app_ca)
    app_ca.verify_directly_issued_by(ca)
    assert root_ca == ca
    assert provider == {"name": "kms", "id": spki_der(ca.public_key()).hex()}
    # the signature chain of GetKey ends at the KMS root k256 key
    key = bytes.fromhex(reply["key"])
    app_sig, kms_sig = (bytes.fromhex(s) for s in reply["signature_chain"])
    app_pub = keys.recover_signer(
        app_sig, keys.keccak256(b"signing:" + keys.k256_public_key(key).hex().encode())
    )
    root = keys.recover_signer(kms_sig, keys.kms_digest(b"dstack-kms-issued", app_id, app_pub))
    assert root == bytes.fromhex(meta["k256_pubkey"])
    _assert_logs_keep_secrets(cluster, reply["key"])


def test_a_boot_that_auth_simple_denies_names_the_reason(cluster: Cluster) -> None:
    result = run_teemesh(
        _app_agent(cluster, "intruder", OTHER_COMPOSE), cluster.tmp / "intruder.log"
    )
    assert result.returncode != 0
    assert "boot not authorized: app not registered" in result.stderr, result.stderr


def test_onboarding_a_second_replica(cluster: Cluster) -> None:
    agent_b = cluster.tmp / "kms-b-agent.sock"
    url_b = f"https://127.0.0.1:{free_port()}"
    with started(
        _agent_args(cluster.tmp, "kms-b-agent", KMS_COMPOSE, cluster.platform_key),
        cluster.tmp / "kms-b-agent.log",
        agent_b.exists,
    ):
        args = cluster.kms_args(
            url_b, cluster.tmp / "kms-b", agent_b,
            "--auth-config", str(cluster.auth_config), "--onboard", cluster.kms_url,
        )  # fmt: skip
        with _kms(cluster, args, "kms-b", url_b) as kms_b:
            assert "onboarded from" in kms_b.output()
            a, b = KmsClient(cluster.kms_url, cluster.trust), KmsClient(url_b, cluster.trust)
            assert a.call("GetMeta")["k256_pubkey"] == b.call("GetMeta")["k256_pubkey"]
            app_id = {"app_id": "11" * 20}
            ka = a.call("GetAppEnvEncryptPubKey", app_id)
            kb = b.call("GetAppEnvEncryptPubKey", app_id)
            assert ka["public_key"] == kb["public_key"]
            # an app gets the same keys from either replica
            derived = []
            for name, url in (("app-on-a", cluster.kms_url), ("app-on-b", url_b)):
                args = _app_agent(cluster, name, APP_COMPOSE)
                args[args.index(cluster.kms_url)] = url
                sock = cluster.tmp / f"{name}.sock"
                with (
                    started(args, cluster.tmp / f"{name}.log", sock.exists),
                    AgentClient(str(sock)) as agent,
                ):
                    derived.append(agent.call("GetKey", {"path": "db"}))
            assert derived[0] == derived[1]
    _assert_logs_keep_secrets(cluster, derived[0]["key"])


def test_onboarding_is_refused_unless_mr_aggregated_is_listed(cluster: Cluster) -> None:
    other = (
        b'{"manifest_version":2,"name":"rogue-kms","runner":"docker-compose","no_instance_id":true}'
    )
    agent_c = cluster.tmp / "kms-c-agent.sock"
    with started(
        _agent_args(cluster.tmp, "kms-c-agent", other, cluster.platform_key),
        cluster.tmp / "kms-c-agent.log",
        agent_c.exists,
    ):
        args = cluster.kms_args(
            f"https://127.0.0.1:{free_port()}", cluster.tmp / "kms-c", agent_c,
            "--auth-dev", "any", "--onboard", cluster.kms_url,
        )  # fmt: skip
        result = run_teemesh(args, cluster.tmp / "kms-c.log")
        cluster.kms_logs.append(cluster.tmp / "kms-c.log")
    assert result.returncode != 0
    assert f"onboarding from {cluster.kms_url} refused" in result.stderr
    assert "aggregated MR not allowed" in result.stderr, result.stderr
    assert not (cluster.tmp / "kms-c" / "root-keys.json").exists()


def test_an_unreachable_webhook_fails_closed(cluster: Cluster) -> None:
    port, dead_port = free_ports(2)
    url, dead = f"https://127.0.0.1:{port}", f"http://127.0.0.1:{dead_port}"
    args = cluster.kms_args(url, cluster.kms_state, cluster.kms_agent, "--auth-webhook", dead)
    with _kms(cluster, args, "kms-dead-webhook", url):
        agent_args = _app_agent(cluster, "app-dead-webhook", APP_COMPOSE)
        agent_args[agent_args.index(cluster.kms_url)] = url
        result = run_teemesh(agent_args, cluster.tmp / "app-dead-webhook.log")
    said = " ".join(result.stderr.split())  # rich wraps long lines
    assert result.returncode != 0  # fails closed, as "unavailable" (503): another KMS may answer
    assert "HTTP 503: boot authorization unavailable" in said, said
    assert f"{dead}/bootAuth/app failed: ConnectError" in said, said


def test_serve_needs_exactly_one_authorization_and_a_valid_config(cluster: Cluster) -> None:
    base = cluster.kms_args(
        f"https://127.0.0.1:{free_port()}", cluster.tmp / "kms-x", cluster.kms_agent
    )
    result = run_teemesh(base, cluster.tmp / "kms-x.log")
    assert result.returncode == 2 and "choose exactly one boot authorization" in result.stderr
    both = [*base, "--auth-dev", "x", "--auth-webhook", cluster.auth_url]
    assert "choose exactly one" in run_teemesh(both, cluster.tmp / "kms-x.log").stderr
    broken = cluster.tmp / "broken-auth.json"
    broken.write_text('{"osImages": ["zz"], "kms": {"mrAggregated": 5}}')
    result = run_teemesh([*base, "--auth-config", str(broken)], cluster.tmp / "kms-x.log")
    assert result.returncode == 2
    assert "osImages" in result.stderr and "mrAggregated" in result.stderr, result.stderr
    assert not (cluster.tmp / "kms-x").exists()
