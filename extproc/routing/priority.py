"""Priority-based routing: ascending priority number, ties in random order per request."""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


class PriorityStrategy:
    """Lowest priority number first; equal priorities share traffic evenly."""

    name = "priority-based-routing"
    windows: tuple[float, ...] = ()

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

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Sort by priority, breaking ties with a per-request random key."""
        keyed = [(t.priority, rng.random(), i) for i, t in enumerate(targets)]
        keyed.sort()
        return [targets[i] for _, _, i in keyed]
