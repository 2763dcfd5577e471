"""Lowest-price routing: the cheapest target first; equal prices go by weight.

A target's price is its catalog model's ``price`` per million input tokens plus per million
output tokens (configuration validation requires one on every target). Among targets with the
same price the order is drawn by weight, like weight-based routing (equal weights when unset).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from random import Random

from extproc.routing.draw import Group, by_weight, compact, order_all
from extproc.routing.model import Target
from extproc.routing.strategy import HealthView


def unit_price(target: Target) -> float:
    """Input plus output price per million tokens (infinite when unknown)."""
    price = target.model.price
    return float("inf") if price is None else price[0] + price[1]


class LowestPriceStrategy:
    """Ascending price; within a price, drawn by weight."""

    name = "lowest-price-routing"
    windows: tuple[float, ...] = ()
    prepare_windows: tuple[float, ...] = ()

    def prepare(self, targets: Sequence[Target], health: HealthView) -> tuple[Group, ...]:
        """One weighted draw per price, cheapest first (prices never change within a config)."""
        ranked = sorted(targets, key=unit_price)
        groups: list[Group] = []
        for _, same_price in groupby(ranked, key=unit_price):
            groups.extend(by_weight(list(same_price)))
        return compact(groups)

    def order(self, targets: Sequence[Target], health: HealthView, rng: Random) -> list[Target]:
        """Cheapest first; equal prices drawn by weight."""
        return order_all(self.prepare(targets, health), rng)

    def explain(self, targets: Sequence[Target], health: HealthView) -> dict[str, str]:
        """Each target's prices per million tokens."""
        out: dict[str, str] = {}
        for t in targets:
            price = t.model.price
            out[t.key] = (
                "no price" if price is None else f"{price[0]:g} in + {price[1]:g} out per 1M tokens"
            ) + f", weight {t.weight}"
        return out
