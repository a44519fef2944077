"""The ``teemesh`` command: a thin layer over the library."""

from __future__ import annotations

import click

from teemesh import __version__
from teemesh.cli.admin import admin
from teemesh.cli.agent import agent
from teemesh.cli.attest import attest
from teemesh.cli.coordinator import coordinator, store_member
from teemesh.cli.kms import kms
from teemesh.cli.local import COMMANDS as LOCAL_COMMANDS
from teemesh.cli.policy import policy
from teemesh.cli.sidecar import sidecar
from teemesh.cli.spec import import_hcl, plan, render, rollout


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="teemesh")
def cli() -> None:
    """teemesh: an attested service mesh for confidential VMs."""


cli.add_command(attest)
cli.add_command(agent)
cli.add_command(kms)
cli.add_command(coordinator)
cli.add_command(store_member)
cli.add_command(admin)
cli.add_command(policy)
cli.add_command(sidecar)
cli.add_command(plan)
cli.add_command(import_hcl)
cli.add_command(rollout)
cli.add_command(render)
for command in LOCAL_COMMANDS:
    cli.add_command(command)


def main() -> None:
    cli()
