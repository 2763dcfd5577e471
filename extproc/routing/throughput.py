"""Highest-throughput routing: the target producing the most output tokens per second first.

Throughput samples are output tokens divided by attempt duration, averaged over a window.
Targets with fewer than ``min_samples`` samples come first (random order) so they get measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from extproc.routing.draw import Group
from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


class HighestThroughputStrategy:
    """Unmeasured targets first, then descending tokens per second."""

    name = "highest-throughput-routing"

    def __init__(self, window_s: float = 1200.0, min_samples: int = 3) -> None:
        """Average over ``window_s`` seconds; explore below ``min_samples`` samples."""
        self.window_s = window_s
        self.min_samples = min_samples
        self.windows: tuple[float, ...] = (window_s,)
        self.prepare_windows: tuple[float, ...] = ()

    def prepare(self, targets: Sequence[Target], health: HealthView) -> tuple[Group, ...] | None:
        """None: Throughput changes with every request: nothing to prepare."""
        return None

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Unmeasured first (shuffled), then fastest producers first."""
        unmeasured: list[Target] = []
        measured: list[tuple[float, float, int]] = []
        for index, target in enumerate(targets):
            mean, count = health.throughput(target.key, self.window_s)
            if mean is None or count < self.min_samples:
                unmeasured.append(target)
            else:
                measured.append((-mean, rng.random(), index))
        rng.shuffle(unmeasured)
        measured.sort()
        return unmeasured + [targets[i] for _, _, i in measured]

    def explain(self, targets: Sequence[Target], health: HealthView) -> dict[str, str]:
        """Each target's mean tokens per second, or why it is still being explored."""
        out: dict[str, str] = {}
        for t in targets:
            mean, count = health.throughput(t.key, self.window_s)
            if mean is None or count < self.min_samples:
                out[t.key] = f"exploring ({count} of {self.min_samples} samples)"
            else:
                out[t.key] = f"{mean:.1f} tokens/s over {count} samples"
        return out
