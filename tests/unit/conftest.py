"""Fixtures shared by the unit tests: a fake clock, the module's table, and a health model.

``table`` compiles the test module's own ``CONFIG`` (a new table per test, so strategy state such
as round-robin counters never leaks between tests); a module that needs another table defines
its own ``table`` fixture, which takes precedence.
"""

from __future__ import annotations

import pytest

from extproc.health import HealthTracker
from extproc.routing.table import RoutingTable
from tests.unit.support import FakeClock, health_tracker, table_from_yaml


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def table(request: pytest.FixtureRequest) -> RoutingTable:
    config = getattr(request.module, "CONFIG", None)
    if not isinstance(config, str):
        pytest.fail(f"{request.module.__name__} has no CONFIG for the shared table fixture")
    return table_from_yaml(config)


@pytest.fixture()
def health(table: RoutingTable, clock: FakeClock) -> HealthTracker:
    return health_tracker(table, clock)
