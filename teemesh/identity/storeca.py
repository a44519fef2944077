"""The CAs of the coordinators' etcd clusters, which only the coordinator app can derive.

The catalog's etcd and the workloads' DCS each run one member in every coordinator CVM. Their
peers, and the catalog's clients (the coordinators), talk mutual TLS under a CA derived like the
mesh CA from a ``GetKey`` secret of the coordinator app. Another app's CVM cannot derive it, so
no workload can join either cluster, read a member's traffic or be served as a client, whatever
it can reach on the network. Each store has its own CA: a DCS member cannot join the catalog's
cluster. Member and client keys are fresh at every start and never leave their CVM.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.fsutil import write_private
from teemesh.identity.certs import CertSpec, cert_pem, issue, key_pem, new_p256_key
from teemesh.identity.meshca import CLOCK_SKEW, derived_ca_cert
from teemesh.net.tls import tls_context

if TYPE_CHECKING:
    from teemesh.platform.agent_client import AgentClient

StoreName = Literal["etcd", "dcs"]
STORES: tuple[StoreName, ...] = ("etcd", "dcs")
"""``etcd``: the catalog's cluster; ``dcs``: the workloads' (``coordinators.dcs``)."""
LEAF_LIFETIME = dt.timedelta(days=3650)
"""A member's or client's certificate: its key is fresh at every start and never leaves the CVM,
so it needs no rotation; the CA, not expiry, bounds who may connect."""


def get_key_path(store: StoreName) -> str:
    """The GetKey path a store's CA secret is derived from."""
    return f"teemesh/store-ca/{store}/v1"


@dataclass(frozen=True)
class StoreCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def derive(cls, secret: bytes, cluster: str, store: StoreName) -> StoreCa:
        # Imported here like the mesh CA's: only coordinator CVMs derive keys.
        from teemesh.platform.keys import derive_p256_from_seed  # noqa: PLC0415

        key = derive_p256_from_seed(secret, [b"teemesh-store-ca", store.encode()])
        return cls(key, derived_ca_cert(key, f"teemesh {store} CA {cluster}"))

    @classmethod
    def from_agent(cls, agent: AgentClient, cluster: str, store: StoreName) -> StoreCa:
        """The store's CA from this CVM's guest agent: the same in every coordinator CVM."""
        return cls.derive(agent.get_key(get_key_path(store), "store-ca"), cluster, store)

    def client_context(self, common_name: str) -> ssl.SSLContext:
        """A client of the store: it presents a fresh certificate and trusts only this CA."""
        return tls_context(
            server=False, identity=self.issue_leaf(common_name), verify=cert_pem(self.cert)
        )

    def issue_leaf(
        self, common_name: str, *, names: tuple[str, ...] = (), now: dt.datetime | None = None
    ) -> tuple[str, str]:
        """A fresh key and its certificate (PEM chain, key) for both TLS roles: etcd members
        dial each other as clients and serve as servers; ``names`` are its DNS names and IPs."""
        start = (now or dt.datetime.now(dt.UTC)) - CLOCK_SKEW
        key = new_p256_key()
        spec = CertSpec(
            common_name,
            start,
            start + LEAF_LIFETIME,
            organization="teemesh",
            alt_names=names,
            server_auth=True,
            client_auth=True,
        )
        cert = issue(spec, key.public_key(), self.key, self.cert)
        return cert_pem(cert) + cert_pem(self.cert), key_pem(key)


@dataclass(frozen=True)
class MemberTls:
    """A member's TLS files, owner-only in ``folder`` (etcd loads only files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def write(cls, folder: Path, ca: StoreCa, identity: tuple[str, str]) -> MemberTls:
        files = cls(folder / "ca.crt", folder / "member.crt", folder / "member.key")
        write_private(files.ca, cert_pem(ca.cert).encode())
        write_private(files.cert, identity[0].encode())
        write_private(files.key, identity[1].encode())
        return files

    def etcd_flags(self, *, clients: bool) -> list[str]:
        """etcd's flags for mutual TLS between peers and, with ``clients``, with its clients."""
        flags = [
            f"--peer-trusted-ca-file={self.ca}",
            f"--peer-cert-file={self.cert}",
            f"--peer-key-file={self.key}",
            "--peer-client-cert-auth",
        ]
        if clients:
            flags += [
                f"--trusted-ca-file={self.ca}",
                f"--cert-file={self.cert}",
                f"--key-file={self.key}",
                "--client-cert-auth",
            ]
        return flags
