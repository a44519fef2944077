"""``teemesh plan`` and ``teemesh import-hcl``: the cluster spec, checked and laid out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from teemesh.cli._output import fail, grid, print_json, read_input, stdout, table
from teemesh.errors import MeshError

if TYPE_CHECKING:
    from teemesh.spec import Plan


@click.command("plan")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(spec_path: Path, as_json: bool) -> None:
    """Check a cluster spec and show its CVMs, addresses, route VIPs and admission policy."""
    from teemesh.spec import app_ids, cluster_policy, load_spec, plan_cluster  # noqa: PLC0415

    try:
        laid_out = plan_cluster(load_spec(spec_path))
        policy = cluster_policy(laid_out)
        ids = app_ids(laid_out.spec)
    except MeshError as exc:
        fail(exc)
    if as_json:
        print_json({**laid_out.to_json(), "policy": policy, "app_ids": ids})
        return
    _print_plan(laid_out, policy, ids)


def _print_plan(laid_out: Plan, policy: dict[str, Any], ids: dict[str, str]) -> None:
    spec = laid_out.spec
    coordinators = spec.coordinators
    stdout.print(
        table(
            f"cluster {spec.cluster}",
            [
                ("tee", spec.tee),
                ("os image", spec.os_image_name or ", ".join(spec.os_image_hashes or ())),
                ("network", f"{spec.network} (bridge {laid_out.bridge})"),
                ("transport", spec.transport),
                ("coordinators", f"{coordinators.count}, store {coordinators.store}"),
                ("kms", spec.kms.count),
                ("gateway", spec.gateway.base_domain if spec.gateway else "none (nothing public)"),
                ("teemesh image", spec.image),
                ("TCB statuses", ", ".join(spec.allowed_tcb_statuses)),
            ],
        )
    )
    stdout.print()
    rows = [(c.name, c.role, c.group, c.address) for c in laid_out.cvms]
    stdout.print(grid("CVMs", ("name / peer id", "role", "group", "address"), rows))
    stdout.print()
    routes = [
        (r.name, f"{r.vip}:{r.port}", f"{r.backend} ({r.group})", r.role,
         "any group" if r.callers is None else ", ".join(r.callers), "yes" if r.public else "")
        for r in laid_out.routes
    ]  # fmt: skip
    columns = ("route", "vip", "backend (group)", "role", "callers", "public")
    stdout.print(grid("routes", columns, routes))
    stdout.print()
    groups = [
        (name, rules["compose_hashes"][0][:16] + "...", _ids(rules["peer_ids"]),
         ", ".join(rules["services"]))
        for name, rules in policy["groups"].items()
    ]  # fmt: skip
    title = f"admission policy (tee {policy['tee']})"
    stdout.print(grid(title, ("group", "compose hash", "peer ids", "services"), groups))
    stdout.print()
    stdout.print(grid("app ids (dstack-vpc's x-dstack-target-app; the coordinators' is the VPC "
                      "server)", ("app", "app id"), list(ids.items())))  # fmt: skip
    for warning in laid_out.warnings:
        click.echo(f"warning: {warning}", err=True)


def _ids(peer_ids: list[str]) -> str:
    """``worker-0..4`` for a group's consecutive peer ids."""
    if len(peer_ids) <= 2:
        return ", ".join(peer_ids)
    prefix, _, _ = peer_ids[0].rpartition("-")
    return f"{prefix}-0..{len(peer_ids) - 1}"


@click.command("import-hcl")
@click.argument("tf_path", metavar="CLUSTER.TF", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the spec here.")
@click.option(
    "--tee",
    type=click.Choice(["simulated", "tdx"]),
    default="simulated",
    show_default=True,
    help="simulated runs the cluster on this machine; tdx needs --os-image-hash.",
)
@click.option(
    "--os-image-hash", "os_image_hashes", multiple=True, help="An accepted OS image (tee tdx)."
)
def import_hcl(tf_path: Path, out: Path | None, tee: str, os_image_hashes: tuple[str, ...]) -> None:
    """Turn the anchor's Terraform (locals { workload_groups = {...} }) into a cluster spec."""
    import yaml  # noqa: PLC0415

    from teemesh.config import MAX_CONFIG_LEN  # noqa: PLC0415
    from teemesh.spec import parse_spec  # noqa: PLC0415
    from teemesh.spec.hcl import import_hcl as convert  # noqa: PLC0415

    folder = (out or Path("spec.yaml")).resolve().parent
    if not folder.is_dir():
        fail(f"{folder}: no such folder for the spec")
    try:
        text = read_input(str(tf_path), limit=MAX_CONFIG_LEN).decode("utf-8", "replace")
        doc, notes = convert(
            text, source=str(tf_path), tee=tee, os_image_hashes=os_image_hashes,
            relative_to=folder,
        )  # fmt: skip
        parse_spec(doc, source=f"{tf_path} (as a spec)", base_dir=folder)
    except MeshError as exc:
        fail(exc)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    rendered = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    if out is None:
        click.echo(rendered, nl=False)
        return
    try:
        out.write_text(rendered)
    except OSError as exc:
        fail(f"{out}: {exc.strerror or exc}")
    click.echo(f"wrote {out}; check it with: teemesh plan {out}", err=True)


@click.group("rollout")
def rollout() -> None:
    """Rolling upgrades from one spec to the next."""


@rollout.command("plan")
@click.argument("old_path", metavar="OLD_SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("new_path", metavar="NEW_SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the steps and policies as JSON.")
def rollout_plan(old_path: Path, new_path: Path, as_json: bool) -> None:
    """The order in which replicas move from OLD_SPEC to NEW_SPEC, and the admission policy in
    force at each step: both compose hashes while they move, only the new one after."""
    from teemesh.spec import load_spec, plan_cluster  # noqa: PLC0415
    from teemesh.spec.rollout import rollout_plan as plan_rollout  # noqa: PLC0415

    try:
        old, new = plan_cluster(load_spec(old_path)), plan_cluster(load_spec(new_path))
        steps = plan_rollout(old, new)
    except MeshError as exc:
        fail(exc)
    if as_json:
        print_json(steps.to_json())
        return
    if not steps.steps:
        stdout.print("nothing to roll out: the two specs admit and run the same")
        return
    rows = []
    for n, step in enumerate(steps.steps, 1):
        admitted = ""
        if step.policy is not None:
            admitted = "; ".join(
                f"{g}: " + ", ".join(h[:12] for h in step.policy["groups"][g]["compose_hashes"])
                for g in steps.changed if g in step.policy["groups"]
            )  # fmt: skip
        rows.append((str(n), step.action, step.target, admitted, step.wait))
    columns = ("step", "action", "target", "compose hashes admitted", "then wait until")
    stdout.print(grid(f"rollout of {', '.join(steps.changed) or 'the policy'}", columns, rows))
    stdout.print("publish: write the policy (--json shows it) to the coordinators' policy file, "
                 "then teemesh admin reload")  # fmt: skip


@click.command("render")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to write into (created; the files it names are replaced).",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="Render only this app (a workload group, coordinator or gateway); repeatable. The "
    "policy is always the whole cluster's.",
)
@click.option(
    "--allow-unpinned-images",
    is_flag=True,
    help="Render images referenced by tag: the compose hash then pins a name, not the code.",
)
@click.option(
    "--platform-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="tee: simulated only: the simulated platform's public key (PEM) for the policy.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def render(
    spec_path: Path,
    out: Path,
    groups: tuple[str, ...],
    allow_unpinned_images: bool,
    platform_key: Path | None,
    as_json: bool,
) -> None:
    """Write each dstack app's docker-compose.yaml, app-compose.json and compose hash, and the
    admission policy that admits exactly those hashes (cluster-policy.json). The same spec
    gives the same bytes."""
    from teemesh.spec import load_spec, plan_cluster  # noqa: PLC0415
    from teemesh.spec.deploy import render as render_apps  # noqa: PLC0415

    try:
        laid_out = plan_cluster(load_spec(spec_path))
        pem = platform_key.read_text() if platform_key is not None else None
        rendered = render_apps(laid_out, groups=groups, allow_unpinned=allow_unpinned_images,
                               platform_key=pem, source=str(spec_path))  # fmt: skip
        written = _write_all(out, rendered.files())
    except MeshError as exc:
        fail(exc)
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot write the rendered files: {exc}")
    manifest = rendered.manifest()
    for stale in sorted(p.parent.name for p in out.glob("*/compose-hash")):
        if stale not in manifest["apps"]:
            click.echo(f"warning: {out / stale} is no app of {spec_path} (from an earlier "
                       "render?): do not upload it", err=True)  # fmt: skip
    if as_json:
        print_json(manifest | {"out": str(out), "files": written})
        return
    rows = [
        (name, app["compose_hash"][:12], app["app_id"][:12],
         str(len(app["replicas"])), "yes" if name in rendered.chosen else "",
         ", ".join(n for n in app["allowed_envs"] if not n.startswith("TEEMESH_")) or "-")
        for name, app in manifest["apps"].items()
    ]  # fmt: skip
    columns = ("app", "compose hash", "app id", "replicas", "written", "own env")
    stdout.print(grid(f"rendered {rendered.cluster} into {out}", columns, rows))
    stdout.print(f"full hashes: {out}/<app>/compose-hash, {out / 'manifest.json'}")
    stdout.print(f"policy: {out / manifest['policy']} (per app: compose hash, OS images, key "
                 "provider, TCB statuses, peer ids)")  # fmt: skip


def _write_all(out: Path, files: dict[str, bytes]) -> list[str]:
    """Each file whole (a temporary beside it, then renamed): a reader never sees half of one."""
    import os  # noqa: PLC0415

    for relative, data in files.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.tmp")
        scratch.write_bytes(data)
        os.replace(scratch, path)
    return sorted(files)
