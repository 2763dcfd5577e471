"""The strategy plug-in point: one Protocol, one factory, and the health view strategies read.

A strategy orders the eligible targets of a virtual model for one request: the first is the
primary, the rest are the fallback order. Strategies are pure and synchronous; randomness and the
health view are passed in. Filtering (operation support, cooldowns, SLA cutoffs, fallback
eligibility) happens in ``routing.table`` before or after a strategy runs, never inside one.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random
from typing import Protocol, assert_never

from extproc.config import RoutingConfig
from extproc.routing.model import Target


class HealthView(Protocol):
    """What routing may ask the health model (``extproc.health.HealthTracker`` implements it)."""

    def available(self, key: str) -> bool:
        """Whether the target is out of cooldown."""
        ...

    def cooldown_remaining(self, key: str) -> float:
        """Seconds until the target leaves cooldown."""
        ...

    def failures(self, key: str) -> int:
        """Consecutive failed attempts."""
        ...

    def tpot(self, key: str, window_s: float) -> tuple[float | None, int]:
        """Mean time per output token (s) over the window, and the number of samples."""
        ...


class NoHealth:
    """A health view that knows nothing: every target available, no samples."""

    def available(self, key: str) -> bool:
        """Always available."""
        return True

    def cooldown_remaining(self, key: str) -> float:
        """Never cooling down."""
        return 0.0

    def failures(self, key: str) -> int:
        """No failures."""
        return 0

    def tpot(self, key: str, window_s: float) -> tuple[float | None, int]:
        """No samples."""
        return None, 0


NO_HEALTH = NoHealth()


class Strategy(Protocol):
    """Orders targets for one request."""

    name: str

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
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
            return LatencyStrategy(
                window_s=routing.window_seconds, band=routing.band, min_samples=routing.min_samples
            )
        case _:
            assert_never(routing.type)
