"""``teemesh kms``: a dstack-compatible key management service, and its auth service."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from teemesh.attest.dcap import CollateralStore
from teemesh.attest.policy import load_policy
from teemesh.cli._options import agent_option, collateral_option, names_option
from teemesh.cli._output import fail, stderr, stdout, table
from teemesh.cli.kms_auth import auth_simple
from teemesh.errors import MeshError

if TYPE_CHECKING:
    from teemesh.platform.bootauth import BootAuthorizer


@click.group()
def kms() -> None:
    """The key management service: root keys, app keys, boot authorization."""


kms.add_command(auth_simple)


def _authorizer(webhook: str | None, config: Path | None, dev: str | None) -> BootAuthorizer:
    chosen = [x for x in (webhook, config, dev) if x is not None]
    if len(chosen) != 1:
        raise click.UsageError(
            "choose exactly one boot authorization: --auth-webhook URL, --auth-config FILE "
            "(built-in auth-simple) or --auth-dev GATEWAY_APP_ID (allows every boot)"
        )
    from teemesh.platform.bootauth import ConfigAuth, DevAuth, WebhookAuth  # noqa: PLC0415

    if webhook is not None:
        return WebhookAuth(webhook)
    if config is not None:
        auth = ConfigAuth(config)
        auth.load()  # a broken file stops start-up instead of denying every boot
        return auth
    assert dev is not None
    return DevAuth(dev)


@kms.command()
@click.option("--listen", default="127.0.0.1:8011", show_default=True, help="HOST:PORT (TLS).")
@click.option(
    "--state",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".teemesh/kms"),
    show_default=True,
    help="Folder for the root keys (owner-only) and this run's TLS files.",
)
@agent_option
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Attestation policy file: which quotes are genuine (tee, platform_key). "
    "TCB status and identity are left to boot authorization.",
)
@collateral_option
@click.option("--auth-webhook", help="Boot authorization service URL (POST /bootAuth/app|kms).")
@click.option(
    "--auth-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Built-in auth-simple: a dstack auth-simple JSON config, re-read on every request.",
)
@click.option("--auth-dev", metavar="GATEWAY_APP_ID", help="Allow every boot (development only).")
@click.option(
    "--onboard",
    "onboard_from",
    multiple=True,
    metavar="URL",
    help="Without root keys yet, take them from this running KMS (repeatable, tried in order).",
)
@names_option
def serve(
    listen: str,
    state: Path,
    agent_endpoint: str | None,
    policy_path: Path,
    collateral: Path | None,
    auth_webhook: str | None,
    auth_config: Path | None,
    auth_dev: str | None,
    onboard_from: tuple[str, ...],
    names: tuple[str, ...],
) -> None:
    """Serve dstack's KMS API over TLS with an RA-TLS certificate."""
    # Imported here: the HTTP stack costs every other teemesh command ~0.5 s at start-up.
    from teemesh.platform.agent_client import AgentClient  # noqa: PLC0415
    from teemesh.platform.kms import Verifier, ca_public_key_id  # noqa: PLC0415
    from teemesh.platform.kms_http import create_app  # noqa: PLC0415
    from teemesh.platform.kms_setup import prepare  # noqa: PLC0415
    from teemesh.platform.prpc import bind_tcp, run_app  # noqa: PLC0415

    agent = AgentClient(agent_endpoint)
    try:
        authorizer = _authorizer(auth_webhook, auth_config, auth_dev)
        policy = load_policy(policy_path)
        store = CollateralStore.open(collateral) if collateral else None
        verifier = Verifier(policy, store)
        sock = bind_tcp(listen)
        host = sock.getsockname()[0]
        node = prepare(
            state,
            attest=agent.attest,
            verifier=verifier,
            authorizer=authorizer,
            onboard_from=onboard_from,
            names=names or (host,),
            progress=lambda message: stderr.print(f"kms: {message}"),
        )
    except MeshError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot start the KMS: {exc}")
    root = node.service.root
    port = sock.getsockname()[1]
    stdout.print(table("teemesh kms", [
        ("listen", f"https://{host}:{port}"),
        ("root keys", node.origin),
        ("key-provider id", ca_public_key_id(root)),
        ("authorization", type(authorizer).__name__),
        ("state", state),
    ]))  # fmt: skip
    try:
        run_app(create_app(node.service), [sock], node.tls)
    finally:
        sock.close()
        agent.close()
