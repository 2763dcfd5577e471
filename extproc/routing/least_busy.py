"""Least-busy routing: the target with the fewest attempts in flight from this process first.

Ties (equal in-flight counts) are broken at random, so an idle gateway spreads traffic evenly.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from extproc.routing.draw import Group
from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


class LeastBusyStrategy:
    """Ascending in-flight count, random among equals."""

    name = "least-busy-routing"
    windows: tuple[float, ...] = ()
    prepare_windows: tuple[float, ...] = ()

    def prepare(self, targets: Sequence[Target], health: HealthView) -> tuple[Group, ...] | None:
        """None: In-flight counts change with every request: nothing to prepare."""
        return None

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Sort by in-flight attempts, ties in random order."""
        keyed = [(health.in_flight(t.key), rng.random(), i) for i, t in enumerate(targets)]
        keyed.sort()
        return [targets[i] for _, _, i in keyed]

    def explain(self, targets: Sequence[Target], health: HealthView) -> dict[str, str]:
        """Each target's in-flight count."""
        return {t.key: f"{health.in_flight(t.key)} in flight" for t in targets}
