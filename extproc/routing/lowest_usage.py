"""Lowest-usage routing: the target that used the fewest tokens over a recent window first.

Tokens are input plus output tokens of every attempt the health model saw. Ties are broken at
random, so unused targets share the first requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from extproc.routing.draw import Group
from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


class LowestUsageStrategy:
    """Ascending tokens used in the window, random among equals."""

    name = "lowest-usage-routing"

    def __init__(self, window_s: float = 60.0) -> None:
        """Sum tokens over the last ``window_s`` seconds."""
        self.window_s = window_s
        self.windows: tuple[float, ...] = (window_s,)
        self.prepare_windows: tuple[float, ...] = ()

    def prepare(self, targets: Sequence[Target], health: HealthView) -> tuple[Group, ...] | None:
        """None: Token counts change with every request: nothing to prepare."""
        return None

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Sort by tokens used, ties in random order."""
        keyed = [
            (health.tokens(t.key, self.window_s), rng.random(), i) for i, t in enumerate(targets)
        ]
        keyed.sort()
        return [targets[i] for _, _, i in keyed]

    def explain(self, targets: Sequence[Target], health: HealthView) -> dict[str, str]:
        """Each target's token count in the window."""
        return {
            t.key: f"{health.tokens(t.key, self.window_s):.0f} tokens in {self.window_s:g}s"
            for t in targets
        }
