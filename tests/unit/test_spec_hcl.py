"""``teemesh import-hcl``: the anchor's Terraform locals as a cluster spec (``teemesh.spec.hcl``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from teemesh.cli import cli
from teemesh.config import ConfigError
from teemesh.spec import parse_spec, plan_cluster
from teemesh.spec.hcl import import_hcl

ANCHOR_TF = """
terraform {
  required_providers { phala = { source = "phala-network/phala" } }
}

variable "worker_replicas" {
  default = 5
}

locals {
  cluster_name         = "demo"
  coordinator_replicas = 3
  gateway_base_domain  = "mesh.example.com"
}

locals {
  services_pg = [
    { name = "postgres-master",  port = 5432, subset = "master" },
    { name = "postgres-replica", port = 5432, subset = "replica", callers = ["webdemo"] },
  ]
  workload_groups = {
    webdemo = {
      replicas     = 2
      size         = "tdx.small"
      region       = "US-WEST-1"
      compose      = file("${path.module}/webdemo/docker-compose.yaml")
      compose_env  = { LOG_LEVEL = "info" }
      public_ports = [8080]
      services     = [{ name = "webdemo", port = 8080, subset = null }]
    }
    postgres = {
      replicas = var.worker_replicas
      services = local.services_pg
    }
    worker = {
      replicas = 1
      command  = ["python", "-m", "teemesh.examples.starter", "--port", "9090"]
      backends = { worker = { port = 9090, health = { http = "/hello" } } }
      routes   = [{ name = "worker", backend = "worker", callers = ["webdemo"] }]
    }
  }
}

resource "phala_app" "worker" {
  name = "${local.cluster_name}-worker"
}
"""

EXPECTED = {
    "cluster": "demo",
    "tee": "simulated",
    "coordinators": {"count": 3, "store": "etcd"},
    "gateway": {"base_domain": "mesh.example.com"},
    "workload_groups": {
        "webdemo": {
            "replicas": 2,
            "compose": "webdemo/docker-compose.yaml",
            "compose_env": {"LOG_LEVEL": "info"},
            "backends": {"webdemo": {"port": 8080, "public": True}},
            "routes": {"webdemo": {"backend": "webdemo"}},
        },
        "postgres": {
            "replicas": 5,
            # the anchor's collapse: both entries at 5432 are one backend, named by the cluster
            # (Patroni's scope), owned by the workload that tags the roles
            "backends": {"demo": {"port": 5432, "owner": "workload"}},
            "routes": {
                "postgres-master": {"backend": "demo", "role": "master"},
                "postgres-replica": {"backend": "demo", "role": "replica", "callers": ["webdemo"]},
            },
        },
        "worker": {
            "replicas": 1,
            "command": ["python", "-m", "teemesh.examples.starter", "--port", "9090"],
            "backends": {"worker": {"port": 9090, "health": {"http": "/hello"}}},
            "routes": {"worker": {"backend": "worker", "callers": ["webdemo"]}},
        },
    },
}


def test_the_anchor_terraform_becomes_a_spec() -> None:
    doc, notes = import_hcl(ANCHOR_TF, source="cluster.tf")
    assert doc == EXPECTED
    assert notes == [
        "coordinators.store: etcd, so 3 coordinators share one catalog (the anchor's Consul "
        "servers)",
        "workload_groups.webdemo.size: a Phala Cloud setting the spec has no use for",
        "workload_groups.webdemo.region: a Phala Cloud setting the spec has no use for",
    ]


def test_the_imported_spec_plans(tmp_path: Path) -> None:
    (tmp_path / "webdemo").mkdir()
    (tmp_path / "webdemo" / "docker-compose.yaml").write_text("services: {}\n")
    doc, _ = import_hcl(ANCHOR_TF, source=str(tmp_path / "cluster.tf"), relative_to=tmp_path)
    plan = plan_cluster(parse_spec(doc, base_dir=tmp_path))
    assert [c.name for c in plan.of_role("coordinator")] == [f"coordinator-{i}" for i in range(3)]
    assert [c.name for c in plan.replicas("postgres")] == [f"postgres-{i}" for i in range(5)]
    assert [(r.name, r.vip, r.role) for r in plan.routes] == [
        ("webdemo", "127.77.0.10", None),
        ("postgres-master", "127.77.0.11", "master"),
        ("postgres-replica", "127.77.0.12", "replica"),
        ("worker", "127.77.0.13", None),
    ]


def test_compose_paths_are_rebased_onto_the_spec_folder(tmp_path: Path) -> None:
    source = tmp_path / "infra" / "cluster.tf"
    doc, _ = import_hcl(ANCHOR_TF, source=str(source), relative_to=tmp_path / "specs")
    assert doc["workload_groups"]["webdemo"]["compose"] == "../infra/webdemo/docker-compose.yaml"


def test_tdx_takes_the_os_image_hashes() -> None:
    doc, _ = import_hcl(ANCHOR_TF, tee="tdx", os_image_hashes=("ab" * 32,))
    assert (doc["tee"], doc["os_image_hashes"]) == ("tdx", ["ab" * 32])


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        import_hcl(text, source="c.tf")
    assert info.value.source == "c.tf"
    return info.value.problems


def _groups(body: str) -> str:
    return f"locals {{\n  workload_groups = {{\n{body}\n  }}\n}}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("locals {", ["not valid HCL: "]),
        ('locals { cluster_name = "x" }', ["locals: no workload_groups = { <group> = {...} } found"]),
        (_groups("api = { replicas = 1, flavour = 2 }"),
         ["workload_groups.api.flavour: unsupported field (known: backends, command, compose, "
          "compose_env, env, public, public_ports, replicas, routes, services)"]),
        (_groups("api = { replicas = var.missing }"),
         ["workload_groups.api.replicas: var.missing: no such variable without a default"]),
        (_groups("api = { replicas = local.nope }"),
         ["workload_groups.api.replicas: local.nope: no such local"]),
        (_groups("api = { replicas = length(var.x) }"),
         ["workload_groups.api.replicas: unsupported expression ${length(var.x)}: give a "
          "literal value"]),
        (_groups("api = 3"), ["workload_groups.api: expected an object { replicas = ..., ... }"]),
        (_groups('api = { services = [{ name = "a", port = 1, parent = "x" }, '
                 '{ name = "b", port = 1, parent = "y" }] }'),
         ["workload_groups.api.services.0: one parent per backend: port 1 has ['x', 'y']"]),
        (_groups('api = { services = [{ name = "a", port = 1 }, { name = "b", port = 1 }] }'),
         ["workload_groups.api.services.0: one parent per backend: ['a', 'b'] at port 1 all lack "
          "a subset; set parent"]),
        (_groups('api = { services = [{ name = "a", port = 1, owner = "platform" }, '
                 '{ name = "b", port = 1, subset = "m", owner = "workload" }] }'),
         ["workload_groups.api.services.0: one owner per backend: port 1 has "
          "['platform', 'workload']"]),
        (_groups('api = { services = [{ name = "a", port = "x", weight = 2 }] }'),
         ["workload_groups.api.services.0.weight: unsupported field",
          "workload_groups.api.services.0.port: missing or invalid"]),
        (_groups('api = { services = [{ name = "a", port = 1 }, { name = "a", port = 2 }] }'),
         ["workload_groups.api.services.1.name: a is listed twice"]),
        (_groups('api = { routes = { a = { backend = "a" } }, '
                 'services = [{ name = "a", port = 1 }] }'),
         ["workload_groups.api.services: a is declared twice"]),
        (_groups('api = { backends = [1], services = [{ name = "a", port = 1 }] }'),
         ["workload_groups.api.services: cannot add to backends or routes that are not a map"]),
        (_groups('api = { routes = [{ name = "a" }, { name = "a" }] }'),
         ["workload_groups.api.routes.1.name: a is listed twice"]),
        (_groups("api = { routes = [{ backend = \"a\" }] }"),
         ["workload_groups.api.routes.0: expected { name = ..., backend = ... }"]),
    ],
)  # fmt: skip
def test_what_cannot_be_imported_is_named(text: str, expected: list[str]) -> None:
    got = _problems(text)
    if expected == ["not valid HCL: "]:
        assert len(got) == 1
        assert got[0].startswith("not valid HCL: ")
    else:
        assert got == expected


def test_references_and_escapes_resolve() -> None:
    text = """
    variable "n" { default = 2 }
    locals {
      name = "demo-$${literal}"
      count = var.n
      workload_groups = { api = { replicas = local.count, command = local.name } }
    }
    """
    doc, _ = import_hcl(text)
    assert doc["workload_groups"]["api"] == {"replicas": 2, "command": "demo-${literal}"}


def test_cli_import_hcl_writes_a_spec_that_plans(tmp_path: Path) -> None:
    (tmp_path / "webdemo").mkdir()
    (tmp_path / "webdemo" / "docker-compose.yaml").write_text("services: {}\n")
    tf = tmp_path / "cluster.tf"
    tf.write_text(ANCHOR_TF)
    out = tmp_path / "spec.yaml"
    result = CliRunner().invoke(cli, ["import-hcl", str(tf), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "a Phala Cloud setting" in result.output  # the notes (stderr, mixed in by CliRunner)
    written = yaml.safe_load(out.read_text())
    assert written["workload_groups"]["postgres"]["routes"]["postgres-master"]["role"] == "master"
    planned = CliRunner().invoke(cli, ["plan", str(out), "--json"])
    assert planned.exit_code == 0, planned.output


def test_cli_import_hcl_refuses_what_does_not_plan(tmp_path: Path) -> None:
    tf = tmp_path / "cluster.tf"
    tf.write_text(_groups('api = { routes = { r = { backend = "nothing" } } }'))
    result = CliRunner().invoke(cli, ["import-hcl", str(tf)], terminal_width=200)
    assert result.exit_code == 2
    words = " ".join(result.output.split())  # rich wraps long lines
    assert "workload_groups.api.routes.r.backend: group api has no backend nothing" in words
