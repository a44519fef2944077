"""``teemesh coordinator``: attested admission and the mesh CA."""

from __future__ import annotations

from pathlib import Path

import click

from teemesh.attest.dcap import CollateralStore
from teemesh.cli._options import agent_option, collateral_option, names_option
from teemesh.cli._output import fail, stderr, stdout, table
from teemesh.coordinator.policy import load_cluster_policy
from teemesh.errors import MeshError


@click.command()
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Cluster policy: cluster name, tee, platform_key, and one attestation policy per group.",
)
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT (TLS).")
@click.option(
    "--state",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".teemesh/coordinator"),
    show_default=True,
    help="Folder for the embedded catalog and this run's TLS files.",
)
@agent_option
@collateral_option
@names_option
def coordinator(
    policy_path: Path,
    listen: str,
    state: Path,
    agent_endpoint: str | None,
    collateral: Path | None,
    names: tuple[str, ...],
) -> None:
    """Admit attested sidecars and issue their mesh certificates (SVIDs)."""
    # Imported here: the HTTP stack costs every other teemesh command at start-up.
    from teemesh.catalog.sqlite import SqliteStore  # noqa: PLC0415
    from teemesh.coordinator.http import create_app  # noqa: PLC0415
    from teemesh.coordinator.service import Coordinator  # noqa: PLC0415
    from teemesh.coordinator.setup import prepare  # noqa: PLC0415
    from teemesh.identity.ratls import spki_der  # noqa: PLC0415
    from teemesh.platform.agent_client import AgentClient  # noqa: PLC0415
    from teemesh.platform.prpc import bind_tcp, run_app  # noqa: PLC0415

    try:
        policy = load_cluster_policy(policy_path)
        store_collateral = CollateralStore.open(collateral) if collateral else None
        sock = bind_tcp(listen)
        host = sock.getsockname()[0]
        with AgentClient(agent_endpoint) as agent:
            stderr.print("coordinator: deriving the mesh CA through the guest agent")
            ident = prepare(policy.cluster, agent, state, names or (host,))
    except MeshError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot start the coordinator: {exc}")

    async def make() -> Coordinator:
        store = await SqliteStore.open(state / "catalog.db")
        return Coordinator(policy, store, ident.ca_key, ident.ca_cert, store_collateral)

    app = create_app(make)
    stdout.print(table("teemesh coordinator", [
        ("listen", f"https://{host}:{sock.getsockname()[1]}"),
        ("cluster", policy.cluster),
        ("tee", policy.tee),
        ("groups", ", ".join(policy.groups) or "-"),
        ("mesh CA key", spki_der(ident.ca_key.public_key()).hex()[-64:]),
        ("catalog", state / "catalog.db"),
    ]))  # fmt: skip
    try:
        run_app(app, [sock], ident.tls)
    finally:
        sock.close()
