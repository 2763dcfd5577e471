"""Latency-based routing: the fastest targets by time per output token share the traffic.

Targets with fewer than ``min_samples`` samples in the window come first (in random order) so
that new or recovered targets get measured. Otherwise every target whose mean time per output
token is within ``band`` times the fastest counts as equally fast: they come first in random order,
the slower ones follow, fastest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from extproc.routing.draw import Group, compact, fixed, order_all, shuffled
from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


class LatencyStrategy:
    """Fastest first, with a tie band and exploration of unmeasured targets."""

    name = "latency-based-routing"

    def __init__(self, window_s: float = 1200.0, band: float = 1.2, min_samples: int = 3) -> None:
        """Configure the window (s), the tie band (factor) and the exploration threshold."""
        self.window_s = window_s
        self.band = band
        self.min_samples = min_samples
        self.windows: tuple[float, ...] = (window_s,)
        self.prepare_windows: tuple[float, ...] = (window_s,)

    def explain(self, targets: Sequence[Target], health: HealthView) -> dict[str, str]:
        """Each target's mean time per output token, or why it is still being explored."""
        scored = self.scores(targets, health)
        measured = [m for _, m, n in scored if m is not None and n >= self.min_samples]
        fastest = min(measured) if measured else None
        out: dict[str, str] = {}
        for target, mean, count in scored:
            if mean is None or count < self.min_samples:
                out[target.key] = f"exploring ({count} of {self.min_samples} samples)"
            else:
                inside = fastest is not None and mean <= fastest * self.band
                where = "in" if inside else "outside"
                out[target.key] = (
                    f"tpot {mean * 1000:.1f} ms over {count} samples"
                    f" ({where} the {self.band:g}x band)"
                )
        return out

    def scores(
        self, targets: Sequence[Target], health: HealthView
    ) -> list[tuple[Target, float | None, int]]:
        """Each target's mean TPOT (s) over the window and its sample count."""
        return [(t, *health.tpot(t.key, self.window_s)) for t in targets]

    def prepare(self, targets: Sequence[Target], health: HealthView) -> tuple[Group, ...]:
        """Unmeasured targets shuffled, then the fast band shuffled, then the rest by speed."""
        unmeasured: list[Target] = []
        measured: list[tuple[float, int, Target]] = []
        for index, (target, mean, count) in enumerate(self.scores(targets, health)):
            if mean is None or count < self.min_samples:
                unmeasured.append(target)
            else:
                measured.append((mean, index, target))
        measured.sort(key=lambda item: (item[0], item[1]))
        if not measured:
            return compact([shuffled(unmeasured)])
        limit = measured[0][0] * self.band
        fast = [t for mean, _, t in measured if mean <= limit]
        slow = [t for mean, _, t in measured if mean > limit]
        return compact([shuffled(unmeasured), shuffled(fast), fixed(slow)])

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Unmeasured targets first, then the fast band, then the rest by speed."""
        return order_all(self.prepare(targets, health), rng)
