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
        """Draw targets one by one in proportion to their weights."""
        pool = [t for t in targets if t.weight > 0]
        rest = [t for t in targets if t.weight <= 0]
        ordered: list[Target] = []
        total = sum(t.weight for t in pool)
        while pool:
            point = rng.random() * total
            index = 0
            acc = pool[0].weight
            while acc <= point and index < len(pool) - 1:
                index += 1
                acc += pool[index].weight
            chosen = pool.pop(index)
            total -= chosen.weight
            ordered.append(chosen)
        rng.shuffle(rest)
        ordered.extend(rest)
        return ordered
