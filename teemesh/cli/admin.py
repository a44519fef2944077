"""``teemesh admin``: the coordinator's admin API (admissions, revocation, policy reload and
publication)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from teemesh.cli._output import fail, grid, print_json, stdout, table
from teemesh.errors import InputError, MeshError
from teemesh.identity.certs import load_cert_pem
from teemesh.identity.meshca import COORDINATOR_USAGE
from teemesh.net.attested_https import AttestedHttpsClient, issued_by


class Admin:
    def __init__(self, url: str, ca: Path, token_file: Path) -> None:
        try:
            ca_cert = load_cert_pem(ca.read_text(), field=str(ca))
            self.token = token_file.read_text().strip()
        except OSError as exc:
            raise InputError(exc.strerror or str(exc), field=exc.filename) from exc
        self.https = AttestedHttpsClient(url, issued_by(ca_cert), usage=COORDINATOR_USAGE)

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        status, doc = self.https.request(method, path, body, headers)
        if status != 200 or not isinstance(doc, dict):
            detail = doc.get("error") if isinstance(doc, dict) else doc
            fail(f"{self.https.url}{path}: HTTP {status}: {detail}")
        return doc


@click.group()
@click.option("--url", default="https://127.0.0.1:8443", show_default=True, help="A coordinator.")
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(".teemesh/coordinator/mesh-ca.crt"),
    show_default=True,
    help="The mesh CA certificate (the coordinator writes it to STATE/mesh-ca.crt).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(".teemesh/coordinator/admin.token"),
    show_default=True,
    help="The admin bearer token.",
)
@click.pass_context
def admin(ctx: click.Context, url: str, ca: Path, token_file: Path) -> None:
    """Administer a coordinator: list admissions, revoke a peer, reload the policy."""
    try:
        ctx.obj = Admin(url, ca, token_file)
    except MeshError as exc:
        fail(exc)


def _call(ctx: click.Context, method: str, path: str, body: Any = None) -> dict[str, Any]:
    try:
        result: dict[str, Any] = ctx.obj.call(method, path, body)
    except MeshError as exc:
        fail(exc)
    return result


@admin.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def admissions(ctx: click.Context, as_json: bool) -> None:
    """Admitted peers, their instance, app and live certificates."""
    doc = _call(ctx, "GET", "/v1/admin/admissions")
    if as_json:
        print_json(doc)
        return
    rows = [
        (f"{a['group']}/{a['peer_id']}", a["instance_id"][:16], a["app_id"][:16],
         len(a["certs"]), a["not_after"], a["revoked"] or "-")
        for a in doc["admissions"]
    ]  # fmt: skip
    columns = ("peer", "instance", "app id", "certificates", "expires", "revoked")
    stdout.print(grid("admissions", columns, rows))


@admin.command()
@click.argument("group")
@click.argument("peer_id")
@click.option("--reason", default="revoked by an administrator", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def revoke(ctx: click.Context, group: str, peer_id: str, reason: str, as_json: bool) -> None:
    """Revoke a peer's live certificates; its instance is not admitted again as that peer."""
    doc = _call(
        ctx, "POST", "/v1/admin/revoke", {"group": group, "peer_id": peer_id, "reason": reason}
    )
    if as_json:
        print_json(doc)
        return
    stdout.print(table("revoked", [
        ("peer", f"{doc['group']}/{doc['peer_id']}"),
        ("certificates", ", ".join(doc["serials"]) or "none live"),
        ("reason", doc["reason"]),
    ]))  # fmt: skip


@admin.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def reload(ctx: click.Context, as_json: bool) -> None:
    """Re-read the coordinator's policy file and publish it; revoke what it no longer admits."""
    _show_epoch(_call(ctx, "POST", "/v1/admin/policy/reload", {}), as_json)


@admin.command()
@click.argument("signed_path", metavar="SIGNED_POLICY")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def publish(ctx: click.Context, signed_path: str, as_json: bool) -> None:
    """Publish a signed policy (teemesh policy sign's output, or - for stdin) to every
    coordinator of the cluster; revoke what it no longer admits. The coordinators take it only
    if their policy signer signed it, with a higher serial than the policy in force."""
    from teemesh.cli._output import read_input  # noqa: PLC0415
    from teemesh.config import MAX_CONFIG_LEN  # noqa: PLC0415
    from teemesh.encoding import load_json  # noqa: PLC0415

    try:
        signed = load_json(read_input(signed_path, limit=MAX_CONFIG_LEN), field=signed_path)
    except MeshError as exc:
        fail(exc)
    _show_epoch(_call(ctx, "POST", "/v1/admin/policy", signed), as_json)


def _show_epoch(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(doc)
        return
    revoked = ", ".join(f"{r['group']}/{r['peer_id']}" for r in doc["revoked"])
    stdout.print(table("policy", [
        ("epoch", doc["epoch"]), ("digest", doc["digest"]), ("revoked", revoked or "none"),
    ]))  # fmt: skip
