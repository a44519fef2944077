"""The admission helper: a short-lived child of the sidecar that does everything attestation needs.

It checks each coordinator's RA-TLS evidence against the pinned coordinator policy, attests
this CVM through the guest agent to the first coordinator that passes, and checks the SVID that
comes back. It prints one JSON document on stdout: the SVID as PEM (the key never touches a
disk), the certificate fingerprints of every coordinator whose evidence passed, or why it
failed. Running it apart keeps the X.509 library, the quote verifier and pydantic (about 30 MB)
out of the long-running sidecar, and a crash in native verification code out of its data plane.

    python -m teemesh.sidecar.admit LAUNCH.json [--first N] [--vet-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from teemesh.attest.dcap import CollateralStore
from teemesh.attest.policy import Policy
from teemesh.coordinator.client import AdmissionClient
from teemesh.errors import MeshError, Refused
from teemesh.identity.certs import cert_pem, pem_pair
from teemesh.identity.ratls import PinnedPeer
from teemesh.logs import log_event, setup_json_logging
from teemesh.platform.agent_client import AgentClient
from teemesh.sidecar.launch import Launch

log = logging.getLogger("teemesh.sidecar.admission")


def fingerprint(client: AdmissionClient) -> str:
    """The certificate fingerprint of the coordinator ``client`` last checked and used."""
    assert client.https.server_der is not None
    return hashlib.sha256(client.https.server_der).hexdigest()


def vet(clients: list[AdmissionClient]) -> dict[str, str]:
    """Each coordinator whose evidence passes now: its URL -> certificate fingerprint."""

    def one(client: AdmissionClient) -> tuple[str, str | None]:
        try:
            client.https.request("GET", "/v1/ca")
        except MeshError as exc:
            log_event(log, "coordinator_not_vetted", logging.WARNING, url=client.https.url,
                      error=str(exc))  # fmt: skip
            return client.https.url, None
        return client.https.url, fingerprint(client)

    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        return {url: fp for url, fp in pool.map(one, clients) if fp is not None}


def admit(launch: Launch, *, first: int, vet_only: bool) -> dict[str, Any]:
    """The helper's whole job; the result is what it prints."""
    config = launch.config
    store = CollateralStore.open(Path(launch.collateral)) if launch.collateral else None
    check = PinnedPeer(Policy.model_validate(config.coordinator_policy), collateral=store)
    agent = AgentClient(launch.agent)
    clients = [AdmissionClient(url, check, agent) for url in config.coordinators]
    try:
        pins = vet(clients)
        if vet_only:
            return {"ok": True, "pins": sorted(set(pins.values()))}
        order = clients[first % len(clients) :] + clients[: first % len(clients)]
        errors: list[str] = []
        for client in order:
            try:
                svid = client.admit(config.cluster, config.group, config.peer_id)
            except Refused as exc:
                return {"ok": False, "refused": True, "error": str(exc), "pins": [*pins.values()]}
            except MeshError as exc:
                errors.append(f"{client.https.url}: {exc}")
                continue
            pins[client.https.url] = fingerprint(client)
            certificate, key = pem_pair(svid.certificate, svid.key)
            return {
                "ok": True,
                "coordinator": client.https.url,
                "certificate": certificate,
                "key": key,
                "ca_certificate": cert_pem(svid.ca_certificate),
                "spiffe_id": svid.spiffe_id,
                "serial": f"{svid.certificate.serial_number:x}",
                "expires_at": svid.expires_at,
                "renew_after": svid.renew_after,
                "pins": sorted(set(pins.values())),
            }
        return {"ok": False, "refused": False, "error": "; ".join(errors), "pins": []}
    finally:
        agent.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teemesh.sidecar.admit")
    parser.add_argument("launch", type=Path)
    parser.add_argument("--first", type=int, default=0, help="the coordinator to try first")
    parser.add_argument("--vet-only", action="store_true", help="check coordinators, no SVID")
    args = parser.parse_args(argv)
    try:
        launch = Launch.read(args.launch)
        setup_json_logging(launch.log_level)
        result = admit(launch, first=args.first, vet_only=args.vet_only)
    except MeshError as exc:
        result = {"ok": False, "refused": False, "error": str(exc), "pins": []}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
