"""``teemesh coordinator``: attested admission and the mesh CA."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from teemesh.attest.dcap import CollateralStore
from teemesh.cli._options import agent_option, collateral_option, names_option
from teemesh.cli._output import fail, stderr, stdout, table
from teemesh.coordinator.policy import ClusterPolicy, load_cluster_policy, parse_cluster_policy
from teemesh.errors import InputError, MeshError

if TYPE_CHECKING:
    from teemesh.coordinator.http_admin import AdminAuth
    from teemesh.identity.storeca import StoreName


@click.command()
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Cluster policy: cluster name, tee, platform_key, and one attestation policy per group.",
)
@click.option(
    "--policy-env",
    metavar="NAME",
    help="Take the cluster policy (JSON or YAML text, platform_key as PEM) from the environment "
    "variable NAME instead of --policy, as on dstack, where it is the app's encrypted env. A "
    "reload (SIGHUP, admin API) re-reads the same text: a process's environment does not "
    "change, so a new policy there takes a restart.",
)
@click.option(
    "--policy-signer",
    metavar="HEX",
    callback=lambda _ctx, _param, value: _signer(value),
    help="With --policy-env: load only a policy this Ed25519 key (raw public key, hex) signed "
    "(teemesh policy sign). On dstack it is in the measured command line, so the host, which can "
    "replace the env, cannot replace the policy.",
)
@click.option(
    "--unsigned-policy",
    is_flag=True,
    help="With --policy-env: take the policy unsigned (a simulated cluster's rendered compose; "
    "a tee: tdx policy is refused unsigned).",
)
@click.option(
    "--cluster",
    help="Load only a policy for this cluster (on dstack it is in the measured command, so a "
    "policy signed for another cluster with the same key is refused).",
)
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT (TLS).")
@click.option(
    "--state",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".teemesh/coordinator"),
    show_default=True,
    help="Folder for the embedded catalog and this run's TLS files.",
)
@click.option(
    "--store",
    "store_kind",
    type=click.Choice(["embedded", "etcd"]),
    default="embedded",
    show_default=True,
    help="The catalog: SQLite in STATE, or an etcd cluster shared by several coordinators.",
)
@click.option(
    "--etcd-endpoints",
    default="http://127.0.0.1:2379",
    show_default=True,
    help="Comma-separated etcd client URLs (--store etcd). With https URLs the coordinator "
    "presents a certificate from the catalog's store CA, derived through the guest agent, and "
    "trusts only members that hold one (their members run under teemesh store-member).",
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Bearer token for the admin API (default: STATE/admin.token, created owner-only).",
)
@click.option(
    "--admin-token-env",
    metavar="NAME",
    help="Take the admin API's bearer token from the environment variable NAME instead of a "
    "file (on dstack: the coordinators' encrypted env, which the operator also holds).",
)
@agent_option
@collateral_option
@names_option
def coordinator(
    policy_path: Path | None,
    policy_env: str | None,
    policy_signer: str | None,
    unsigned_policy: bool,
    cluster: str | None,
    listen: str,
    state: Path,
    store_kind: str,
    etcd_endpoints: str,
    admin_token_file: Path | None,
    admin_token_env: str | None,
    agent_endpoint: str | None,
    collateral: Path | None,
    names: tuple[str, ...],
) -> None:
    """Admit attested sidecars, issue their mesh certificates (SVIDs), serve the catalog.

    SIGHUP (or the admin API) reloads the policy file; what the new policy no longer admits is
    revoked at once and published on the catalog's revocation list. The policy comes from
    --policy FILE or --policy-env NAME (exactly one).
    """
    if admin_token_file is not None and admin_token_env is not None:
        raise click.UsageError("give at most one of --admin-token-file and --admin-token-env")
    # Imported here: the HTTP stack costs every other teemesh command at start-up.
    from teemesh.catalog.store import Store  # noqa: PLC0415
    from teemesh.coordinator.http import create_app  # noqa: PLC0415
    from teemesh.coordinator.service import Coordinator  # noqa: PLC0415
    from teemesh.coordinator.setup import prepare  # noqa: PLC0415
    from teemesh.identity.ratls import spki_der  # noqa: PLC0415
    from teemesh.platform.agent_client import AgentClient  # noqa: PLC0415
    from teemesh.platform.prpc import bind_tcp, run_app  # noqa: PLC0415

    try:
        policy_source = _policy_source(policy_path, policy_env, policy_signer, unsigned_policy)
        policy_source = _for_cluster(policy_source, cluster, unsigned=unsigned_policy)
        policy = policy_source()
        admin = _admin_auth(admin_token_file, admin_token_env, state)
        store_collateral = CollateralStore.open(collateral) if collateral else None
        sock = bind_tcp(listen)
        host = sock.getsockname()[0]
        with AgentClient(agent_endpoint) as agent:
            stderr.print("coordinator: deriving the mesh CA through the guest agent")
            ident = prepare(policy.cluster, agent, state, names or (host,))
            endpoints = [e.strip() for e in etcd_endpoints.split(",") if e.strip()]
            etcd_tls = None
            if store_kind == "etcd" and any(e.startswith("https://") for e in endpoints):
                from teemesh.identity.storeca import StoreCa  # noqa: PLC0415

                store_ca = StoreCa.from_agent(agent, policy.cluster, "etcd")
                etcd_tls = store_ca.client_context("coordinator")
    except MeshError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot start the coordinator: {exc}")

    async def open_store() -> Store:
        if store_kind == "etcd":
            from teemesh.catalog.etcd import EtcdStore, cluster_prefix  # noqa: PLC0415

            prefix = cluster_prefix(policy.cluster)
            return await EtcdStore.open(endpoints, prefix=prefix, tls=etcd_tls)
        from teemesh.catalog.sqlite import SqliteStore  # noqa: PLC0415

        return await SqliteStore.open(state / "catalog.db")

    async def make() -> Coordinator:
        store = await open_store()
        return Coordinator(policy, store, ident.ca_key, ident.ca_cert, store_collateral)

    app = create_app(
        make,
        admin=admin,
        policy_source=policy_source,
        reload_on_sighup=True,
        vpc_shared_key=ident.vpc_shared_key,
        policy_signer=policy_signer,
    )
    stdout.print(table("teemesh coordinator", [
        ("listen", f"https://{host}:{sock.getsockname()[1]}"),
        ("cluster", policy.cluster),
        ("tee", policy.tee),
        ("groups", ", ".join(policy.groups) or "-"),
        ("mesh CA key", spki_der(ident.ca_key.public_key()).hex()[-64:]),
        ("catalog", etcd_endpoints if store_kind == "etcd" else state / "catalog.db"),
        ("admin token", f"${admin_token_env}" if admin_token_env
         else admin_token_file or state / "admin.token"),
        ("mesh CA", ident.ca_file),
    ]))  # fmt: skip
    try:
        run_app(app, [sock], ident.tls)
    finally:
        sock.close()


def _admin_auth(path: Path | None, env_name: str | None, state: Path) -> AdminAuth:
    """The admin token from the variable, the file, or one made in STATE on first start."""
    from teemesh.coordinator.http_admin import AdminAuth  # noqa: PLC0415

    if env_name is not None:
        return AdminAuth.from_token(os.environ.get(env_name, ""), f"${env_name}")
    return AdminAuth.from_file(path or state / "admin.token", create=path is None)


def _signer(value: str | None) -> str | None:
    """An Ed25519 public key, raw, in hex (said now, not at the first policy read)."""
    if value is not None:
        from teemesh.coordinator.policy_signing import SIGNER_LEN  # noqa: PLC0415

        try:
            if len(bytes.fromhex(value)) == SIGNER_LEN:
                return value.lower()
        except ValueError:
            pass
        raise click.BadParameter("expected an Ed25519 public key: 32 bytes in hex")
    return value


def _for_cluster(
    source: Callable[[], ClusterPolicy], cluster: str | None, *, unsigned: bool
) -> Callable[[], ClusterPolicy]:
    """``source``, refusing a policy for another cluster than ``cluster``, and a TDX policy
    taken unsigned (only a simulated cluster may go without a signer)."""

    def read() -> ClusterPolicy:
        policy = source()
        if cluster is not None and policy.cluster != cluster:
            raise InputError(f"the policy is for cluster {policy.cluster!r}, not {cluster!r}",
                             field="cluster")  # fmt: skip
        if unsigned and policy.tee == "tdx":
            raise InputError("a tee: tdx policy is taken only signed (--policy-signer)",
                             field="tee")  # fmt: skip
        return policy

    return read


def _policy_source(
    path: Path | None, env_name: str | None, signer: str | None, unsigned: bool
) -> Callable[[], ClusterPolicy]:
    """How the policy is (re)read: the file each time, or the variable's text read once (the
    environment of a process does not change), signed by ``signer`` unless ``unsigned``."""
    if (path is None) == (env_name is None):
        raise click.UsageError("give exactly one of --policy FILE and --policy-env NAME")
    if env_name is not None and (signer is None) == (not unsigned):
        raise click.UsageError("--policy-env needs --policy-signer HEX (or --unsigned-policy)")
    if env_name is None and (signer or unsigned):
        raise click.UsageError("--policy-signer and --unsigned-policy go with --policy-env")
    if path is not None:
        return lambda: load_cluster_policy(path)
    assert env_name is not None
    source = f"${env_name}"
    text = os.environ.get(env_name, "")
    if not text.strip():
        raise InputError("not set or empty: it should hold the cluster policy", field=source)
    return lambda: parse_cluster_policy(text, source, signer=signer)


@click.command("store-member", context_settings={"ignore_unknown_options": True})
@click.option("--cluster", required=True, help="The cluster's name (it names the store's CA).")
@click.option(
    "--store",
    type=click.Choice(["etcd", "dcs"]),
    required=True,
    help="etcd: the catalog's cluster; dcs: the workloads' (coordinators.dcs). Each has its CA.",
)
@click.option(
    "--tls-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where this member's CA, certificate and fresh key are written, owner-only.",
)
@click.option(
    "--client-tls", is_flag=True, help="Also demand a certificate from the store CA of clients."
)
@agent_option
@click.option(
    "--name",
    "names",
    multiple=True,
    required=True,
    help="DNS name or IP its peers dial it by (repeatable).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def store_member(
    cluster: str,
    store: StoreName,
    tls_dir: Path,
    client_tls: bool,
    agent_endpoint: str | None,
    names: tuple[str, ...],
    command: tuple[str, ...],
) -> None:
    """Run COMMAND (etcd and its flags, after --) as a member of a coordinators' store, with
    mutual TLS under the store's CA, which only the coordinator app can derive.

    The member's certificate is issued here with a fresh key; etcd's TLS flags are appended and
    etcd replaces this process.
    """
    from teemesh.identity.storeca import MemberTls, StoreCa  # noqa: PLC0415
    from teemesh.platform.agent_client import AgentClient  # noqa: PLC0415

    try:
        with AgentClient(agent_endpoint) as agent:
            ca = StoreCa.from_agent(agent, cluster, store)
        files = MemberTls.write(tls_dir, ca, ca.issue_leaf(f"{store} member", names=names))
    except MeshError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write the member's TLS files in {tls_dir}: {exc}")
    argv = [*command, *files.etcd_flags(clients=client_tls)]
    try:
        os.execvp(argv[0], argv)  # noqa: S606 (etcd becomes this process, as a supervisor expects)
    except OSError as exc:
        fail(f"cannot run {argv[0]}: {exc}")
