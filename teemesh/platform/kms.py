"""dstack's KMS: two root keys, every app key derived from them, and who may have which.

The service here is pure: it takes a verified caller certificate and request arguments and
returns dstack's JSON replies. TLS, the state file and the boot-authorization transport live at
the edges (``kms_http``, ``bootauth``). Root keys are never rotated (as in dstack); replicas hold
identical roots after onboarding, so any of them serves any app.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.attest.evidence import vm_config_os_image_hash
from teemesh.attest.policy import TCB_STATUSES, Policy
from teemesh.attest.simulated import image_matches
from teemesh.attest.verify import Verdict
from teemesh.encoding import load_json, parse_hex, string_field
from teemesh.errors import InputError, Refused
from teemesh.fsutil import write_private
from teemesh.identity.certs import (
    CertSpec,
    cert_pem,
    issue,
    key_pem,
    load_cert_pem,
    load_key_pem,
    new_p256_key,
)
from teemesh.identity.ratls import (
    OID_APP_ID,
    OID_ATTESTATION,
    RatlsVerifier,
    extension,
    extension_bytes,
    issue_ratls_server_cert,
    spki_der,
)
from teemesh.platform import keys
from teemesh.platform.bootauth import BootAuthorizer, BootDecision, BootInfo, BootKind

ROOT_KEYS_FILE = "root-keys.json"
KMS_RPC_USAGE = b"kms:rpc"
CA_LIFETIME = dt.timedelta(days=365 * 20)
APP_CA_LIFETIME = dt.timedelta(days=365 * 10)


@dataclass(frozen=True)
class RootKeys:
    """Everything a KMS replica holds; losing it loses every app's keys, so it is fsynced."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    k256_key: bytes
    temp_ca_key: ec.EllipticCurvePrivateKey
    temp_ca_cert: x509.Certificate

    def to_json(self) -> dict[str, str]:
        return {
            "ca_key": key_pem(self.ca_key),
            "ca_cert": cert_pem(self.ca_cert),
            "k256_key": self.k256_key.hex(),
            "temp_ca_key": key_pem(self.temp_ca_key),
            "temp_ca_cert": cert_pem(self.temp_ca_cert),
        }

    @classmethod
    def from_json(cls, doc: Any, *, field: str) -> RootKeys:
        if not isinstance(doc, dict):
            raise InputError("expected a JSON object", field=field)

        def text(name: str) -> str:
            return string_field(doc, name, field=field)

        k256_key = parse_hex(text("k256_key"), field=f"{field}.k256_key", size=32)
        try:
            keys.k256_public_key(k256_key)
        except InputError as exc:
            raise InputError(exc.problem, field=f"{field}.k256_key") from exc
        return cls(
            ca_key=load_key_pem(text("ca_key"), field=f"{field}.ca_key"),
            ca_cert=load_cert_pem(text("ca_cert"), field=f"{field}.ca_cert"),
            k256_key=k256_key,
            temp_ca_key=load_key_pem(text("temp_ca_key"), field=f"{field}.temp_ca_key"),
            temp_ca_cert=load_cert_pem(text("temp_ca_cert"), field=f"{field}.temp_ca_cert"),
        )


def _self_signed_ca(
    name: str, key: ec.EllipticCurvePrivateKey, now: dt.datetime
) -> x509.Certificate:
    spec = CertSpec(name, now - dt.timedelta(hours=1), now + CA_LIFETIME, "Dstack", ca_path_len=1)
    return issue(spec, key.public_key(), key)


def bootstrap_root_keys(now: dt.datetime | None = None) -> RootKeys:
    """Fresh roots for the first replica of a KMS cluster."""
    now = now or dt.datetime.now(dt.UTC)
    ca_key, temp_ca_key = new_p256_key(), new_p256_key()
    while True:  # a random 32-byte string is a valid secp256k1 scalar except with odds ~2**-128
        k256_key = secrets.token_bytes(32)
        try:
            keys.k256_public_key(k256_key)
            break
        except InputError:  # pragma: no cover
            continue
    return RootKeys(
        ca_key=ca_key,
        ca_cert=_self_signed_ca("Dstack KMS CA", ca_key, now),
        k256_key=k256_key,
        temp_ca_key=temp_ca_key,
        temp_ca_cert=_self_signed_ca("Dstack KMS Temp CA", temp_ca_key, now),
    )


def load_root_keys(path: Path) -> RootKeys | None:
    """The persisted roots, or None before bootstrap; a damaged file is an error, never reset."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    return RootKeys.from_json(load_json(text, field=str(path)), field=str(path))


def save_root_keys(path: Path, root: RootKeys) -> None:
    write_private(path, json.dumps(root.to_json(), indent=2).encode())


def rpc_cert(
    root: RootKeys,
    attest: Callable[[bytes], bytes],
    names: tuple[str, ...],
    now: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The KMS's RA-TLS server certificate: its key is bound into a quote of this CVM."""
    return issue_ratls_server_cert(
        attest, root.ca_key, root.ca_cert, names=names or ("teemesh-kms",),
        usage=KMS_RPC_USAGE, organization="Dstack", now=now,
    )  # fmt: skip


def verification_policy(policy: Policy) -> Policy:
    """The quote checks of ``policy`` only: TCB status, advisories and identity go to bootAuth."""
    return Policy(
        tee=policy.tee,
        platform_key=policy.platform_key,
        allowed_tcb_statuses=TCB_STATUSES,
        allowed_advisory_ids=None,
    )


class Verifier(RatlsVerifier):
    """Checks an RA-TLS certificate's evidence and turns it into dstack's boot info."""

    def boot_info(self, cert: x509.Certificate) -> BootInfo:
        verdict = self.verify(cert, verification_policy(self.policy))
        if not verdict.ok:
            raise Refused([f"{r.code}: {r.message}" for r in verdict.reasons])
        return boot_info(verdict)


def boot_info(verdict: Verdict) -> BootInfo:
    """dstack's boot-time view: RTMR3 up to ``boot-mr-done``, no key provider yet."""
    analysis = verdict.analysis
    ident, mrs = analysis.identity, analysis.measurements
    report = analysis.evidence.quote.report
    os_image = ident.os_image_hash
    if os_image is None and verdict.tee == "simulated":  # before the guest measured it
        claimed = vm_config_os_image_hash(analysis.evidence)
        if claimed is not None and image_matches(report, claimed):
            os_image = claimed
    return BootInfo(
        tee_variant="dstack-tdx",
        mr_aggregated=mrs.mr_aggregated_boottime or mrs.mr_aggregated,
        os_image_hash=os_image or b"",
        mr_system=mrs.mr_system_boottime,
        app_id=ident.app_id or b"",
        compose_hash=ident.compose_hash or b"",
        instance_id=ident.instance_id or b"",
        device_id=verdict.device_id or b"",
        key_provider_info=ident.key_provider_payload or b"",
        tcb_status=verdict.tcb_status or "",
        advisory_ids=verdict.advisory_ids,
    )


def authorize_peer(
    verifier: Verifier, authorizer: BootAuthorizer, cert: x509.Certificate, kind: BootKind
) -> tuple[BootInfo, BootDecision]:
    """A CVM or KMS may have keys when its certificate's evidence verifies and bootAuth agrees."""
    if extension_bytes(cert, OID_ATTESTATION) is None:
        raise Refused("the certificate carries no attestation (OID .1.8)")
    info = verifier.boot_info(cert)
    decision = authorizer.authorize(info, kind)
    if not decision.is_allowed:
        raise Refused(f"boot not authorized: {decision.reason}")
    return info, decision


@dataclass
class KmsService:
    root: RootKeys
    authorizer: BootAuthorizer
    verifier: Verifier
    self_cert: x509.Certificate | None = None
    """This KMS's own RA-TLS certificate: it must pass bootAuth/kms before any key leaves."""
    clock: Callable[[], float] = time.time
    _self_info: BootInfo | None = field(default=None, init=False, repr=False)

    def authorize(
        self, cert: x509.Certificate | None, kind: BootKind
    ) -> tuple[BootInfo, BootDecision]:
        if cert is None:
            raise Refused("this method needs a client certificate carrying an attestation")
        allowed = authorize_peer(self.verifier, self.authorizer, cert, kind)
        if self.self_cert is not None:  # dstack's enforce_self_authorization
            if self._self_info is None:
                self._self_info = self.verifier.boot_info(self.self_cert)
            own = self.authorizer.authorize(self._self_info, "kms")
            if not own.is_allowed:
                raise Refused(f"this KMS is not authorized to serve keys: {own.reason}")
        return allowed

    def get_meta(self) -> dict[str, Any]:
        meta = self.authorizer.info()
        return {
            "ca_cert": cert_pem(self.root.ca_cert),
            "allow_any_upgrade": False,
            "k256_pubkey": keys.k256_public_key(self.root.k256_key).hex(),
            "bootstrap_info": None,
            "is_dev": meta.is_dev,
            "gateway_app_id": meta.gateway_app_id,
            "kms_contract_address": None if meta.is_dev else meta.kms_contract_addr,
            "chain_id": None if meta.is_dev else meta.chain_id,
            "app_auth_implementation": None if meta.is_dev else meta.app_implementation,
        }

    def get_temp_ca_cert(self) -> dict[str, Any]:
        """Anyone may mint client certificates with the temp CA: trust comes from the quote."""
        return {
            "temp_ca_cert": cert_pem(self.root.temp_ca_cert),
            "temp_ca_key": key_pem(self.root.temp_ca_key),
            "ca_cert": cert_pem(self.root.ca_cert),
        }

    def get_app_key(self, cert: x509.Certificate | None) -> dict[str, Any]:
        info, decision = self.authorize(cert, "app")
        app_id = info.app_id
        if len(app_id) != 20:
            raise Refused("the attested CVM measured no 20-byte app id")
        derived = keys.derive_app_keys(
            self.root.ca_key, self.root.k256_key, app_id, info.instance_id
        )
        app_ca = self.app_ca_cert(app_id, derived.ca_key)
        gateway_app_id = decision.gateway_app_id
        return {
            "ca_cert": cert_pem(self.root.ca_cert),
            "disk_crypt_key": derived.disk_crypt_key.hex(),
            "env_crypt_key": derived.env_crypt_key.hex(),
            "k256_key": derived.k256_key.hex(),
            "k256_signature": derived.k256_signature.hex(),
            "tproxy_app_id": gateway_app_id,
            "gateway_app_id": gateway_app_id,
            "os_image_hash": info.os_image_hash.hex(),
            # teemesh: the app CA (dstack keeps it in the KMS and signs CSRs with SignCert)
            "app_ca_key": key_pem(derived.ca_key),
            "app_ca_cert": cert_pem(app_ca),
        }

    def app_ca_cert(self, app_id: bytes, ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        spec = CertSpec(
            "Dstack App CA",
            now - dt.timedelta(hours=1),
            now + APP_CA_LIFETIME,
            "Dstack",
            ca_path_len=0,
            extensions=(extension(OID_APP_ID, app_id),),
        )
        return issue(spec, ca_key.public_key(), self.root.ca_key, self.root.ca_cert)

    def get_app_env_encrypt_pub_key(self, args: dict[str, Any]) -> dict[str, Any]:
        app_id = parse_hex(args.get("app_id", ""), field="GetAppEnvEncryptPubKey.app_id", size=20)
        public_key = keys.x25519_public_key(keys.app_env_key(self.root.ca_key, app_id))
        timestamp = int(self.clock())
        return {
            "public_key": public_key.hex(),
            "signature": keys.sign_env_pubkey(self.root.k256_key, app_id, public_key).hex(),
            "timestamp": timestamp,
            "signature_v1": keys.sign_env_pubkey(
                self.root.k256_key, app_id, public_key, timestamp
            ).hex(),
        }

    def get_kms_key(self, cert: x509.Certificate | None) -> dict[str, Any]:
        """The root keys, for another KMS replica whose own attestation passes bootAuth/kms."""
        self.authorize(cert, "kms")
        return {
            "temp_ca_key": key_pem(self.root.temp_ca_key),
            "keys": [{"ca_key": key_pem(self.root.ca_key), "k256_key": self.root.k256_key.hex()}],
            # teemesh: the certificates too, so every replica presents the same CA
            "ca_cert": cert_pem(self.root.ca_cert),
            "temp_ca_cert": cert_pem(self.root.temp_ca_cert),
        }


def root_keys_from_kms_key_reply(reply: Any) -> RootKeys:
    """Rebuild the roots a source KMS handed over in ``GetKmsKey``."""
    if not isinstance(reply, dict):
        raise InputError("expected a JSON object", field="GetKmsKey")
    entries = reply.get("keys")
    if not (isinstance(entries, list) and len(entries) == 1 and isinstance(entries[0], dict)):
        raise InputError("expected exactly one key set", field="GetKmsKey.keys")
    doc = {**entries[0], **{k: reply.get(k) for k in ("temp_ca_key", "ca_cert", "temp_ca_cert")}}
    return RootKeys.from_json(doc, field="GetKmsKey")


def ca_public_key_id(root: RootKeys) -> str:
    """The key-provider id a CVM measures for this KMS: hex of the root CA's SPKI DER."""
    return spki_der(root.ca_cert.public_key()).hex()
