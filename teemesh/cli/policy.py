"""``teemesh policy``: the operator's signing key and signed cluster policies (dstack's env)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from teemesh.cli._output import fail, stdout, table
from teemesh.errors import MeshError


@click.group()
def policy() -> None:
    """Sign cluster policies for coordinators that take theirs from the environment."""


@policy.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the private key (PEM, owner-only). Keep it off the cluster.",
)
def keygen(out: Path) -> None:
    """Make an Ed25519 policy signing key; print the public key for the spec's
    coordinators.policy_signer."""
    from teemesh.coordinator.policy_signing import new_signing_key, signer_hex  # noqa: PLC0415
    from teemesh.fsutil import write_private  # noqa: PLC0415

    if out.exists():
        fail(f"{out}: exists; a signing key is not overwritten")
    key, pem = new_signing_key()
    try:
        write_private(out, pem)
    except OSError as exc:
        fail(f"{out}: {exc.strerror or exc}")
    stdout.print(table("policy signing key", [
        ("private key", out),
        ("policy_signer", signer_hex(key)),
    ]))  # fmt: skip


@policy.command()
@click.argument("policy_path", metavar="POLICY")
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The signing key (teemesh policy keygen).",
)
@click.option(
    "--serial",
    type=click.IntRange(1, 2**63 - 1),
    help="The policy's serial (default: now, in UNIX seconds). Once a signed policy is in force "
    "the coordinators take only one with a higher serial: an older one cannot be replayed.",
)
def sign(policy_path: str, key_path: Path, serial: int | None) -> None:
    """Print POLICY (render's cluster-policy.json, a rollout step's policy, or - for stdin)
    signed, on one line: the value of the coordinators' TEEMESH_CLUSTER_POLICY."""
    from teemesh.cli._output import read_input  # noqa: PLC0415
    from teemesh.config import MAX_CONFIG_LEN, ConfigError, parse_model, parse_yaml  # noqa: PLC0415
    from teemesh.coordinator.policy import ClusterPolicy  # noqa: PLC0415
    from teemesh.coordinator.policy_signing import load_signing_key, sign_policy  # noqa: PLC0415

    try:
        raw = read_input(policy_path, limit=MAX_CONFIG_LEN)
        doc = parse_yaml(raw.decode("utf-8", "replace"), policy_path)
        if not isinstance(doc, dict):
            raise ConfigError(policy_path, ["(top level): expected the cluster policy"])
        doc["serial"] = serial if serial is not None else int(time.time())
        if doc.get("tee") != "simulated" or "platform_key" in doc:  # checked as it will load
            parse_model(ClusterPolicy, doc, source=policy_path)
        signed = sign_policy(doc, load_signing_key(key_path))
    except MeshError as exc:
        fail(exc)
    except UnicodeEncodeError:  # a lone surrogate, from an escape in the YAML
        fail(f"{policy_path}: not valid Unicode text")
    click.echo(signed)
