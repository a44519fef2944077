"""``teemesh kms auth-simple``: dstack's auth-simple boot authorization service."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from teemesh.cli._output import fail, stderr, stdout, table
from teemesh.errors import InputError

if TYPE_CHECKING:
    from teemesh.platform.bootauth import BootDecision, BootInfo, BootKind


@click.command("auth-simple")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="auth-simple JSON config, read again on every request.",
)
@click.option(
    "--listen",
    default="127.0.0.1:3000",
    show_default=True,
    help="TCP HOST:PORT to serve the auth webhook API on.",
)
def auth_simple(config_path: Path, listen: str) -> None:
    """Authorize KMS key requests from an auth-simple config (dstack's auth webhook API).

    Point the KMS at it (webhook url http://HOST:PORT). Edits to the config take effect at the
    next request; a config that stops parsing turns every answer into a denial naming why.
    """
    # Imported here: FastAPI, uvicorn and httpx cost every other teemesh command at start-up.
    from teemesh.platform.bootauth import ConfigAuth  # noqa: PLC0415
    from teemesh.platform.bootauth_http import run  # noqa: PLC0415
    from teemesh.platform.prpc import bind_tcp  # noqa: PLC0415

    authorizer = ConfigAuth(config_path)
    try:
        config = authorizer.load()
        sock = bind_tcp(listen)
    except InputError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot listen on {listen}: {exc.strerror or exc}")
    host, port = sock.getsockname()[:2]
    stdout.print(table("teemesh kms auth-simple", [
        ("listening", f"http://{f'[{host}]' if ':' in host else host}:{port}"),
        ("config", config_path),
        ("gateway app id", config.gateway_app_id or None),
        ("os images", len(config.os_images)),
        ("kms mr_aggregated", len(config.kms.mr_aggregated)),
        ("apps", len(config.apps)),
        ("tcb statuses", ", ".join(config.allowed_tcb_statuses) or None),
    ]))  # fmt: skip
    try:
        run(authorizer, [sock], on_decision=_log_decision)
    finally:
        sock.close()


def _log_decision(kind: BootKind, info: BootInfo, decision: BootDecision) -> None:
    """One line per request on stderr, like auth-simple's console log."""
    from rich.text import Text  # noqa: PLC0415

    if kind == "app":
        who = f"appId={info.app_id.hex()} composeHash={info.compose_hash.hex()}"
    else:
        who = f"mrAggregated={info.mr_aggregated.hex()}"
    line = Text(f"bootAuth/{kind} {who} instanceId={info.instance_id.hex()} -> ")
    if decision.is_allowed:
        line.append("allowed", style="green")
    else:
        line.append(f"denied: {decision.reason}", style="red")
    stderr.print(line, soft_wrap=True)
