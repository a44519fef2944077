"""``teemesh render``'s pure core: each app's docker compose, app-compose and compose hash, and
the policy that pins them (teemesh.spec.compose, teemesh.spec.deploy)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from teemesh.attest.simulated import PlatformKey
from teemesh.config import ConfigError
from teemesh.errors import InputError
from teemesh.spec import cluster_policy, load_spec, parse_spec, plan_cluster
from teemesh.spec.compose import PINNED, referenced_env, unpinned_images
from teemesh.spec.deploy import MANIFEST_FILE, POLICY_FILE, render
from teemesh.spec.goyaml import go_scalar, load_compose_yaml
from teemesh.spec.user_compose import MAX_DEPTH

DIGEST = "sha256:" + "ab" * 32
IMAGE = f"registry.example/teemesh@{DIGEST}"
W = "workload_groups"
SPEC: dict[str, Any] = {
    "cluster": "shop",
    "tee": "simulated",
    "image": IMAGE,
    "workload_groups": {
        "api": {
            "replicas": 2,
            "command": "python -m teemesh.examples.starter --port 8080 --peer $TEEMESH_PEER_ID",
            "compose_env": {"API_TOKEN": "x"},
            "backends": {"api": {"port": 8080}},
            "routes": {"api": {"backend": "api"}},
        },
        "db": {
            "replicas": 1,
            "compose": "db/compose.yaml",
            "backends": {"db": {"port": 5432}},
            "routes": {"db": {"backend": "db", "callers": ["api"]}},
        },
    },
}
DB_COMPOSE = {
    "services": {
        "postgres": {
            "image": f"postgres@{DIGEST}",
            "environment": {"POSTGRES_PASSWORD": "${DB_PASSWORD}"},
            "volumes": ["pgdata:/var/lib/postgresql/data"],
        }
    },
    "volumes": {"pgdata": {}},
}


def write_spec(folder: Path, spec: dict[str, Any] | None = None, compose: Any = DB_COMPOSE) -> Path:
    (folder / "db").mkdir(exist_ok=True)
    text = compose if isinstance(compose, str) else yaml.safe_dump(compose, sort_keys=False)
    (folder / "db" / "compose.yaml").write_text(text)
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec or SPEC, sort_keys=False))
    return path


def rendered_files(folder: Path, **kwargs: Any) -> dict[str, bytes]:
    return render(plan_cluster(load_spec(write_spec(folder))), **kwargs).files()


def composed(files: dict[str, bytes], app: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(files[f"{app}/docker-compose.yaml"])
    return doc


def test_every_app_gets_its_compose_app_compose_and_hash(tmp_path: Path) -> None:
    files = rendered_files(tmp_path)
    apps = ("api", "db", "coordinator")
    assert sorted(files) == sorted(
        [f"{a}/{f}" for a in apps for f in ("docker-compose.yaml", "app-compose.json",
                                            "compose-hash")] + [POLICY_FILE, MANIFEST_FILE]
    )  # fmt: skip
    policy = json.loads(files[POLICY_FILE])
    for app in apps:
        app_compose = files[f"{app}/app-compose.json"]
        digest = hashlib.sha256(app_compose).hexdigest()  # an independent sha256 of the bytes
        assert files[f"{app}/compose-hash"] == f"{digest}\n".encode()
        # the compose file is the one the app-compose measures
        measured = json.loads(app_compose)["docker_compose_file"]
        assert files[f"{app}/docker-compose.yaml"] == measured.encode()
        if app != "coordinator":  # the coordinators are a group only when they serve a DCS
            assert policy["groups"][app]["compose_hashes"] == [digest]
    manifest = json.loads(files[MANIFEST_FILE])
    assert manifest["apps"]["api"]["replicas"] == [
        {"TEEMESH_PEER_ID": "api-0", "TEEMESH_INDEX": "0"},
        {"TEEMESH_PEER_ID": "api-1", "TEEMESH_INDEX": "1"},
    ]
    assert (
        manifest["apps"]["db"]["app_id"]
        == hashlib.sha256(files["db/app-compose.json"]).hexdigest()[:40]
    )


def test_rendering_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert rendered_files(tmp_path / "a") == rendered_files(tmp_path / "b")


def test_the_policy_pins_images_key_provider_and_tcb(tmp_path: Path) -> None:
    policy = json.loads(rendered_files(tmp_path)[POLICY_FILE])
    api = policy["groups"]["api"]
    assert api["key_providers"] == [{"name": "kms"}]  # simulated: the local KMS is new each up
    assert api["allowed_tcb_statuses"] == ["UpToDate"]
    assert len(api["os_images"]) == 1
    assert api["peer_ids"] == ["api-0", "api-1"]
    assert "platform_key" not in policy


def test_a_tdx_cluster_must_pin_its_kms(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC) | {"tee": "tdx", "os_image_hashes": ["cd" * 32]}
    with pytest.raises(ConfigError) as info:
        render(plan_cluster(load_spec(write_spec(tmp_path, spec))))
    assert [p.split(":")[0] for p in info.value.problems] == [
        "kms.key_provider_id", "coordinators.policy_signer"
    ]  # fmt: skip
    spec["kms"] = {"key_provider_id": "0x3059" + "ab" * 20}
    spec["coordinators"] = {"policy_signer": "EF" * 32}
    spec["allowed_tcb_statuses"] = ["UpToDate", "SWHardeningNeeded"]
    policy = render(plan_cluster(load_spec(write_spec(tmp_path, spec)))).policy
    assert policy["groups"]["db"]["key_providers"] == [{"name": "kms", "id": "3059" + "ab" * 20}]
    assert policy["groups"]["db"]["allowed_tcb_statuses"] == ["UpToDate", "SWHardeningNeeded"]
    assert policy["groups"]["db"]["os_images"] == ["cd" * 32]
    # and the guest itself refuses another KMS: dstack's own pin, in the measured app-compose
    files = render(plan_cluster(load_spec(write_spec(tmp_path, spec)))).files()
    for app in ("api", "db", "coordinator"):
        assert json.loads(files[f"{app}/app-compose.json"])["key_provider_id"] == "3059" + "ab" * 20


def test_without_a_kms_the_key_provider_is_none_and_nothing_renders(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC) | {"kms": {"count": 0}}
    plan = plan_cluster(load_spec(write_spec(tmp_path, spec)))
    assert cluster_policy(plan)["groups"]["api"]["key_providers"] == [{"name": "none"}]
    with pytest.raises(ConfigError) as info:  # dstack gives env and keys through a KMS
        render(plan)
    assert info.value.problems[0].startswith("kms.count: 0, but on dstack")


def test_the_coordinators_load_only_a_policy_their_signer_signed(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC) | {"coordinators": {"policy_signer": "ab" * 32}}
    files = render(plan_cluster(load_spec(write_spec(tmp_path, spec)))).files()
    command = composed(files, "coordinator")["services"]["teemesh-coordinator"]["command"]
    assert command[command.index("--policy-signer") + 1] == "ab" * 32
    assert "--unsigned-policy" not in command
    unsigned = composed(rendered_files(tmp_path), "coordinator")  # a simulated cluster may
    assert "--unsigned-policy" in unsigned["services"]["teemesh-coordinator"]["command"]


def test_the_workload_compose_wires_sidecar_command_and_user_services(tmp_path: Path) -> None:
    files = rendered_files(tmp_path)
    api = composed(files, "api")["services"]
    assert list(api) == ["teemesh-sidecar", "app"]
    sidecar = api["teemesh-sidecar"]
    assert sidecar["image"] == IMAGE
    assert sidecar["network_mode"] == "host"
    assert "/var/run/dstack.sock:/var/run/dstack.sock" in sidecar["volumes"]
    assert sidecar["command"][:2] == ["sidecar", "dstack"]
    app = api["app"]
    # compose would read $TEEMESH_PEER_ID itself: escaped, the shell sees it
    assert app["entrypoint"][-1].endswith("--peer $$TEEMESH_PEER_ID")
    assert app["environment"]["API_TOKEN"] == "${API_TOKEN}"
    assert app["extra_hosts"] == ["api:127.77.0.10", "db:127.77.0.11"]
    db = composed(files, "db")
    postgres = db["services"]["postgres"]
    assert postgres["network_mode"] == "host"
    assert postgres["extra_hosts"] == ["api:127.77.0.10", "db:127.77.0.11"]
    assert postgres["depends_on"] == ["teemesh-sidecar"]
    assert db["volumes"] == {"teemesh-state": {}, "pgdata": {}}
    allowed = json.loads(files["db/app-compose.json"])["allowed_envs"]
    assert "DB_PASSWORD" in allowed  # what the user's compose refers to is env too
    assert "TEEMESH_PEER_ID" in allowed


def test_the_coordinator_compose_runs_its_store_members(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    spec["coordinators"] = {"count": 3, "store": "etcd",
                            "dcs": {"route": "etcd", "callers": ["db"]}}  # fmt: skip
    files = render(plan_cluster(load_spec(write_spec(tmp_path, spec)))).files()
    services = composed(files, "coordinator")["services"]
    assert list(services) == ["teemesh-catalog", "teemesh-coordinator", "teemesh-dcs",
                              "teemesh-sidecar"]  # fmt: skip
    coordinator = services["teemesh-coordinator"]["command"]
    assert coordinator[:5] == [
        "coordinator",
        "--cluster",
        "shop",
        "--policy-env",
        "TEEMESH_CLUSTER_POLICY",
    ]
    assert "--etcd-endpoints" in coordinator
    catalog = services["teemesh-catalog"]["command"]
    assert catalog[:5] == ["store-member", "--cluster", "shop", "--store", "etcd"]
    assert "--client-tls" in catalog
    assert "--client-tls" not in services["teemesh-dcs"]["command"]
    allowed = json.loads(files["coordinator/app-compose.json"])["allowed_envs"]
    assert allowed == sorted(["TEEMESH_ADDRESS", "TEEMESH_ADMIN_TOKEN", "TEEMESH_CATALOG_CLUSTER",
                              "TEEMESH_CATALOG_ENDPOINTS", "TEEMESH_CLUSTER_POLICY",
                              "TEEMESH_COORDINATORS", "TEEMESH_DCS_CLUSTER", "TEEMESH_INDEX",
                              "TEEMESH_PEER_ID", "TEEMESH_PLATFORM_KEY"])  # fmt: skip


def test_every_env_a_coordinator_sidecar_needs_is_allowed(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    spec["coordinators"] = {"count": 3, "store": "etcd", "dcs": {"callers": ["db"]}}
    spec |= {"gateway": {}, "transport": "gateway"}
    files = render(plan_cluster(load_spec(write_spec(tmp_path, spec)))).files()
    for app in ("coordinator", "api", "db"):
        measured = json.loads(files[f"{app}/app-compose.json"])
        assert "via_gateway" in measured["teemesh"]["sidecar"]
        assert "TEEMESH_VIA_GATEWAY" in measured["allowed_envs"], app
    gateway = json.loads(files["gateway/app-compose.json"])["allowed_envs"]
    assert "TEEMESH_VIA_GATEWAY" not in gateway
    assert {"TEEMESH_GATEWAY_CERT", "TEEMESH_GATEWAY_KEY"} <= set(gateway)


def test_unpinned_images_are_refused_unless_allowed(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    del spec["image"]
    compose = copy.deepcopy(DB_COMPOSE)
    compose["services"]["postgres"]["image"] = "postgres:15"
    path = write_spec(tmp_path, spec, compose)
    with pytest.raises(ConfigError) as info:
        render(plan_cluster(load_spec(path)))
    assert info.value.problems == [
        "image: the teemesh image 'teemesh:0.1.0' is not pinned by digest "
        "(name@sha256:<digest>): a tag can move to other code",
        "db: services.postgres: image 'postgres:15' is not pinned by digest "
        "(name@sha256:<digest>): a tag can move to other code",
        "pin them, or render with --allow-unpinned-images",
    ]
    allowed = render(plan_cluster(load_spec(path)), allow_unpinned=True).files()
    assert composed(allowed, "db")["services"]["postgres"]["image"] == "postgres:15"


@pytest.mark.parametrize(
    "image",
    ["postgres:15", "postgres@sha256:" + "ab" * 31, "postgres@sha256:" + "AB" * 32, "", "x@y"],
)
def test_only_a_full_digest_pins(image: str) -> None:
    assert not PINNED.fullmatch(image)
    text = yaml.safe_dump({"services": {"s": {"image": image}}})
    assert unpinned_images(text) == [("s", image)]


def test_only_the_named_apps_are_rendered(tmp_path: Path) -> None:
    plan = plan_cluster(load_spec(write_spec(tmp_path)))
    files = render(plan, groups=("db",)).files()
    assert {f.split("/")[0] for f in files if "/" in f} == {"db"}
    # the policy and the manifest are the whole cluster's
    assert set(json.loads(files[POLICY_FILE])["groups"]) == {"api", "db"}
    assert set(json.loads(files[MANIFEST_FILE])["apps"]) == {"api", "db", "coordinator"}
    with pytest.raises(ConfigError) as info:
        render(plan, groups=("db", "web", "kms"))
    assert info.value.problems == [
        "--group web: no such app; the apps: api, db, coordinator",
        "--group kms: no such app; the apps: api, db, coordinator",
    ]


@pytest.mark.parametrize(
    ("service", "problem"),
    [
        ({"image": IMAGE, "build": "."}, "build: dstack builds no image"),
        ({"image": IMAGE, "ports": ["80:80"]}, "ports: every container runs in the CVM's network"),
        ({"image": IMAGE, "networks": ["x"]}, "networks: every container runs"),
        ({"image": IMAGE, "network_mode": "bridge"}, "network_mode: 'bridge'"),
        ({"command": "x"}, "image: missing"),
        ({"image": IMAGE, "extra_hosts": "a:1"}, "extra_hosts: expected a list or a mapping"),
        ("not a mapping", "expected a mapping"),
    ],
)
def test_user_services_that_cannot_run_on_dstack_are_named(
    tmp_path: Path, service: Any, problem: str
) -> None:
    path = write_spec(tmp_path, compose={"services": {"web": service}})
    with pytest.raises(InputError) as info:
        render(plan_cluster(load_spec(path)))
    assert f"{W}.db.compose: services.web" in str(info.value)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("services: [a, b]\n", "expected a compose file"),
        ("- 1\n", "expected a compose file"),
        ("services: {a: {image: x}}\nvolumes: [a]\n", "volumes: expected a mapping"),
        ("services: {a: b\n", "not YAML"),
        ("services:\n  app: {image: x}\n", "the service name 'app' is teemesh's"),
        ("services:\n  teemesh-sidecar: {image: x}\n", "the service name 'teemesh-sidecar'"),
        ("services: {}\nvolumes: {teemesh-state: {}}\n", "volumes: the name 'teemesh-state'"),
    ],
)
def test_bad_compose_files_are_named(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(InputError) as info:
        render(plan_cluster(load_spec(write_spec(tmp_path, compose=text))), allow_unpinned=True)
    assert f"{W}.db.compose" in str(info.value)
    assert problem in str(info.value)


def test_user_extra_hosts_and_depends_on_are_kept(tmp_path: Path) -> None:
    compose = {
        "services": {
            "a": {"image": IMAGE, "extra_hosts": {"x": "10.0.0.1"},
                  "depends_on": {"b": {"condition": "service_healthy"}}},
            "b": {"image": IMAGE, "depends_on": ["a"]},
        }
    }  # fmt: skip
    files = render(plan_cluster(load_spec(write_spec(tmp_path, compose=compose)))).files()
    services = composed(files, "db")["services"]
    assert services["a"]["extra_hosts"][0] == "x:10.0.0.1"
    assert services["a"]["depends_on"] == {
        "b": {"condition": "service_healthy"},
        "teemesh-sidecar": {"condition": "service_started"},
    }
    assert services["b"]["depends_on"] == ["a", "teemesh-sidecar"]


def test_referenced_env_reads_compose_interpolation() -> None:
    text = "a: ${A} ${B:-x} ${C:?err} $D $$E $${F} ${G_1}\n"
    assert referenced_env(text) == {"A", "B", "C", "D", "G_1"}


def test_a_spec_image_with_spaces_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(copy.deepcopy(SPEC) | {"image": "a b"})
    assert info.value.problems[0].startswith("image:")


def test_a_platform_key_must_be_a_public_key_of_a_simulated_cluster(tmp_path: Path) -> None:
    plan = plan_cluster(load_spec(write_spec(tmp_path)))
    pem = PlatformKey.generate().public_pem().decode()
    assert render(plan, platform_key=pem).policy["platform_key"] == pem
    with pytest.raises(ConfigError) as info:
        render(plan, platform_key="not a key")
    assert info.value.problems[0].startswith("--platform-key: platform key: not a PEM public key")


def _strict(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (True is not 1, 1 is not 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_strict(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_strict(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_user_compose_values_keep_what_compose_reads_in_them(tmp_path: Path) -> None:
    """Compose (go-yaml v3) reads ``on`` and ``1:30`` as text and ``0755`` as octal, where
    PyYAML (YAML 1.1) reads true, 90 and 493: the rendered file says what compose read."""
    text = f"""services:
  web:
    image: {IMAGE}
    user: 1:1
    environment: {{DEBUG: on, MODE: 0755, T: 1:30, D: 2001-12-14, Y: no, U: 1_000, H: 0X1F}}
    healthcheck: {{retries: 3, disable: false}}
    x-numbers: [8080, -1, 0o17, 0x1F, 0.5, 1e3, .inf, true, null, '0o17', "08", 08, 1e999]
"""
    files = render(plan_cluster(load_spec(write_spec(tmp_path, compose=text)))).files()
    rendered = files["db/docker-compose.yaml"].decode()
    web = load_compose_yaml(rendered)["services"]["web"]
    assert web["user"] == "1:1"
    assert web["environment"] == {"DEBUG": "on", "MODE": 493, "T": "1:30", "D": "2001-12-14",
                                  "Y": "no", "U": 1000, "H": 31}  # fmt: skip
    assert _strict(web["healthcheck"], {"retries": 3, "disable": False})
    numbers = [8080, -1, 15, 31, 0.5, 1000.0, float("inf"), True, None, "0o17", "08", 8.0, "1e999"]
    assert _strict(web["x-numbers"], numbers)
    # written so that YAML 1.1 (PyYAML, docker-compose v1) reads the same
    assert "DEBUG: 'on'" in rendered
    assert "user: '1:1'" in rendered
    assert _strict(yaml.safe_load(rendered)["services"]["web"]["x-numbers"], numbers)
    assert yaml.safe_load(rendered)["services"]["web"]["environment"] == web["environment"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0755", 493), ("08", 8.0), ("00", 0), ("-0", 0), ("+1", 1), ("1_000", 1000),
        ("0x1F", 31), ("0X1F", 31), ("0o17", 15), ("0b101", 5), ("0x", "0x"),
        ("18446744073709551615", 2**64 - 1), ("18446744073709551616", 2.0**64),
        ("-9223372036854775809", -(2.0**63)), ("1e999", "1e999"), (".5", 0.5), ("-.5", -0.5),
        ("1.", 1.0), (".5_0", ".5_0"), ("9_9.5", 99.5), (".inf", float("inf")),
        ("-.Inf", float("-inf")), ("True", True), ("FALSE", False), ("yes", "yes"),
        ("on", "on"), ("~", None), ("", None), ("Null", None), ("1:30", "1:30"),
        ("2001-12-14", "2001-12-14"), ("2001-12-14T21:59:43.10-05:00", "2001-12-14T21:59:43.10-05:00"),
        ("=", "="), ("<<x", "<<x"),
    ],
)  # fmt: skip
def test_plain_scalars_mean_what_go_yaml_reads(text: str, value: Any) -> None:
    """go-yaml v3's resolve() into interface{}, case by case (yaml.v3 resolve.go)."""
    assert _strict(go_scalar(text), value)


def test_merge_keys_still_merge(tmp_path: Path) -> None:
    text = f"""x-base: &base {{image: "{IMAGE}", environment: {{A: "1"}}}}
services:
  web: {{<<: *base, command: run}}
"""
    files = render(plan_cluster(load_spec(write_spec(tmp_path, compose=text)))).files()
    web = composed(files, "db")["services"]["web"]
    assert web["image"] == IMAGE
    assert web["environment"] == {"A": "1"}
    assert "<<" not in web


ESCAPES = [
    ("include: [other.yaml]\nservices: {}\n", "compose: include", "include: the included"),
    ("services:\n  web: {image: x, extends: {file: b.yaml, service: s}}\n",
     "services.web", "extends: file: the other file would not be measured"),
    ("services:\n  web: {image: x, volumes: ['teemesh-state:/keys']}\n",
     "services.web", "mounts teemesh's volume"),
    ("services:\n  web: {image: x, volumes: ['teemesh-state:/keys:ro']}\n",
     "services.web", "mounts teemesh's volume"),
    ("services:\n  web: {image: x, volumes: [{type: volume, source: teemesh-state, "
     "target: /k, read_only: true}]}\n", "services.web", "mounts teemesh's volume"),
    ("services:\n  web: {image: x, volumes: ['${V}:/keys']}\n",
     "services.web", "the environment, which is not measured, would choose"),
    ("services:\n  web: {image: x, volumes_from: [teemesh-sidecar]}\n",
     "services.web", "volumes_from: 'teemesh-sidecar' is teemesh's"),
    ("services:\n  web: {image: x, volumes_from: ['app:ro']}\n",
     "services.web", "volumes_from: 'app:ro' is teemesh's"),
    ("services:\n  web: {image: x, volumes_from: [teemesh-dcs]}\n",
     "services.web", "is teemesh's"),
    ("services:\n  web: {image: x, volumes_from: ['container:shop-teemesh-sidecar-1']}\n",
     "services.web", "only a service of this file"),
    ("services:\n  web: {image: 'x@${DIGEST}'}\n",
     "services.web", "image: 'x@${DIGEST}' refers to the environment"),
    ("services:\n  web: {image: x, depends_on: other}\n",
     "services.web", "depends_on: expected a list or a mapping"),
    ("services: {}\nvolumes: {keys: {external: true, name: shop_teemesh-state}}\n",
     "volumes.keys", "could be teemesh's volume"),
]  # fmt: skip
"""(compose text, where, problem): what could reach past the measured compose."""


@pytest.mark.parametrize(("text", "where", "problem"), ESCAPES)
def test_compose_content_that_could_escape_the_measurement_is_refused(
    tmp_path: Path, text: str, where: str, problem: str
) -> None:
    with pytest.raises(InputError) as info:
        render(plan_cluster(load_spec(write_spec(tmp_path, compose=text))), allow_unpinned=True)
    assert f"{W}.db.compose" in str(info.value)
    assert where in str(info.value)
    assert problem in str(info.value)


def test_what_stays_in_the_file_is_allowed(tmp_path: Path) -> None:
    text = """services:
  base: {image: x, volumes: ['data:/data', {type: volume, source: data, target: /d2}]}
  web: {image: x, extends: base, volumes_from: ['base:ro'], depends_on: [base]}
  job: {image: x, extends: {service: base}}
volumes: {data: {}}
"""
    path = write_spec(tmp_path, compose=text)
    services = composed(render(plan_cluster(load_spec(path)), allow_unpinned=True).files(), "db")
    assert services["services"]["web"]["extends"] == "base"
    assert services["services"]["web"]["depends_on"] == ["base", "teemesh-sidecar"]


def _nested(depth: int) -> str:
    return "services:\n  web: {image: x, x-deep: " + "[" * depth + "]" * depth + "}\n"


@pytest.mark.parametrize(
    "text", [_nested(1000), _nested(MAX_DEPTH), "x-loop: &loop [*loop]\nservices: {}\n"]
)
def test_a_compose_nested_too_deeply_is_named(tmp_path: Path, text: str) -> None:
    with pytest.raises(InputError) as info:
        render(plan_cluster(load_spec(write_spec(tmp_path, compose=text))), allow_unpinned=True)
    assert str(info.value).startswith(f"{W}.db.compose: document nested too deeply")


def test_a_spec_image_that_refers_to_the_environment_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(copy.deepcopy(SPEC) | {"image": "registry.example/teemesh@${DIGEST}"})
    assert info.value.problems[0].startswith("image:")
    assert "not measured" in info.value.problems[0]
