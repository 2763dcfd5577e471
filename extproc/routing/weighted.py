"""Weight-based routing: the primary drawn by weight, fallbacks drawn by weight among the rest."""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


class WeightedStrategy:
    """Weighted random order without replacement; zero-weight targets come last, shuffled."""

    name = "weight-based-routing"
    windows: tuple[float, ...] = ()

    def explain(self, targets: Sequence[Target], health: HealthView) -> dict[str, str]:
        """Each target's weight and its share after renormalisation over ``targets``."""
        total = sum(max(t.weight, 0) for t in targets)
        return {
            t.key: f"weight {t.weight} = {100 * t.weight / total:.1f}%"
            if total
            else f"weight {t.weight}"
            for t in targets
        }

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Draw targets one by one in proportion to their weights.

        Equivalent to repeated weighted draws without replacement, in O(n log n): each target gets
        the key ``u ** (1 / weight)`` with ``u`` uniform, and the largest keys go first.
        """
        keyed = [
            (rng.random() ** (1.0 / t.weight), i) for i, t in enumerate(targets) if t.weight > 0
        ]
        keyed.sort(reverse=True)
        ordered = [targets[i] for _, i in keyed]
        rest = [t for t in targets if t.weight <= 0]
        rng.shuffle(rest)
        ordered.extend(rest)
        return ordered
