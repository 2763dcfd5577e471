"""Priority-based routing: ascending priority number, ties in random order per request."""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


class PriorityStrategy:
    """Lowest priority number first; equal priorities share traffic evenly."""

    name = "priority-based-routing"

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Sort by priority, breaking ties with a per-request random key."""
        keyed = [(t.priority, rng.random(), i) for i, t in enumerate(targets)]
        keyed.sort()
        return [targets[i] for _, _, i in keyed]
