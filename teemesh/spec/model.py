"""The cluster spec's typed, frozen models: what one YAML document may say about a whole mesh.

Only the shape of each field is checked here; the rules that span fields (unique names, ports
per CVM, routes and their backends) are in ``checks``, so every problem of a well-shaped spec is
reported together.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import AfterValidator, Field, PrivateAttr, StrictInt, field_validator

from teemesh import __version__
from teemesh.attest.policy import Hex32, HexBytes, TcbStatus
from teemesh.checks import Domain, HostPort, Label, LoopbackHostPort, Port
from teemesh.config import Frozen
from teemesh.sidecar.config import HealthCheck

SIM_OS_IMAGE = "dstack-0.5.7-sim"
"""The simulated OS image a ``tee: simulated`` spec boots when it names none."""
DEFAULT_NETWORK = "10.77.0.0/24"
RESERVED_GROUPS = frozenset({"coordinator", "kms", "gateway"})
"""Names of the platform's own CVMs (``coordinator-0``, ``kms-0``, ``gateway-0``)."""
MAX_REPLICAS = 1000
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_METRICS_PORT = 2381
"""Where the host reads a catalog member's health (plain HTTP: /health and /metrics only)."""
DCS_PEER_PORT = 2390
"""The DCS members' peer port (their clients are on loopback, at the DCS route's port)."""
MAX_ROUTES = 1000
DEFAULT_IMAGE = f"teemesh:{__version__}"
"""A tag, not a digest: fine on this machine, refused by ``teemesh render`` unless allowed."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _pattern(regex: re.Pattern[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return AfterValidator(check)


def _vip(value: str) -> str:
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 address") from exc
    if not address.is_loopback:
        raise ValueError(f"{value} is not a loopback address (127.0.0.0/8)")
    if value == "127.0.0.1":
        raise ValueError("127.0.0.1 is where backends and the sidecar API listen")
    return str(address)


def _network(value: str) -> str:
    try:
        net = ipaddress.IPv4Network(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 network like {DEFAULT_NETWORK}") from exc
    if not net.is_private or net.is_loopback or net.is_link_local:
        raise ValueError(f"{net} is not a private network (10/8, 172.16/12, 192.168/16)")
    if net.prefixlen > 30:
        raise ValueError(f"{net} is smaller than a /30")
    return str(net)


def _image_reference(value: str) -> str:
    """A container image reference: no spaces or control characters (it is written into YAML
    and read by compose); whether it is pinned is ``render``'s question. No ``$``: compose
    would fill it in from the environment, which is not measured, and so choose the code."""
    if not value or len(value) > 512 or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{value!r} is not an image reference (like name@sha256:<digest>)")
    if "$" in value:
        raise ValueError(f"{value!r} refers to the environment ($), which is not measured")
    return value


def _text(value: str) -> str:
    """Text that reaches exec and the measured JSON: UTF-8, and no NUL (exec would cut it)."""
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError("is not valid Unicode text (a lone surrogate)") from exc
    return value


Text = Annotated[str, AfterValidator(_text)]
Vip = Annotated[str, AfterValidator(_vip)]
EnvName = Annotated[str, _pattern(_ENV_NAME, "an environment variable name")]


Role = Literal["kms", "coordinator", "gateway", "workload"]


@dataclass(frozen=True)
class CvmSlot:
    """One CVM of the cluster before it has an address: its name is its peer id."""

    name: str
    role: Role
    group: str
    """The workload group, or the role for the platform's own CVMs."""
    index: int


class Dcs(Frozen):
    """An etcd cluster for the workloads' own coordination (Patroni's DCS): one member in each
    coordinator CVM, served to ``callers`` through the mesh as ``<route>:<port>``.

    It is apart from the catalog's etcd, so what the mesh serves to workloads never touches the
    mesh's own state: its data, its members and its failures are the workloads' alone. Measured
    in the coordinators' app-compose: adding it or changing its callers changes their app id,
    and so the mesh CA. The coordinator CVMs then run a
    sidecar, admitted as the group ``coordinator``, which serves this one route."""

    route: Label = "etcd"
    port: Port = 2379
    """Where the members serve clients (on loopback in their CVM) and where the route listens."""
    callers: tuple[Label, ...] = Field(min_length=1)
    """The groups that may use it: say who, there is no "everyone" here."""
    vip: Vip | None = None


class Vpc(Frozen):
    """dstack-vpc's VPC API, served by the coordinators from the catalog, to the apps of
    ``allowed``: ``any`` or workload group names (the policy names their app ids)."""

    allowed: Literal["any"] | tuple[Label, ...]


class Coordinators(Frozen):
    count: int = Field(1, ge=1, le=7)
    store: Literal["embedded", "etcd"] = "embedded"
    """embedded: SQLite in the one coordinator; etcd: a catalog several coordinators share."""
    port: Port = 8443
    dcs: Dcs | None = None
    vpc: Vpc | None = None
    policy_signer: Hex32 | None = None
    """On dstack (``teemesh render``): the Ed25519 public key (raw, hex) whose signature the
    coordinators' policy must carry (``teemesh policy keygen``/``sign``); required for TDX."""


class ClientProxySpec(Frozen):
    """dstack-vpc's header-routed client proxy in each replica's sidecar."""

    listen: LoopbackHostPort = "127.0.0.1:8091"
    """Loopback only: whoever reaches it speaks as the CVM, in the mesh and to its agent."""


class AuthSpec(Frozen):
    """dstack-vpc's auth service for nginx's ``auth_request`` in each replica's sidecar."""

    listen: HostPort = "127.0.0.1:8092"
    callers: tuple[Label, ...] | None = None
    """Groups it answers 200 for (others 403); left out: every group of the cluster."""


class ContrastSpec(Frozen):
    """Contrast's sidecar settings for each replica's sidecar, in Contrast's own grammar: the
    texts its ``CONTRAST_*`` / ``EDG_*`` variables take (checked at plan time by the sidecar's
    parser, ``teemesh.sidecar.contrast``)."""

    ingress: str | None = Field(None, max_length=65536)
    """``<name>#<port>#<disableTLS>`` entries joined by ``##``, or ``DISABLED``."""
    egress: str | None = Field(None, max_length=65536)
    """``<name>#<127.x.y.z:port>#<host:port>`` entries joined by ``##``."""
    admin_port: StrictInt | str | None = None
    """Read-only metrics on ``<the CVM's address>:<port>``; 0 or "": none."""


class Compat(Frozen):
    """The anchors' interfaces a group's apps were written for (``teemesh.sidecar``)."""

    client_proxy: ClientProxySpec | None = None
    auth: AuthSpec | None = None
    contrast: ContrastSpec | None = None


class Kms(Frozen):
    count: int = Field(1, ge=0, le=5)
    """0: the CVMs' keys come from their own agent (dstack's key provider ``none``)."""
    port: Port = 8011
    key_provider_id: HexBytes | None = None
    """The KMS the CVMs must take their keys from: its root CA's SubjectPublicKeyInfo (DER, hex),
    as dstack measures it. Required by ``teemesh render`` for ``tee: tdx``; the local KMS makes
    a new root each ``up``, so a simulated cluster pins the provider's kind only."""


class Gateway(Frozen):
    """Public ingress with dstack names ``<app_id>[-<port>][s|g].<base_domain>``."""

    base_domain: Domain = "teemesh.localhost"
    port: Port = 443
    """Where the gateway listens in its CVM."""
    publish: HostPort = "127.0.0.1:8443"
    """The local platform only: where the gateway is reachable on this machine."""


class SidecarPorts(Frozen):
    """The ports every workload CVM's sidecar takes (the ingress listens on all addresses)."""

    ingress: Port = 7443
    api: Port = 7001


class Backend(Frozen):
    """A service each replica of the group serves on ``127.0.0.1:<port>``.

    Its name is the catalog service routes resolve to (the anchor's ``parent``): entries that
    the anchor lists per route and collapses by port are one backend here, so a backend has one
    owner and one parent by construction."""

    port: Port
    owner: Literal["platform", "workload"] = "platform"
    """platform: the sidecar registers it and checks its health; workload: the workload sets its
    role tags and health through the sidecar's local API (Patroni)."""
    health: HealthCheck | None = None
    public: bool = False
    """Reachable from outside through the gateway (which then may call it whatever ``callers``
    say)."""


class Route(Frozen):
    """A name every CVM can dial (``<route>:<port>``), served by a backend of the declaring group.

    Routes are declared by the group that serves them, as the anchor lists services with the
    workers that run them; every sidecar of the cluster offers every route (one table, so the
    VIPs agree) and the serving sidecars admit only ``callers``."""

    backend: Label
    port: Port | None = None
    """Must equal the backend's port (the default): a route listens where its backend serves."""
    role: Label | None = None
    """Only instances whose workload tags them ``role=<role>`` (a Patroni master or replica)."""
    callers: tuple[Label, ...] | None = None
    """Groups allowed to call through this route; None: every admitted group."""
    vip: Vip | None = None
    """Pin the route's loopback VIP; by default the next free one of 127.77.0.0/16."""
    per_replica: bool = False
    """One route per replica, ``<route>-<index>``, each reaching only ``<group>-<index>``: how
    members of a group call one another by name (Patroni's REST API)."""


class ServedRoute(NamedTuple):
    """A name sidecars offer: a declared route, or one replica's name of a per-replica route."""

    declared: str
    route: Route
    peer: str | None
    """The one replica it reaches; None: any instance."""


class WorkloadGroup(Frozen):
    """Replicas of one app: same code (one compose hash), peer ids ``<group>-<index>``."""

    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    command: str | tuple[str, ...] | None = None
    """What each replica runs locally: a shell command line, or an argument list run as is.
    It sees TEEMESH_CLUSTER, TEEMESH_GROUP, TEEMESH_INDEX, TEEMESH_PEER_ID, TEEMESH_ADDRESS,
    TEEMESH_SIDECAR_API, DSTACK_SIMULATOR_ENDPOINT and ``compose_env``."""
    compose: str | None = Field(None, min_length=1, max_length=4096)
    """A docker compose file for a dstack deployment, relative to the spec; its text is part of
    the group's measured app-compose."""
    compose_env: dict[EnvName, Text] = Field(default_factory=dict)
    """Environment of the group: encrypted env on dstack (only the names are measured), plain
    environment of the local command."""
    backends: dict[Label, Backend] = Field(default_factory=dict)
    routes: dict[Label, Route] = Field(default_factory=dict, max_length=MAX_ROUTES)
    compat: Compat | None = None

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, value: Any) -> str | tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            parts: list[Any] = [value]
        elif isinstance(value, list | tuple):
            parts = list(value)
        else:
            raise ValueError("expected a command line, or a list of arguments")
        if not all(isinstance(p, str) for p in parts):
            raise ValueError("expected a command line, or a list of arguments (strings)")
        if not parts or not parts[0].strip():
            raise ValueError("an empty command runs nothing: leave the field out instead")
        for part in parts:
            _text(part)
        return value if isinstance(value, str) else tuple(parts)

    def served_routes(self, name: str) -> list[tuple[str, ServedRoute]]:
        """This group's routes by the names sidecars offer, in order; ``name`` is the group's
        name. A list: an expanded name may repeat a declared one, which the checks refuse."""
        out: list[tuple[str, ServedRoute]] = []
        for declared, route in self.routes.items():
            if route.per_replica:
                out += [(f"{declared}-{i}", ServedRoute(declared, route, f"{name}-{i}"))
                        for i in range(self.replicas)]  # fmt: skip
            else:
                out.append((declared, ServedRoute(declared, route, None)))
        return out

    def argv(self) -> list[str] | None:
        """The command as an argument list: a command line runs under ``/bin/sh -c``."""
        if self.command is None:
            return None
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return list(self.command)

    def display_command(self) -> str | None:
        if self.command is None or isinstance(self.command, str):
            return self.command
        return shlex.join(self.command)


class ClusterSpec(Frozen):
    cluster: Label
    tee: Literal["tdx", "simulated"] = "tdx"
    """tdx unless the spec says otherwise: a simulated TEE must be asked for by name."""
    os_image: Annotated[str, _pattern(_IMAGE_NAME, "an OS image name")] | None = None
    """The dstack OS image the CVMs boot; simulated images derive their hash from the name."""
    os_image_hashes: tuple[Hex32, ...] | None = None
    """tee: tdx only: the OS image hashes admission accepts (required there)."""
    network: Annotated[str, AfterValidator(_network)] = DEFAULT_NETWORK
    """The cluster subnet of the local platform: the bridge takes the first address."""
    coordinators: Coordinators = Field(default_factory=Coordinators)
    kms: Kms = Field(default_factory=Kms)
    gateway: Gateway | None = None
    transport: Literal["direct", "gateway"] = "direct"
    """direct: sidecars dial each other's CVM address; gateway: through the gateway's
    TLS passthrough."""
    sidecar: SidecarPorts = Field(default_factory=SidecarPorts)
    image: Annotated[str, AfterValidator(_image_reference)] = DEFAULT_IMAGE
    """The teemesh image the rendered composes run (sidecar, coordinator, a group's command):
    ``teemesh render`` wants it pinned, ``<name>@sha256:<digest>``."""
    allowed_tcb_statuses: tuple[TcbStatus, ...] = Field(("UpToDate",), min_length=1)
    """The TCB statuses admission accepts (every group, the coordinators' pin too)."""
    workload_groups: dict[Label, WorkloadGroup] = Field(min_length=1, max_length=256)
    _compose_texts: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def os_image_name(self) -> str | None:
        return self.os_image or (SIM_OS_IMAGE if self.tee == "simulated" else None)

    def compose_text(self, group: str) -> str | None:
        """The text of ``group``'s compose file, as ``load_spec`` read it (None: no compose)."""
        if self.workload_groups[group].compose is None:
            return None
        return self._compose_texts.get(group)

    def with_compose_texts(self, texts: dict[str, str]) -> ClusterSpec:
        """A copy carrying the compose files' text (read once, at load)."""
        copy = self.model_copy()
        copy._compose_texts = dict(texts)
        return copy

    def mesh_groups(self) -> dict[str, WorkloadGroup]:
        """Every group that serves backends through sidecars: the workload groups, and the
        coordinators as the group ``coordinator`` when they serve a DCS."""
        dcs = self.coordinators.dcs
        if dcs is None:
            return dict(self.workload_groups)
        etcd = Backend(port=dcs.port, health=HealthCheck(http="/health"))
        route = Route(backend=dcs.route, callers=dcs.callers, vip=dcs.vip)
        served = WorkloadGroup(replicas=self.coordinators.count, backends={dcs.route: etcd},
                               routes={dcs.route: route})  # fmt: skip
        return self.workload_groups | {"coordinator": served}

    def cvm_slots(self) -> list[CvmSlot]:
        """Every CVM in platform order: KMS, coordinators, gateway, then each group's replicas."""
        fixed: list[tuple[Role, int]] = [
            ("kms", self.kms.count),
            ("coordinator", self.coordinators.count),
            ("gateway", int(self.gateway is not None)),
        ]
        slots = [CvmSlot(f"{r}-{i}", r, r, i) for r, count in fixed for i in range(count)]
        for name, group in self.workload_groups.items():
            slots += [CvmSlot(f"{name}-{i}", "workload", name, i) for i in range(group.replicas)]
        return slots
