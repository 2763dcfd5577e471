"""Latency-based routing.

Until the health model records time per output token, every target counts as unmeasured and
unmeasured targets share traffic evenly, which is what the strategy does with no samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from extproc.routing.model import Target


class LatencyStrategy:
    """Fastest first; with no samples yet, a uniform random order."""

    name = "latency-based-routing"

    def order(self, targets: Sequence[Target], rng: Random) -> list[Target]:
        """Return the targets in a uniformly random order (no latency samples yet)."""
        ordered = list(targets)
        rng.shuffle(ordered)
        return ordered
