"""Bringing a KMS replica up: root keys (load, bootstrap or onboard), then its RA-TLS identity.

Files under the state folder, all written owner-only via temporary file and rename:
``root-keys.json`` (the roots: never rewritten once present), ``rpc.crt``/``rpc.key`` (this
run's server certificate and key) and ``client-ca.crt`` (the temp CA client certificates chain
to).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from teemesh.errors import PeerError, Refused
from teemesh.platform.bootauth import BootAuthorizer
from teemesh.platform.kms import (
    ROOT_KEYS_FILE,
    KmsService,
    RootKeys,
    Verifier,
    authorize_peer,
    bootstrap_root_keys,
    load_root_keys,
    root_keys_from_kms_key_reply,
    rpc_cert,
    save_root_keys,
)
from teemesh.platform.kms_client import Attest, request_with_attestation
from teemesh.platform.prpc import TlsFiles

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KmsNode:
    service: KmsService
    tls: TlsFiles
    origin: str
    """Where the roots came from this run: "loaded", "bootstrapped" or "onboarded from URL"."""


def onboard(
    source_urls: Sequence[str], verifier: Verifier, authorizer: BootAuthorizer, attest: Attest
) -> tuple[RootKeys, str]:
    """Take the roots from a running replica. Both sides check the other with bootAuth/kms."""

    def source_is_a_kms(cert: x509.Certificate) -> None:
        authorize_peer(verifier, authorizer, cert, "kms")

    failures = []
    for url in source_urls:
        try:
            reply, _ = request_with_attestation(url, source_is_a_kms, attest, "GetKmsKey", {})
            return root_keys_from_kms_key_reply(reply), url
        except Refused as exc:  # every replica decides alike: trying the next one is pointless
            raise Refused(f"onboarding from {url} refused: {exc}") from exc
        except PeerError as exc:
            failures.append(str(exc))
    raise PeerError("onboarding failed: " + "; ".join(failures))


def prepare(
    state: Path,
    *,
    attest: Attest,
    verifier: Verifier,
    authorizer: BootAuthorizer,
    onboard_from: Sequence[str] = (),
    names: tuple[str, ...] = (),
    progress: Progress = lambda message: None,
) -> KmsNode:
    root_path = state / ROOT_KEYS_FILE
    root = load_root_keys(root_path)
    if root is not None:
        origin = "loaded"
    elif onboard_from:
        progress(f"onboarding from {', '.join(onboard_from)}")
        root, url = onboard(onboard_from, verifier, authorizer, attest)
        save_root_keys(root_path, root)
        origin = f"onboarded from {url}"
    else:
        progress("bootstrapping new root keys")
        root = bootstrap_root_keys()
        save_root_keys(root_path, root)
        origin = "bootstrapped"
    progress("issuing the RA-TLS server certificate")
    cert, key = rpc_cert(root, attest, names)
    tls = TlsFiles.write(state, [cert, root.ca_cert], key, client_ca=root.temp_ca_cert)
    service = KmsService(root, authorizer, verifier, self_cert=cert)
    return KmsNode(service, tls, origin)
