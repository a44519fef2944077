"""Bringing a coordinator up: the mesh CA from the guest agent, then its RA-TLS identity.

Nothing secret is stored: the CA key is derived anew at every start (``GetKey``), and the TLS
key is fresh, bound into a quote of this CVM, and written owner-only for ssl to load. The VPC
API's shared key is derived the same way, so every replica hands nodes the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teemesh.coordinator.vpc import SHARED_KEY_PATH, derive_shared_key
from teemesh.identity.certs import cert_pem
from teemesh.identity.meshca import COORDINATOR_USAGE, GET_KEY_PATH, mesh_ca_cert, mesh_ca_key
from teemesh.identity.ratls import issue_ratls_server_cert
from teemesh.platform.agent_client import AgentClient
from teemesh.platform.prpc import TlsFiles


@dataclass(frozen=True)
class CoordinatorIdentity:
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    tls: TlsFiles
    ca_file: Path
    """The mesh CA certificate (public): what admin tools pin, with the coordinator usage."""
    vpc_shared_key: bytes = field(repr=False)
    """What the VPC API hands registering nodes; secret."""


def prepare(
    cluster: str, agent: AgentClient, state: Path, names: tuple[str, ...]
) -> CoordinatorIdentity:
    ca_key = mesh_ca_key(agent.get_key(GET_KEY_PATH, "mesh-ca"))
    ca_cert = mesh_ca_cert(ca_key, cluster)
    cert, key = issue_ratls_server_cert(
        agent.attest, ca_key, ca_cert, names=names,
        usage=COORDINATOR_USAGE, organization="teemesh",
    )  # fmt: skip
    tls = TlsFiles.write(state, [cert, ca_cert], key, client_ca=ca_cert)
    ca_file = state / "mesh-ca.crt"
    ca_file.write_text(cert_pem(ca_cert))
    vpc_key = derive_shared_key(agent.get_key(SHARED_KEY_PATH, "vpc-shared-key"))
    return CoordinatorIdentity(ca_key, ca_cert, tls, ca_file, vpc_key)
