"""What the coordinator's HTTP modules share: reaching the running service and reading bodies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from teemesh.coordinator.catalog import Catalog
from teemesh.coordinator.service import Coordinator
from teemesh.encoding import load_json
from teemesh.platform.prpc import read_body

Log = Callable[[str], None]


async def json_body(request: Request) -> Any:
    return load_json(await read_body(request), field="body")


def coordinator_of(request: Request) -> Coordinator:
    coordinator: Coordinator = request.app.state.coordinator
    return coordinator


def catalog_of(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog
