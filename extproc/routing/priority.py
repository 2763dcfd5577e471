"""Priority-based routing: ascending priority number, ties in random order per request."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from random import Random

from extproc.routing.draw import Group, compact, order_all, shuffled
from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


def _priority(target: Target) -> int:
    return target.priority


class PriorityStrategy:
    """Lowest priority number first; equal priorities share traffic evenly."""

    name = "priority-based-routing"
    windows: tuple[float, ...] = ()
    prepare_windows: tuple[float, ...] = ()

    def explain(self, targets: Sequence[Target], health: HealthView) -> dict[str, str]:
        """Each target's priority, and how many share it."""
        counts: dict[int, int] = {}
        for t in targets:
            counts[t.priority] = counts.get(t.priority, 0) + 1
        return {
            t.key: f"priority {t.priority}"
            + (f" (tied with {counts[t.priority] - 1} other)" if counts[t.priority] > 1 else "")
            for t in targets
        }

    def prepare(self, targets: Sequence[Target], health: HealthView) -> tuple[Group, ...]:
        """One shuffled group per priority, lowest number first."""
        ranked = sorted(targets, key=_priority)
        return compact(shuffled(list(same)) for _, same in groupby(ranked, key=_priority))

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Sort by priority, ties in random order."""
        return order_all(self.prepare(targets, health), rng)
