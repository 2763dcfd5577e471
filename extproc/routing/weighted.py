"""Weight-based routing: the primary drawn by weight, fallbacks drawn by weight among the rest."""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from extproc.routing.draw import Group, by_weight, compact, order_all
from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


class WeightedStrategy:
    """Weighted random order without replacement; zero-weight targets come last, shuffled."""

    name = "weight-based-routing"
    windows: tuple[float, ...] = ()
    prepare_windows: tuple[float, ...] = ()

    def explain(self, targets: Sequence[Target], health: HealthView) -> dict[str, str]:
        """Each target's weight and its share after renormalisation over ``targets``."""
        total = sum(max(t.weight, 0) for t in targets)
        return {
            t.key: f"weight {t.weight} = {100 * t.weight / total:.1f}%"
            if total
            else f"weight {t.weight}"
            for t in targets
        }

    def prepare(self, targets: Sequence[Target], health: HealthView) -> tuple[Group, ...]:
        """Positive weights as one draw by weight, zero weights as a shuffle after them."""
        return compact(by_weight(targets))

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Draw targets one by one in proportion to their weights (see ``routing.draw``)."""
        return order_all(self.prepare(targets, health), rng)
