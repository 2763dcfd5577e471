"""The strategy plug-in point: one Protocol, one factory, and the health view strategies read.

A strategy orders the eligible targets of a virtual model for one request: the first is the
primary, the rest are the fallback order. Strategies are pure and synchronous; randomness and the
health view are passed in. Filtering (operation support, cooldowns, SLA cutoffs, fallback
eligibility) happens in ``routing.table`` before or after a strategy runs, never inside one.

Most strategies split their work in two: ``prepare`` computes what does not change from one
request to the next (``routing.draw`` groups: fixed runs, shuffles, draws by weight), which
``routing.eligibility`` caches until health changes, and the table draws each request's order from
it. A strategy whose order depends on state that changes with every request (attempts in flight,
tokens used, throughput, a rotation counter) returns None from ``prepare`` and is asked for the
whole ``order`` on every request instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from random import Random
from typing import Protocol, assert_never

from extproc.config import TargetRoutingConfig
from extproc.routing.draw import Group
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

    def tokens(self, key: str, window_s: float) -> float:
        """Input + output tokens used over the window."""
        ...

    def throughput(self, key: str, window_s: float) -> tuple[float | None, int]:
        """Mean output tokens per second over the window, and the number of samples."""
        ...

    def in_flight(self, key: str) -> int:
        """Attempts in flight to the target from this process."""
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

    def tokens(self, key: str, window_s: float) -> float:
        """No usage."""
        return 0.0

    def throughput(self, key: str, window_s: float) -> tuple[float | None, int]:
        """No samples."""
        return None, 0

    def in_flight(self, key: str) -> int:
        """Nothing in flight."""
        return 0

    def routing_stamp(self) -> tuple[int, int, float]:
        """Nothing ever changes: constant versions, and a time that never ends a cooldown."""
        return 0, 0, 0.0

    def versions_of(self, keys: tuple[str, ...], tpot: bool) -> tuple[int | None, ...]:
        """Nothing ever changed."""
        return (None,) * len(keys)

    def cooldown_until(self, key: str) -> float:
        """Never cooling down."""
        return 0.0

    def tpot_expiry(self, key: str, window_s: float) -> float:
        """No sample ever expires."""
        return math.inf


NO_HEALTH = NoHealth()


class CacheableHealth(HealthView, Protocol):
    """A health view that says when what routing read from it may have changed.

    ``extproc.health.HealthTracker`` and ``NoHealth`` implement it; ``routing.eligibility``
    caches per route only with such a view (with any other, it recomputes every request).
    """

    def routing_stamp(self) -> tuple[int, int, float]:
        """``(state_version, tpot_version, now)``.

        ``state_version`` changes with any cooldown or consecutive-failure count, ``tpot_version``
        with any new time-per-output-token sample.
        """
        ...

    def versions_of(self, keys: tuple[str, ...], tpot: bool) -> tuple[int | None, ...]:
        """The version of each target's last state (``tpot``: TPOT) change, None if none."""
        ...

    def cooldown_until(self, key: str) -> float:
        """When the target's cooldown ends."""
        ...

    def tpot_expiry(self, key: str, window_s: float) -> float:
        """When the oldest TPOT sample of the window leaves it (after a ``tpot`` call)."""
        ...


class Strategy(Protocol):
    """Orders targets for one request."""

    name: str
    windows: tuple[float, ...]
    """Window lengths (s) this strategy asks the health view about."""
    prepare_windows: tuple[float, ...]
    """Window lengths of the TPOT means ``prepare`` reads: new or expiring samples there mean the
    prepared groups must be computed again. ``prepare`` reads nothing else from health."""

    def prepare(self, targets: Sequence[Target], health: HealthView) -> tuple[Group, ...] | None:
        """The request-independent part of the order of ``targets``, or None if there is none.

        Drawing the groups (``routing.draw.draw``) gives the same distribution as ``order``.
        """
        ...

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Return all ``targets`` in the order they should be tried."""
        ...

    def explain(self, targets: Sequence[Target], health: HealthView) -> dict[str, str]:
        """A short, human-readable score per target key (what ``order`` based its choice on)."""
        ...


def build_strategy(routing: TargetRoutingConfig) -> Strategy:
    """Return the strategy object for a routing config (one ``case`` per routing type)."""
    from extproc.config import (
        HighestThroughputRouting,
        LatencyBasedRouting,
        LeastBusyRouting,
        LowestPriceRouting,
        LowestUsageRouting,
        PriorityBasedRouting,
        RoundRobinRouting,
        WeightBasedRouting,
    )
    from extproc.routing.latency import LatencyStrategy
    from extproc.routing.least_busy import LeastBusyStrategy
    from extproc.routing.lowest_price import LowestPriceStrategy
    from extproc.routing.lowest_usage import LowestUsageStrategy
    from extproc.routing.priority import PriorityStrategy
    from extproc.routing.round_robin import RoundRobinStrategy
    from extproc.routing.throughput import HighestThroughputStrategy
    from extproc.routing.weighted import WeightedStrategy

    match routing:
        case WeightBasedRouting():
            return WeightedStrategy()
        case PriorityBasedRouting():
            return PriorityStrategy()
        case LatencyBasedRouting():
            return LatencyStrategy(
                window_s=routing.window_seconds, band=routing.band, min_samples=routing.min_samples
            )
        case RoundRobinRouting():
            return RoundRobinStrategy()
        case LeastBusyRouting():
            return LeastBusyStrategy()
        case LowestUsageRouting():
            return LowestUsageStrategy(window_s=routing.window_seconds)
        case LowestPriceRouting():
            return LowestPriceStrategy()
        case HighestThroughputRouting():
            return HighestThroughputStrategy(
                window_s=routing.window_seconds, min_samples=routing.min_samples
            )
        case _:
            assert_never(routing)
