"""Fuzz ``teemesh render`` with hostile compose files: whatever the text, rendering gives files
or an InputError naming the compose file, and what it accepts is a compose every container of
which runs in the CVM's network, with the route names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from fuzzkit import TEXT, input_error_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teemesh.spec import parse_spec, plan_cluster
from teemesh.spec.deploy import render

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC: dict[str, Any] = {
    "cluster": "fuzz",
    "tee": "simulated",
    "workload_groups": {
        "db": {"compose": "compose.yaml", "backends": {"db": {"port": 5432}},
               "routes": {"db": {"backend": "db"}}},
    },
}  # fmt: skip
KEYS = ("image", "build", "ports", "networks", "network_mode", "extra_hosts", "depends_on",
        "command", "environment", "volumes", "x-any")  # fmt: skip
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 70000)
    | TEXT
    | st.sampled_from(("host", "bridge", "nginx@sha256:" + "a" * 64, "$X", "${Y:?}", "$$")),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
SERVICES = st.dictionaries(
    st.sampled_from(("web", "app", "teemesh-sidecar", "db", "")) | TEXT,
    st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5) | VALUES,
    max_size=3,
)
DOCS = (
    st.fixed_dictionaries(
        {"services": SERVICES | VALUES},
        optional={
            "volumes": VALUES | st.dictionaries(TEXT, VALUES),
            "version": VALUES,
            "x-top": VALUES,
        },
    )
    | VALUES
)


def _spec(tmp: Path) -> Any:
    (tmp / "compose.yaml").write_text("services: {}\n")
    return parse_spec(SPEC, base_dir=tmp)


@FUZZ
@given(doc=DOCS)
def test_any_compose_document_renders_or_is_refused_by_name(
    tmp_path_factory: Any, doc: Any
) -> None:
    spec = _spec(tmp_path_factory.mktemp("fuzz")).with_compose_texts(
        {"db": yaml.safe_dump(doc, allow_unicode=True)}
    )
    _check(spec)


@FUZZ
@given(text=st.text(max_size=200) | st.sampled_from(("services: {a: b", "- [", ":\n:", "\t")))
def test_any_compose_text_renders_or_is_refused_by_name(tmp_path_factory: Any, text: str) -> None:
    spec = _spec(tmp_path_factory.mktemp("fuzz")).with_compose_texts({"db": text})
    _check(spec)


def _check(spec: Any) -> None:
    plan = plan_cluster(spec)
    rendered = input_error_only(render, plan, allow_unpinned=True)
    if rendered is None:
        return
    composed = yaml.safe_load(rendered.files()["db/docker-compose.yaml"])
    for service in composed["services"].values():
        assert service["network_mode"] == "host"
        assert "db:127.77.0.10" in service.get("extra_hosts", ["db:127.77.0.10"])
