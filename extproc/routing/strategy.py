"""The strategy plug-in point: one Protocol, one factory.

A strategy orders the eligible targets of a virtual model for one request: the first is the
primary, the rest are the fallback order. Strategies are pure and synchronous; randomness is passed
in. Filtering (operation support, fallback eligibility) happens in ``routing.table`` before or after
a strategy runs, never inside one.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random
from typing import Protocol, assert_never

from extproc.config import RoutingConfig
from extproc.routing.model import Target


class Strategy(Protocol):
    """Orders targets for one request."""

    name: str

    def order(self, targets: Sequence[Target], rng: Random) -> list[Target]:
        """Return all ``targets`` in the order they should be tried."""
        ...


def build_strategy(routing: RoutingConfig) -> Strategy:
    """Return the strategy object for a routing config (one ``case`` per routing type)."""
    from extproc.routing.latency import LatencyStrategy
    from extproc.routing.priority import PriorityStrategy
    from extproc.routing.weighted import WeightedStrategy

    match routing.type:
        case "weight-based-routing":
            return WeightedStrategy()
        case "priority-based-routing":
            return PriorityStrategy()
        case "latency-based-routing":
            return LatencyStrategy()
        case _:
            assert_never(routing.type)
