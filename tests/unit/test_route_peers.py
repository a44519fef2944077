"""Routes to one peer (``Route.peer``), the services a catalog change touches
(``InstanceTable``), and the sidecar's ``route_changed`` log (``Plane``)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from test_sidecar_routing import value as catalog_value

from teemesh.sidecar.config import Route, SidecarConfig, parse_sidecar_config
from teemesh.sidecar.metrics import Metrics
from teemesh.sidecar.plane import Plane
from teemesh.sidecar.routing import Instance, InstanceTable

PEM = "-----BEGIN PUBLIC KEY-----\nplatform\n-----END PUBLIC KEY-----\n"


def value(service: str = "api", peer: str = "db-1", **extra: Any) -> dict[str, Any]:
    return catalog_value(service, peer, **extra)


def instance(service: str = "api", peer: str = "db-1", **extra: Any) -> Instance:
    found = Instance.from_value(f"instances/{service}/{peer}", value(service, peer, **extra))
    assert found is not None
    return found


def put(key: str, service: str = "api", peer: str = "db-1", **extra: Any) -> dict[str, Any]:
    return {"type": "put", "key": key, "value": value(service, peer, **extra)}


def delete(key: str) -> dict[str, Any]:
    return {"type": "delete", "key": key}


# -- Instance.serves and Route.peer ------------------------------------------------------------


def test_a_route_with_a_peer_is_served_only_by_that_peer() -> None:
    route = Route(backend="api", port=8008, peer="db-1")
    assert instance(peer="db-1").serves(route)
    assert not instance(peer="db-2").serves(route)
    assert not instance(service="postgres", peer="db-1").serves(route)
    assert not instance(peer="db-1", health="critical").serves(route)
    assert instance(peer="db-1", health="warning").serves(route)


def test_a_route_without_a_peer_is_served_by_any_peer() -> None:
    route = Route(backend="api", port=8008)
    assert instance(peer="db-1").serves(route)
    assert instance(peer="db-2").serves(route)


def test_peer_and_role_must_both_match() -> None:
    route = Route(backend="api", port=8008, peer="db-1", role="master")
    assert instance(peer="db-1", tags={"role": "master"}).serves(route)
    assert not instance(peer="db-1", tags={"role": "replica"}).serves(route)
    assert not instance(peer="db-1").serves(route)
    assert not instance(peer="db-2", tags={"role": "master"}).serves(route)


def test_serving_lists_only_the_peer() -> None:
    table = InstanceTable()
    table.load({f"instances/api/db-{i}": value(peer=f"db-{i}") for i in range(3)})
    got = table.serving(Route(backend="api", port=8008, peer="db-2"))
    assert [i.peer_id for i in got] == ["db-2"]
    assert len(table.serving(Route(backend="api", port=8008))) == 3


# -- InstanceTable: what a change touches ------------------------------------------------------


def test_put_returns_the_service_it_stored() -> None:
    table = InstanceTable()
    assert table.put("k", value(service="api")) == {"api"}
    assert table.instances["k"].service == "api"
    assert table.put("k", value(service="api", health="critical")) == {"api"}


def test_put_of_another_service_touches_the_old_and_the_new() -> None:
    table = InstanceTable()
    table.put("k", value(service="api"))
    assert table.put("k", value(service="postgres")) == {"api", "postgres"}
    assert table.instances["k"].service == "postgres"


def test_put_of_an_unusable_value_drops_the_entry_and_touches_its_service() -> None:
    table = InstanceTable()
    table.put("k", value(service="api"))
    assert table.put("k", "not json") == {"api"}
    assert "k" not in table.instances
    assert table.put("other", "not json") == set()
    assert table.instances == {}


def test_delete_returns_the_service_of_what_it_removed() -> None:
    table = InstanceTable()
    table.put("k", value(service="api"))
    assert table.delete("k") == {"api"}
    assert table.instances == {}
    assert table.delete("k") == set()
    assert table.delete("never") == set()


def test_apply_returns_every_service_touched() -> None:
    table = InstanceTable()
    table.put("a", value(service="api", peer="db-0"))
    touched = table.apply(
        [
            put("b", service="web", peer="web-0"),
            put("a", service="postgres", peer="db-0"),
            delete("missing"),
            {"type": "compact", "key": "c"},
        ]
    )
    assert touched == {"web", "api", "postgres"}
    assert {k: i.service for k, i in table.instances.items()} == {"a": "postgres", "b": "web"}
    assert table.apply([delete("missing")]) == set()
    assert table.apply([]) == set()
    assert table.apply([delete("b")]) == {"web"}


# -- Plane: route_changed once per change --------------------------------------------------------


def config(**routes: dict[str, Any]) -> SidecarConfig:
    return parse_sidecar_config(
        {
            "cluster": "demo",
            "group": "web",
            "peer_id": "web-1",
            "coordinators": ["https://127.0.0.1:8443"],
            "coordinator_policy": {"tee": "simulated", "platform_key": PEM},
            "address": "10.0.0.1",
            "routes": routes,
        },
        source="sidecar.yaml",
    )


@pytest.fixture
def plane() -> Plane:
    return Plane(
        config(
            **{
                "api-0": {"backend": "api", "port": 8008, "peer": "db-0"},
                "api-1": {"backend": "api", "port": 8008, "peer": "db-1"},
                "master": {"backend": "postgres", "port": 5432, "role": "master"},
            }
        ),
        Metrics(),
    )


@pytest.fixture
def changes(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    """Captures the sidecar's INFO events (the JSON logging setup stops their propagation)."""
    monkeypatch.setattr(logging.getLogger("teemesh"), "propagate", True)
    caplog.set_level(logging.INFO, logger="teemesh.sidecar")
    return caplog


def route_changes(caplog: pytest.LogCaptureFixture) -> list[tuple[str, list[str]]]:
    out = []
    for r in caplog.records:
        if r.name == "teemesh.sidecar" and r.getMessage() == "route_changed":
            fields = r.teemesh_fields  # type: ignore[attr-defined]
            out.append((fields["route"], fields["instances"]))
    return out


def test_loading_logs_every_route_once(plane: Plane, changes: pytest.LogCaptureFixture) -> None:
    plane.load_instances(
        {
            "instances/api/db-0": value(service="api", peer="db-0"),
            "instances/postgres/db-1": value(service="postgres", peer="db-1",
                                             tags={"role": "master"}),
        }
    )  # fmt: skip
    assert route_changes(changes) == [("api-0", ["db-0"]), ("api-1", []), ("master", ["db-1"])]
    assert plane.route_peers == {"api-0": ("db-0",), "api-1": (), "master": ("db-1",)}
    plane.load_instances(
        {
            "instances/api/db-0": value(service="api", peer="db-0"),
            "instances/postgres/db-1": value(service="postgres", peer="db-1",
                                             tags={"role": "master"}),
        }
    )  # fmt: skip
    assert len(route_changes(changes)) == 3, "the same snapshot again changes nothing"


def test_events_log_only_actual_changes(plane: Plane, changes: pytest.LogCaptureFixture) -> None:
    plane.load_instances({})
    assert route_changes(changes) == [("api-0", []), ("api-1", []), ("master", [])]
    changes.clear()

    plane.instance_events((put("instances/api/db-1", peer="db-1"),))
    assert route_changes(changes) == [("api-1", ["db-1"])]

    # the same instance again, a warning, an instance of a peer no route names: no change
    plane.instance_events((put("instances/api/db-1", peer="db-1", health="warning"),))
    plane.instance_events((put("instances/api/db-5", peer="db-5"),))
    plane.instance_events((delete("instances/nothing/here"),))
    assert route_changes(changes) == [("api-1", ["db-1"])]

    plane.instance_events((put("instances/api/db-1", peer="db-1", health="critical"),))
    assert route_changes(changes)[1:] == [("api-1", [])]


def test_a_promotion_logs_the_role_route(plane: Plane, changes: pytest.LogCaptureFixture) -> None:
    replica = {"role": "replica"}
    plane.load_instances(
        {
            "instances/postgres/db-0": value(service="postgres", peer="db-0",
                                             tags={"role": "master"}),
            "instances/postgres/db-1": value(service="postgres", peer="db-1", tags=replica),
        }
    )  # fmt: skip
    changes.clear()
    plane.instance_events(
        (
            put("instances/postgres/db-0", service="postgres", peer="db-0", tags=replica),
            put("instances/postgres/db-1", service="postgres", peer="db-1",
                tags={"role": "master"}),
        )
    )  # fmt: skip
    assert route_changes(changes) == [("master", ["db-1"])], "one line per batch of events"
    plane.instance_events((delete("instances/postgres/db-1"),))
    assert route_changes(changes)[1:] == [("master", [])]


def test_several_instances_are_logged_sorted(changes: pytest.LogCaptureFixture) -> None:
    p = Plane(config(api={"backend": "api", "port": 8008}), Metrics())
    p.load_instances({})
    p.instance_events(
        (put("instances/api/db-2", peer="db-2"), put("instances/api/db-0", peer="db-0"))
    )
    assert route_changes(changes) == [("api", []), ("api", ["db-0", "db-2"])]
    assert p.route_peers == {"api": ("db-0", "db-2")}
