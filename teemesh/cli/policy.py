"""``teemesh policy``: the operator's signing key and signed cluster policies (dstack's env)."""

from __future__ import annotations

import json
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
    help="The policy's serial (default: now, in UNIX nanoseconds). Once a signed policy is in "
    "force the coordinators take only one with a higher serial: an older one cannot be replayed.",
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
        try:
            doc = parse_yaml(raw.decode("utf-8"), policy_path)
            doc = json.loads(json.dumps(doc, allow_nan=False))  # what a signature can cover
        except UnicodeDecodeError:
            raise ConfigError(policy_path, ["not UTF-8 text"]) from None
        except (TypeError, ValueError) as exc:  # dates, binary, aliases in a loop, NaN
            raise ConfigError(policy_path, [f"not JSON data: {exc}"]) from None
        if not isinstance(doc, dict):
            raise ConfigError(policy_path, ["(top level): expected the cluster policy"])
        if "serial" in doc and serial is None:
            raise ConfigError(policy_path, [f"serial: already {doc['serial']}; give --serial"])
        doc["serial"] = serial if serial is not None else time.time_ns()
        placeholder = {} if doc.get("platform_key") else {"platform_key": "(checked as loaded)"}
        checked = doc | placeholder if doc.get("tee") == "simulated" else doc
        parse_model(ClusterPolicy, checked, source=policy_path)  # as the coordinators will
        signed = sign_policy(doc, load_signing_key(key_path))
    except MeshError as exc:
        fail(exc)
    click.echo(signed)
