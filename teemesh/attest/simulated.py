"""The simulated TEE: quotes in the real TDX v4 layout, signed by a per-cluster platform key.

A simulated quote is unmistakable: its QE vendor id is ``SIM_QE_VENDOR_ID`` (never Intel's), so
the TDX verifier refuses it before asking dcap-qvl, and only a verifier holding the platform's
public key accepts it. The header's user_data carries the key id and the simulated TCB status,
both covered by the signature.

The measurement state of a simulated CVM (``SimulatedCvm``) is pure: it extends registers and
builds quotes, and never touches files or sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from teemesh.attest.dstack import KeyProvider, compose_hash, default_app_id
from teemesh.attest.eventlog import (
    BOOT_MR_DONE,
    SYSTEM_READY,
    ZERO_RTMR,
    Event,
    extend,
    runtime_event,
)
from teemesh.attest.policy import TCB_STATUSES
from teemesh.attest.quote import (
    ATT_KEY_ECDSA_P256,
    TDX_TEE_TYPE,
    Quote,
    QuoteHeader,
    QuoteSignature,
    TdReport,
)
from teemesh.attest.scale import AttestationV0, encode_attestation_v0
from teemesh.errors import InputError

SIM_QE_VENDOR_ID = b"TEEMESH-SIM-TEE\x00"
_EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
_EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
_EV_IPL = 0x0D


class SimulatedQuoteInvalid(Exception):
    """Raised by ``verify_simulated_quote``; the message says why (mapped to QUOTE_INVALID)."""


def is_simulated(quote: Quote) -> bool:
    return quote.header.qe_vendor_id == SIM_QE_VENDOR_ID


class PlatformKey:
    """The simulated platform's signing key (one per local cluster, like Intel's QE key)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise InputError("the platform key must be a P-256 key")
        self._key = private_key

    @classmethod
    def generate(cls) -> PlatformKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes) -> PlatformKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise InputError(f"not a PEM private key: {exc}", field="platform key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InputError("not an EC private key", field="platform key")
        return cls(key)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, message: bytes) -> bytes:
        r, s = decode_dss_signature(self._key.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def load_platform_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise InputError(f"not a PEM public key: {exc}", field="platform key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InputError("not a P-256 public key", field="platform key")
    return key


def platform_key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()[:16]


def _raw_point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]


def verify_simulated_quote(quote: Quote, public_key: ec.EllipticCurvePublicKey) -> str:
    """Check the platform signature; return the simulated TCB status."""
    if not is_simulated(quote):
        raise SimulatedQuoteInvalid(
            "not a simulated quote (its QE vendor id is not the simulator's)"
        )
    key_id = quote.header.user_data[:16]
    expected_id = platform_key_id(public_key)
    if not hmac.compare_digest(key_id, expected_id):
        raise SimulatedQuoteInvalid(
            f"signed by another platform key (key id {key_id.hex()}, expected {expected_id.hex()})"
        )
    if quote.signature.attestation_key != _raw_point(public_key):
        raise SimulatedQuoteInvalid("attestation key is not the platform key")
    sig = quote.signature.signature
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        public_key.verify(der, quote.signed_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise SimulatedQuoteInvalid("platform signature is invalid") from exc
    code = quote.header.user_data[16]
    if code >= len(TCB_STATUSES):
        raise SimulatedQuoteInvalid(f"unknown simulated TCB status code {code}")
    return TCB_STATUSES[code]


def _image_digest(os_image_hash: bytes, part: str) -> bytes:
    return hashlib.sha384(b"teemesh-sim-os:" + os_image_hash + b":" + part.encode()).digest()


def image_boot_events(os_image_hash: bytes) -> tuple[Event, ...]:
    """Firmware, kernel and command line of the image, measured into RTMR0..2."""
    parts = (
        (0, _EV_EFI_PLATFORM_FIRMWARE_BLOB, "firmware"),
        (1, _EV_EFI_BOOT_SERVICES_APPLICATION, "kernel"),
        (2, _EV_IPL, "cmdline"),
    )
    return tuple(
        Event(
            imr,
            etype,
            _image_digest(os_image_hash, part),
            "",
            f"{part}:{os_image_hash.hex()}".encode(),
        )
        for imr, etype, part in parts
    )


def image_matches(report: TdReport, os_image_hash: bytes) -> bool:
    """Whether a quote's MRTD and RTMR0..2 are what booting this image gives.

    Every simulated measurement is a function of the image hash, so a verifier can check a
    claimed ``vm_config.os_image_hash`` the way dstack's KMS does by measuring the real image.
    """
    registers = [ZERO_RTMR] * 3
    for event in image_boot_events(os_image_hash):
        registers[event.imr] = extend(registers[event.imr], event.measured_digest())
    expected = (_image_digest(os_image_hash, "mrtd"), *registers)
    actual = (report.mr_td, report.rtmr0, report.rtmr1, report.rtmr2)
    return all(hmac.compare_digest(a, b) for a, b in zip(expected, actual, strict=True))


@dataclass(frozen=True)
class OsImage:
    """A named simulated OS image; all its measurements derive from its image hash."""

    name: str

    @property
    def os_image_hash(self) -> bytes:
        return hashlib.sha256(f"teemesh-sim-os:{self.name}:image".encode()).digest()

    @property
    def mr_td(self) -> bytes:
        return _image_digest(self.os_image_hash, "mrtd")

    def boot_events(self) -> tuple[Event, ...]:
        return image_boot_events(self.os_image_hash)


@dataclass
class SimulatedCvm:
    """One CVM's measured state: boots like dstack-util, then quotes on request."""

    platform: PlatformKey
    os_image: OsImage
    app_compose: bytes
    key_provider: KeyProvider = field(default_factory=lambda: KeyProvider("none", ""))
    app_id: bytes | None = None
    instance_id: bytes | None = None
    tcb_status: str = "UpToDate"
    debug: bool = False
    awaiting_keys: bool = False
    """Stop booting after ``boot-mr-done`` until ``finish_boot`` (KMS mode: keys come first)."""
    events: list[Event] = field(default_factory=list)
    _rtmrs: list[bytes] = field(default_factory=lambda: [ZERO_RTMR] * 4)

    def __post_init__(self) -> None:
        if self.tcb_status not in TCB_STATUSES:
            raise InputError(f"unknown TCB status {self.tcb_status!r}", field="tcb_status")
        self.compose_hash = compose_hash(self.app_compose)
        if self.app_id is None:
            self.app_id = default_app_id(self.compose_hash)
        if self.instance_id is None:
            seed = secrets.token_bytes(20)
            self.instance_id = hashlib.sha256(seed + self.app_id).digest()[:20]
        if not self.events:
            self._boot()

    def _boot(self) -> None:
        for event in self.os_image.boot_events():
            self._measure(event)
        assert self.app_id is not None and self.instance_id is not None
        for name, payload in (
            ("system-preparing", b""),
            ("app-id", self.app_id),
            ("compose-hash", self.compose_hash),
            ("instance-id", self.instance_id),
            (BOOT_MR_DONE, b""),
        ):
            self.emit(name, payload)
        if not self.awaiting_keys:
            self.finish_boot(self.key_provider)

    def finish_boot(self, key_provider: KeyProvider) -> None:
        """Measure where the keys came from, then mark the system ready (dstack-util order)."""
        if any(e.event == SYSTEM_READY for e in self.events):
            raise InputError("this CVM has finished booting", field="key_provider")
        self.key_provider = key_provider
        self.awaiting_keys = False
        self.emit("os-image-hash", self.os_image.os_image_hash)
        self.emit("key-provider", key_provider.payload())
        self.emit(SYSTEM_READY, b"")

    def _measure(self, event: Event) -> None:
        self.events.append(event)
        self._rtmrs[event.imr] = extend(self._rtmrs[event.imr], event.measured_digest())

    def emit(self, name: str, payload: bytes) -> None:
        """Extend RTMR3 with a runtime event, as the guest agent's EmitEvent does."""
        self._measure(runtime_event(name, payload))

    @property
    def rtmrs(self) -> Sequence[bytes]:
        return tuple(self._rtmrs)

    def report(self, report_data: bytes) -> TdReport:
        if len(report_data) > 64:
            raise InputError(
                f"at most 64 bytes allowed, got {len(report_data)}", field="report_data"
            )
        attributes = bytearray(bytes.fromhex("0000001000000000"))
        if self.debug:
            attributes[0] |= 1
        return TdReport(
            tee_tcb_svn=bytes.fromhex("0b010400000000000000000000000000"),
            mr_seam=hashlib.sha384(b"teemesh-sim-seam").digest(),
            mr_signer_seam=bytes(48),
            seam_attributes=bytes(8),
            td_attributes=bytes(attributes),
            xfam=bytes.fromhex("e702060000000000"),
            mr_td=self.os_image.mr_td,
            mr_config_id=(b"\x01" + self.compose_hash).ljust(48, b"\0"),
            mr_owner=bytes(48),
            mr_owner_config=bytes(48),
            rtmr0=self._rtmrs[0],
            rtmr1=self._rtmrs[1],
            rtmr2=self._rtmrs[2],
            rtmr3=self._rtmrs[3],
            report_data=report_data.ljust(64, b"\0"),
        )

    def quote(self, report_data: bytes) -> bytes:
        key_id = platform_key_id(self.platform.public_key)
        header = QuoteHeader(
            version=4,
            att_key_type=ATT_KEY_ECDSA_P256,
            tee_type=TDX_TEE_TYPE,
            qe_svn=0,
            pce_svn=0,
            qe_vendor_id=SIM_QE_VENDOR_ID,
            user_data=key_id + bytes([TCB_STATUSES.index(self.tcb_status)]) + bytes(3),
        )
        signed = header.encode() + self.report(report_data).encode()
        sig = QuoteSignature(
            signature=self.platform.sign(signed),
            attestation_key=_raw_point(self.platform.public_key),
            cert_data_type=0,
            cert_data=b"",
            pck_chain_pem=None,
        ).encode()
        return signed + len(sig).to_bytes(4, "little") + sig

    def attestation(self, report_data: bytes) -> bytes:
        """A ``VersionedAttestation`` V0, as the guest agent's ``Attest`` returns."""
        padded = report_data.ljust(64, b"\0")
        runtime = tuple((e.event, e.payload) for e in self.events if e.is_runtime)
        config = json.dumps({"vm_config": json.dumps(self.vm_config())})
        quote = self.quote(report_data)
        return encode_attestation_v0(
            AttestationV0(quote, tuple(self.events), runtime, padded, config)
        )

    def event_log_json(self) -> list[dict[str, Any]]:
        return [event.to_json() for event in self.events]

    def vm_config(self) -> dict[str, Any]:
        return {
            "spec_version": 1,
            "os_image_hash": self.os_image.os_image_hash.hex(),
            "cpu_count": 1,
        }

    def get_quote_reply(self, report_data: bytes) -> dict[str, Any]:
        """A dstack ``GetQuote`` JSON reply for this CVM."""
        return {
            "quote": self.quote(report_data).hex(),
            "event_log": json.dumps(self.event_log_json()),
            "report_data": report_data.ljust(64, b"\0").hex(),
            "vm_config": json.dumps(self.vm_config()),
        }
