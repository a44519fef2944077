"""The dstack guest agent's API (DstackGuest and legacy Tappd), backed by the simulated TEE.

``GuestAgent.call(service, method, args)`` is the whole API: it takes the decoded request
arguments and returns the JSON reply (None for protobuf ``Empty``). Transport, sockets and the
runtime-event log file live at the edge (``agent_http``); this module does no I/O except through
the ``on_event`` hook.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh import __version__
from teemesh.attest.dstack import mr_aggregated, mr_system
from teemesh.attest.simulated import SimulatedCvm
from teemesh.encoding import check_unicode, parse_hex
from teemesh.errors import InputError
from teemesh.identity.certs import (
    DSTACK_NOT_BEFORE,
    CertSpec,
    cert_pem,
    issue,
    key_pem,
    new_p256_key,
)
from teemesh.identity.ratls import (
    OID_APP_ID,
    OID_APP_INFO,
    OID_ATTESTATION,
    OID_CERT_USAGE,
    extension,
    ratls_report_data,
)
from teemesh.platform import keys
from teemesh.platform.appkeys import AgentKeys

TEN_YEARS = dt.timedelta(days=3650)
AGENT_VERSION = "0.5.7"
"""The dstack release whose API we serve (SDKs gate 0.5.7 features on it)."""
UNVERIFIED_DEVICE_ID = hashlib.sha256(b"").digest()
"""What dstack's Info reports before a verifier has seen the PCK certificate."""
Reply = dict[str, Any] | None
EventHook = Callable[[str, bytes], None]


class Args:
    """Request arguments from JSON or a query string; every bad value names its field."""

    def __init__(self, method: str, raw: Mapping[str, Any]) -> None:
        self.method = method
        self.raw = raw

    def _field(self, name: str) -> str:
        return f"{self.method}.{name}"

    def text(self, name: str, default: str = "") -> str:
        value = self.raw.get(name, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise InputError(
                f"expected a string, got {type(value).__name__}", field=self._field(name)
            )
        return value

    def hex(self, name: str, *, max_size: int | None = None) -> bytes:
        return parse_hex(self.raw.get(name) or "", field=self._field(name), max_size=max_size)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.raw.get(name, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "false", "0", ""):
            return value.lower() in ("true", "1")
        raise InputError(f"expected true or false, got {value!r:.40}", field=self._field(name))

    def names(self, name: str) -> list[str]:
        value = self.raw.get(name) or []
        if isinstance(value, str):
            value = [value]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise InputError("expected a list of strings", field=self._field(name))
        return value

    def timestamp(self, name: str) -> dt.datetime | None:
        value = self.raw.get(name)
        if value in (None, ""):
            return None
        try:
            seconds = int(value)
            return dt.datetime.fromtimestamp(seconds, dt.UTC)
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            raise InputError("expected UNIX seconds", field=self._field(name)) from exc


@dataclass
class GuestAgent:
    cvm: SimulatedCvm
    keys: AgentKeys
    app_compose: bytes
    app_name: str = ""
    on_event: EventHook | None = None

    def call(self, service: str, method: str, raw: Mapping[str, Any]) -> Reply:
        table = _TAPPD if service == "tappd" else _DSTACK
        handler = table.get(method)
        if handler is None:
            raise InputError(f"no such method {method!r} in {service}", field="method")
        check_unicode(raw, field=method)
        return handler(self, Args(method, raw))

    # DstackGuest -------------------------------------------------------------------------

    def get_quote(self, args: Args) -> Reply:
        return self.cvm.get_quote_reply(args.hex("report_data", max_size=64))

    def attest(self, args: Args) -> Reply:
        return {"attestation": self.cvm.attestation(args.hex("report_data", max_size=64)).hex()}

    def get_key(self, args: Args) -> Reply:
        derived = keys.get_key(
            self.keys.k256_key,
            self.keys.k256_signature,
            args.text("path"),
            args.text("purpose"),
            args.text("algorithm", "secp256k1"),
        )
        return {
            "key": derived.key.hex(),
            "signature_chain": [s.hex() for s in derived.signature_chain],
        }

    def get_tls_key(self, args: Args) -> Reply:
        key = new_p256_key()
        extensions = [
            extension(OID_APP_ID, self.cvm.app_id or b""),
            extension(OID_CERT_USAGE, b"app:custom"),
        ]
        if args.flag("usage_ra_tls"):
            attestation = self.cvm.attestation(ratls_report_data(key.public_key()))
            extensions.append(extension(OID_ATTESTATION, attestation))
        if args.flag("with_app_info"):
            extensions.append(extension(OID_APP_INFO, self._app_info_msgpack()))
        return self._leaf(key, args, args.text("subject"), extensions)

    def sign(self, args: Args) -> Reply:
        signed = keys.sign(
            self.keys.k256_key, self.keys.k256_signature, args.text("algorithm"), args.hex("data")
        )
        return {
            "signature": signed.signature.hex(),
            "signature_chain": [s.hex() for s in signed.signature_chain],
            "public_key": signed.public_key.hex(),
        }

    def verify(self, args: Args) -> Reply:
        valid = keys.verify(
            args.text("algorithm"), args.hex("data"), args.hex("signature"), args.hex("public_key")
        )
        return {"valid": valid}

    def emit_event(self, args: Args) -> Reply:
        name = args.text("event")
        if not name:
            raise InputError("an event needs a name", field="EmitEvent.event")
        payload = args.hex("payload", max_size=64 * 1024)
        if self.on_event is not None:
            self.on_event(name, payload)  # logged before the extend, as dstack orders them
        self.cvm.emit(name, payload)
        return None

    def version(self, args: Args) -> Reply:
        return {"version": AGENT_VERSION, "rev": f"teemesh-{__version__}"}

    def info(self, args: Args) -> Reply:
        ident = self._identity()
        tcb_info = {
            "mrtd": ident["mrtd"],
            **{f"rtmr{i}": r.hex() for i, r in enumerate(self.cvm.rtmrs)},
            "mr_aggregated": ident["mr_aggregated"],
            "os_image_hash": ident["os_image_hash"],
            "compose_hash": ident["compose_hash"],
            "device_id": ident["device_id"],
            "event_log": self.cvm.event_log_json(),
            "app_compose": self.app_compose.decode(errors="replace"),
        }
        return {
            "app_id": ident["app_id"],
            "instance_id": ident["instance_id"],
            "device_id": ident["device_id"],
            "app_cert": "",
            "tcb_info": json.dumps(tcb_info),
            "app_name": self.app_name,
            "mr_aggregated": ident["mr_aggregated"],
            "os_image_hash": ident["os_image_hash"],
            "compose_hash": ident["compose_hash"],
            "key_provider_info": self.keys.provider.payload().decode(),
            "vm_config": json.dumps(self.cvm.vm_config()),
            "cloud_vendor": "teemesh",
            "cloud_product": "simulated TDX",
        }

    # legacy Tappd -----------------------------------------------------------------------

    def tdx_quote(self, args: Args) -> Reply:
        algorithm = args.text("hash_algorithm") or "sha512"
        prefix = args.text("prefix")
        report_data = keys.tappd_report_data(args.hex("report_data"), algorithm, prefix)
        reply = self.cvm.get_quote_reply(report_data)
        shown_prefix = "" if algorithm == "raw" else (prefix or "app-data").removesuffix(":")
        return {**reply, "hash_algorithm": algorithm, "prefix": shown_prefix}

    def raw_quote(self, args: Args) -> Reply:
        return self.cvm.get_quote_reply(keys.tappd_report_data(args.hex("report_data"), "raw"))

    def derive_key(self, args: Args) -> Reply:
        """Deterministic per path (P-256 from HKDF of the app key), unless random_seed."""
        ikm = secrets.token_bytes(32) if args.flag("random_seed") else self.keys.k256_key
        key = keys.derive_p256_from_seed(ikm, [args.text("path").encode()])
        return self._leaf(key, args, args.text("subject") or args.text("path"), ())

    def derive_k256_key(self, args: Args) -> Reply:
        reply = self.get_key(args)
        assert reply is not None
        return {"k256_key": reply["key"], "k256_signature_chain": reply["signature_chain"]}

    # helpers ----------------------------------------------------------------------------

    def _leaf(
        self,
        key: ec.EllipticCurvePrivateKey,
        args: Args,
        subject: str,
        extensions: Sequence[x509.ExtensionType],
    ) -> Reply:
        """A leaf from the app CA, with dstack's defaults (valid from 1975 for ten years)."""
        spec = CertSpec(
            common_name=subject or "localhost",
            not_before=args.timestamp("not_before") or DSTACK_NOT_BEFORE,
            not_after=args.timestamp("not_after") or dt.datetime.now(dt.UTC) + TEN_YEARS,
            alt_names=tuple(args.names("alt_names")),
            server_auth=args.flag("usage_server_auth", True),
            client_auth=args.flag("usage_client_auth"),
            extensions=tuple(extensions),
        )
        cert = issue(spec, key.public_key(), self.keys.ca_key, self.keys.ca_cert)
        chain = [cert_pem(cert), cert_pem(self.keys.ca_cert)]
        if self.keys.kms_ca_cert is not None:
            chain.append(cert_pem(self.keys.kms_ca_cert))
        return {"key": key_pem(key), "certificate_chain": chain}

    def _identity(self) -> dict[str, str]:
        report = self.cvm.report(b"")
        return {
            "app_id": (self.cvm.app_id or b"").hex(),
            "instance_id": (self.cvm.instance_id or b"").hex(),
            "device_id": UNVERIFIED_DEVICE_ID.hex(),
            "mrtd": report.mr_td.hex(),
            "mr_aggregated": mr_aggregated(report, report.rtmr3).hex(),
            "os_image_hash": self.cvm.os_image.os_image_hash.hex(),
            "compose_hash": self.cvm.compose_hash.hex(),
        }

    def _app_info_msgpack(self) -> bytes:
        """dstack's AppInfo (.1.9) as rmp_serde writes it: a msgpack array in field order."""
        report = self.cvm.report(b"")
        kp = self.keys.provider.payload()
        fields = [
            self.cvm.app_id or b"",
            self.cvm.compose_hash,
            self.cvm.instance_id or b"",
            UNVERIFIED_DEVICE_ID,
            mr_system(report, kp),
            mr_aggregated(report, report.rtmr3),
            self.cvm.os_image.os_image_hash,
            kp,
        ]
        return bytes(msgpack.packb(fields, use_bin_type=True))


Handler = Callable[[GuestAgent, Args], Reply]
_DSTACK: dict[str, Handler] = {
    "GetQuote": GuestAgent.get_quote,
    "Attest": GuestAgent.attest,
    "GetKey": GuestAgent.get_key,
    "GetTlsKey": GuestAgent.get_tls_key,
    "Sign": GuestAgent.sign,
    "Verify": GuestAgent.verify,
    "EmitEvent": GuestAgent.emit_event,
    "Version": GuestAgent.version,
    "Info": GuestAgent.info,
}
_TAPPD: dict[str, Handler] = {
    "TdxQuote": GuestAgent.tdx_quote,
    "RawQuote": GuestAgent.raw_quote,
    "DeriveKey": GuestAgent.derive_key,
    "DeriveK256Key": GuestAgent.derive_k256_key,
    "Info": GuestAgent.info,
    "EmitEvent": GuestAgent.emit_event,
}
