"""Round-robin routing: rotate over the healthy targets, one request at a time.

Health-aware because cooling targets are filtered out before the strategy runs: the rotation
continues over the ones left. There is one counter per set of eligible targets (a metadata pool,
or the pool minus a cooling target), per virtual model and per process; counters restart when a
new config is loaded.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from random import Random

from extproc.routing.draw import Group
from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


class RoundRobinStrategy:
    """The n-th request starts at target n modulo the number of eligible targets."""

    name = "round-robin-routing"
    windows: tuple[float, ...] = ()
    prepare_windows: tuple[float, ...] = ()

    def __init__(self) -> None:
        """Start every rotation at its first target."""
        self._counters: dict[tuple[str, ...], itertools.count[int]] = {}

    def prepare(self, targets: Sequence[Target], health: HealthView) -> tuple[Group, ...] | None:
        """None: The rotation advances per request: nothing to prepare."""
        return None

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """The targets rotated by one more position than for the previous request."""
        if not targets:
            return []
        key = tuple(t.key for t in targets)
        counter = self._counters.get(key)
        if counter is None:
            if len(self._counters) >= 4096:
                self._counters.clear()
            counter = self._counters[key] = itertools.count()
        start = next(counter) % len(targets)
        return [*targets[start:], *targets[:start]]

    def explain(self, targets: Sequence[Target], health: HealthView) -> dict[str, str]:
        """Each target's position in the rotation."""
        return {t.key: f"position {i} of {len(targets)}" for i, t in enumerate(targets)}
