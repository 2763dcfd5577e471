"""Random target orders, drawn lazily: the groups a strategy prepares, and the ``Plan`` sequence.

This module owns *how* a random order is drawn, not *which* order a strategy wants. A strategy
describes its order for a set of targets as ``Group``s, computed once per set and health state
(``routing.eligibility`` caches them): a fixed sequence, a uniform shuffle, or a draw by weight
without replacement. ``Drawing`` turns groups into one request's order, one target at a time, so
a request that only ever needs its first few targets (the attempt slots) pays for those only:

* a tiny group (at most ``TABLED`` members, so at most 24 orders) keeps every possible order with
  its probability (uniform, or the product of the successive draws' weight shares): one random
  number and a bisection pick a whole order, ready-made;
* a small group (at most ``SMALL_GROUP`` members) is ordered at once with one random key each
  (shuffle: ``u``; weighted: ``u ** (1 / weight)``, the Efraimidis-Spirakis keys);
* a larger shuffle or weighted group draws its first members by rejection (a uniform index, or
  a bisection of the cumulative weights, drawn again when it hits a member already taken) while
  the members left hold more than half of the group (of its weight), so a draw costs at most two
  tries on average; the rest of the group is then ordered at once with one key each. Both halves
  are the same distribution as drawing every member one by one, because what is left after a
  prefix of draws without replacement is again a draw without replacement of the rest;
* a uniform index is ``int(random() * n)``, as ``random.choices`` does, not ``randrange``: its
  bias is at most ``n / 2**53`` (about 1e-13 for a thousand targets), and it is several times
  cheaper.

``Plan`` is the immutable sequence of one decision's targets: the primary is drawn when the plan
is made, later targets when something first reads them (``build_slots`` reads a handful, and
reading further draws the rest at once). Reading never changes what a plan holds, only when its
random draws are made.
"""

from __future__ import annotations

import enum
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import permutations
from random import Random
from typing import overload

from extproc.routing.model import Target

SMALL_GROUP = 8
"""Groups up to this size are keyed and sorted whole: cheaper than drawing them one by one."""
TABLED = 4
"""Groups up to this size keep a table of their orders (at most 4! = 24)."""


class Kind(enum.Enum):
    """How a group's members are ordered for one request."""

    FIXED = "fixed"
    """In the group's own order, every time."""
    SHUFFLE = "shuffle"
    """A uniformly random order."""
    WEIGHTED = "weighted"
    """Drawn one by one in proportion to their (positive) weights, without replacement."""


@dataclass(frozen=True, slots=True, eq=False)
class Group:
    """Targets that come out together, in an order of one ``Kind``."""

    kind: Kind
    items: tuple[Target, ...]
    weights: tuple[float, ...] = ()
    """WEIGHTED: each member's weight."""
    cumulative: tuple[float, ...] = ()
    """WEIGHTED: running sums of ``weights`` (what bisection draws against)."""
    exponents: tuple[float, ...] = ()
    """WEIGHTED: ``1 / weight`` per member, for the keys ``u ** (1 / weight)``."""
    orders: tuple[tuple[Target, ...], ...] = ()
    """Tiny groups: every order of the members (see ``TABLED``)."""
    order_odds: tuple[float, ...] = ()
    """Tiny WEIGHTED groups: the running sum of the probabilities of ``orders``."""


def fixed(items: Sequence[Target]) -> Group:
    """The members in this order."""
    return Group(Kind.FIXED, tuple(items))


def shuffled(items: Sequence[Target]) -> Group:
    """The members in a uniformly random order (fixed when there is only one)."""
    members = tuple(items)
    if len(members) <= 1:
        return Group(Kind.FIXED, members)
    orders = tuple(permutations(members)) if len(members) <= TABLED else ()
    return Group(Kind.SHUFFLE, members, orders=orders)


def _weighted(items: tuple[Target, ...], weights: tuple[float, ...]) -> Group:
    running = 0.0
    cumulative = []
    for weight in weights:
        running += weight
        cumulative.append(running)
    total = running
    exponents = tuple(1.0 / w for w in weights)
    orders: tuple[tuple[int, ...], ...] = ()
    odds: list[float] = []
    if len(items) <= TABLED:
        # P(order) = w1/W * w2/(W - w1) * ...: the chance of those successive draws.
        orders = tuple(permutations(range(len(items))))
        running = 0.0
        for order in orders:
            left, chance = total, 1.0
            for index in order:
                chance *= weights[index] / left
                left -= weights[index]
            running += chance
            odds.append(running)
    return Group(
        Kind.WEIGHTED,
        items,
        weights,
        tuple(cumulative),
        exponents,
        tuple(tuple(items[i] for i in order) for order in orders),
        tuple(odds),
    )


def by_weight(items: Sequence[Target]) -> list[Group]:
    """Positive weights drawn by weight, then zero weights shuffled (the weighted strategy)."""
    positive = [t for t in items if t.weight > 0]
    zero = [t for t in items if t.weight <= 0]
    groups: list[Group] = []
    if len({t.weight for t in positive}) <= 1:
        # Equal weights: a draw by weight is a uniform shuffle, which is cheaper to draw.
        groups.append(shuffled(positive))
    else:
        groups.append(_weighted(tuple(positive), tuple(float(t.weight) for t in positive)))
    groups.append(shuffled(zero))
    return [g for g in groups if g.items]


def compact(groups: Iterable[Group]) -> tuple[Group, ...]:
    """Drop empty groups and merge neighbouring fixed ones (fewer steps per draw)."""
    out: list[Group] = []
    for group in groups:
        if not group.items:
            continue
        if group.kind is Kind.FIXED and out and out[-1].kind is Kind.FIXED:
            out[-1] = Group(Kind.FIXED, out[-1].items + group.items)
        else:
            out.append(group)
    return tuple(out)


def is_fixed(groups: Sequence[Group]) -> bool:
    """Whether the groups always come out in the same order."""
    return all(g.kind is Kind.FIXED for g in groups)


def order_group(group: Group, rng: Random) -> Sequence[Target]:
    """Every member of one group, in its random order, keyed and sorted at once."""
    items = group.items
    kind = group.kind
    if kind is Kind.FIXED:
        return items
    random = rng.random
    orders = group.orders
    if orders:
        if kind is Kind.SHUFFLE:
            return orders[int(random() * len(orders))]
        odds = group.order_odds
        # hi: the running sum may end a rounding error below 1.0
        return orders[bisect_right(odds, random() * odds[-1], 0, len(odds) - 1)]
    return _keyed(group, range(len(items)), rng)


def _keyed(group: Group, indexes: Iterable[int], rng: Random) -> list[Target]:
    """The members at ``indexes`` in the group's random order, one random key each."""
    items = group.items
    random = rng.random
    if group.kind is Kind.SHUFFLE:
        rest = [items[i] for i in indexes]
        rest.sort(key=lambda _: random())
        return rest
    exponents = group.exponents
    keyed = [(random() ** exponents[i], i) for i in indexes]
    keyed.sort(reverse=True)
    return [items[i] for _, i in keyed]


def order_all(groups: Iterable[Group], rng: Random, skip: Target | None = None) -> list[Target]:
    """Every member of ``groups`` once, in one request's order, drawn at once (short plans)."""
    ordered: list[Target] = []
    for group in groups:
        ordered.extend(order_group(group, rng))
    if skip is not None:
        ordered.remove(skip)  # identity: targets compare by identity
    return ordered


class Drawing:
    """One request's order over ``groups``, drawn as far as it is read.

    ``next()`` draws one more target (by rejection inside a large group, see the module docs);
    ``rest()`` orders everything not drawn yet at once (what is left of the current group by
    keys, the later groups whole), which is cheaper per target when all of it is wanted. Either
    way the order has the same distribution. ``skip`` is left out wherever it comes.
    """

    __slots__ = (
        "_group",
        "_groups",
        "_left",
        "_next",
        "_pending",
        "_read",
        "_rng",
        "_skip",
        "_taken",
    )

    def __init__(self, groups: Sequence[Group], rng: Random, skip: Target | None = None) -> None:
        """Start before the first member of the first group."""
        self._groups = groups
        self._next = 0
        """Index of the next group to start."""
        self._rng = rng
        self._skip = skip
        self._pending: Sequence[Target] = ()
        """An already ordered run (a small group, or what is left of a large one)..."""
        self._read = 0
        """...and how much of it was handed out."""
        self._group: Group | None = None
        """A large group being drawn by rejection."""
        self._taken: set[int] = set()
        self._left = 0.0
        """WEIGHTED: the weight of the current group's members not drawn yet."""

    def next(self) -> Target | None:
        """The next target of the order, or None after the last."""
        skip = self._skip
        while True:
            pending = self._pending
            if self._read < len(pending):
                target = pending[self._read]
                self._read += 1
                if target is not skip:
                    return target
                continue
            group = self._group
            if group is not None:
                index = self._reject(group)
                if index is None:  # half of the group drawn: the rest by keys, at once
                    self._pending = _keyed(group, self._untaken(group), self._rng)
                    self._read = 0
                    self._group = None
                elif group.items[index] is not skip:
                    return group.items[index]
                continue
            if self._next >= len(self._groups):
                return None
            group = self._groups[self._next]
            self._next += 1
            if group.kind is Kind.FIXED or len(group.items) <= SMALL_GROUP:
                self._pending = order_group(group, self._rng)
                self._read = 0
            else:
                self._group = group
                self._taken = set()
                self._left = group.cumulative[-1] if group.kind is Kind.WEIGHTED else 0.0

    def rest(self) -> list[Target]:
        """Every target not drawn yet, in order (drawn now)."""
        rest = list(self._pending[self._read :])
        self._pending, self._read = (), 0
        group = self._group
        if group is not None:
            rest.extend(_keyed(group, self._untaken(group), self._rng))
            self._group = None
        for group in self._groups[self._next :]:
            rest.extend(order_group(group, self._rng))
        self._next = len(self._groups)
        if self._skip is not None and self._skip in rest:
            rest.remove(self._skip)  # identity: targets compare by identity
        return rest

    def _untaken(self, group: Group) -> list[int]:
        taken = self._taken
        return [i for i in range(len(group.items)) if i not in taken]

    def _reject(self, group: Group) -> int | None:
        """One more member by rejection, or None once the members left are half or less."""
        random = self._rng.random
        taken = self._taken
        n = len(group.items)
        if group.kind is Kind.SHUFFLE:
            if 2 * len(taken) >= n:
                return None
            while True:
                index = int(random() * n)
                if index not in taken:
                    taken.add(index)
                    return index
        cumulative = group.cumulative
        total = cumulative[-1]
        if 2 * self._left <= total:
            return None
        while True:
            # hi=n-1: random() * total may round up to total itself (as in random.choices)
            index = bisect_right(cumulative, random() * total, 0, n - 1)
            if index not in taken:
                taken.add(index)
                self._left -= group.weights[index]
                return index


def draw(groups: Sequence[Group], rng: Random, skip: Target | None = None) -> Iterator[Target]:
    """Every member of ``groups`` once, one at a time (``Drawing.next`` as an iterator)."""
    return iter(Drawing(groups, rng, skip).next, None)


def plan_of(order: Sequence[Target]) -> tuple[Target, ...]:
    """The plan of a whole order: its first target, then the fallback candidates among the rest."""
    rest = order[1:]
    for target in rest:
        if not target.fallback_candidate:
            return (order[0], *(t for t in rest if t.fallback_candidate))
    return tuple(order)


_PULL = threading.Lock()
"""Serialises drawing a plan's next targets: a generator must not be advanced by two threads."""


class Plan(Sequence[Target]):
    """One decision's targets in the order to try, drawn on first read.

    The first target (the primary) is always drawn. After it, only fallback candidates are kept:
    ``rest`` draws every remaining target in order, and those with ``fallback_candidate`` false
    are dropped as they come. ``candidates`` (every fallback candidate the plan holds, in any
    order) gives the members and the length without drawing: only the order is random.
    ``head`` draws one target at a time; reading further (iterating, indexing past the head,
    comparing) draws all the rest at once.
    """

    __slots__ = ("_candidates", "_items", "_rest", "_size")

    def __init__(
        self,
        items: Sequence[Target],
        rest: Drawing | None = None,
        candidates: tuple[Target, ...] | None = None,
    ) -> None:
        """Start from ``items`` (the primary first), drawing the others from ``rest``."""
        if rest is None or candidates is None:
            self._items: list[Target] | tuple[Target, ...] = tuple(items)
            self._rest: Drawing | None = None
            self._candidates: tuple[Target, ...] | None = None
            self._size = len(self._items)
            return
        items = list(items)
        primary = items[0]
        self._items = items
        self._rest = rest
        self._candidates = candidates if primary.fallback_candidate else (primary, *candidates)
        self._size = len(self._candidates)

    @classmethod
    def of(cls, targets: Iterable[Target]) -> Plan:
        """A plan of exactly these targets, in this order."""
        return cls(tuple(targets))

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Target]:
        if self._rest is not None:
            self._all()
        return iter(self._items)

    def head(self, count: int, weight: Callable[[Target], int] | None = None) -> Sequence[Target]:
        """The first ``count`` targets (fewer if the plan is shorter), drawing only what is missing.

        With ``weight``: as many targets as it takes for their weights to add up to ``count``.
        """
        if self._rest is not None:
            with _PULL:
                self._pull(count, weight)
        if weight is None:
            return self._items[:count]
        return self._items

    def _pull(self, count: int, weight: Callable[[Target], int] | None) -> None:
        items = self._items
        rest = self._rest
        if rest is None:
            return
        assert isinstance(items, list)
        held = len(items) if weight is None else sum(map(weight, items))
        while held < count:
            target = rest.next()
            if target is None:
                self._rest = None
                return
            if target.fallback_candidate:
                items.append(target)
                held += 1 if weight is None else weight(target)

    def _all(self) -> tuple[Target, ...]:
        with _PULL:
            rest = self._rest
            if rest is not None:
                items = self._items
                assert isinstance(items, list)
                items.extend(t for t in rest.rest() if t.fallback_candidate)
                self._rest = None
        return tuple(self._items)

    @overload
    def __getitem__(self, index: int) -> Target: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Target, ...]: ...

    def __getitem__(self, index: int | slice) -> Target | tuple[Target, ...]:
        if isinstance(index, int) and 0 <= index < len(self._items):
            return self._items[index]
        return self._all()[index]

    def members(self) -> tuple[Target, ...]:
        """The plan's targets in no particular order, without drawing the rest of the order."""
        if self._candidates is not None and self._rest is not None:
            return self._candidates
        return self._all()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Plan):
            return self._all() == other._all()
        if isinstance(other, tuple):
            return self._all() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return f"Plan({[t.key for t in self._all()]!r})"
