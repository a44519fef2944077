"""Options that several long-running roles share, declared once."""

from __future__ import annotations

from pathlib import Path

import click

agent_option = click.option(
    "--agent",
    "agent_endpoint",
    help="This CVM's guest agent: socket path or http URL "
    "(default: $DSTACK_SIMULATOR_ENDPOINT, else /var/run/dstack.sock).",
)
collateral_option = click.option(
    "--collateral",
    type=click.Path(exists=True, path_type=Path),
    help="DCAP collateral file or folder (tee: tdx).",
)
names_option = click.option(
    "--name", "names", multiple=True, help="DNS name or IP for the server certificate (repeatable)."
)
