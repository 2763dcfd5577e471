"""What health allows for one route right now, cached until health or time says otherwise.

This module owns the per-route cache behind ``RoutingTable.resolve``. For one route and one
metadata pool key (which of its ``metadata_match`` targets the request matches), a ``Snapshot``
holds, per pool: the eligible targets (out of cooldown and within their SLA cutoff) and the
strategy's prepared groups for them (``Strategy.prepare``); plus the targets held back (cooling
down, or over their SLA cutoff) in least-bad order, and the over-SLA targets a probe draw may
still let in. None of it depends on the request, so a snapshot serves every request until:

* one of its targets' cooldown or failure count changes, or, when the snapshot read TPOT means
  (SLA cutoffs, latency ranking), one of its targets gets a TPOT sample. The tracker's global
  ``state_version`` and ``tpot_version`` (``CacheableHealth.routing_stamp``) say whether anything
  changed anywhere; only then are the snapshot's own targets' versions compared
  (``versions_of``), and a snapshot none of whose targets changed is kept;
* the clock reaches ``expires``: the earliest instant a cooldown it saw ends, or a TPOT sample it
  read leaves its window (``cooldown_until``, ``tpot_expiry``); or it goes back before
  ``built_at``. (The held targets' order, by cooldown left, needs no expiry of its own: every
  cooldown left shrinks at the same pace, and one reaching zero is a cooldown ending.)

With a health view that is not a ``CacheableHealth``, a snapshot is built for every request, so
there is one code path either way. The per-request part (probe draws, the random order, the sticky
target) stays in ``routing.table``.

A rebuild is kept cheap all the same (every route rebuilds once after a config load): a strategy
that reads no health prepares a given eligible set once per route (``_prepared``), and a healthy
pool shares its members tuple instead of copying it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import cast

from extproc.routing.draw import Group, fixed, is_fixed, plan_of
from extproc.routing.model import Target
from extproc.routing.strategy import CacheableHealth, HealthView, Strategy

EXPIRY_MARGIN_S = 1e-6
"""A snapshot that read a TPOT window expires this much before the oldest sample leaves it.

The window drops a sample when ``now - length >= t``; the snapshot compares ``now`` with
``t + length``, which can round differently in the last bit. Expiring a microsecond early only
costs a rebuild; expiring late would serve a stale mean.
"""
MAX_VARIANTS = 64
"""Eligible sets with probed over-SLA targets kept per snapshot (a bound, cleared when full)."""
MAX_POOL_KEYS = 256
"""Metadata pool keys kept per route (bounds ``2 ** conditioned targets``; cleared when full)."""
MAX_PREPARED = 64
"""Prepared eligible sets kept per route for strategies that read no health (cleared when full)."""

_NO_OVER: Mapping[Target, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=False)
class Pool:
    """One precedence pool of a request: ``metadata match`` first, then ``unconditioned``."""

    name: str
    members: tuple[Target, ...]
    """Every target of the pool, in config order."""
    eligible: tuple[Target, ...]
    """The members usable as a first choice, in config order."""
    groups: tuple[Group, ...] | None
    """The strategy's prepared order of ``eligible``; None: ask ``Strategy.order`` per request."""


class View:
    """The eligible and held targets of a snapshot (or of a snapshot with probed targets in).

    Everything a request reads is computed once here: whether any target is eligible, the groups
    to draw from (the pools' then the held targets', unless a pool's order is per request), the
    whole plan when no draw is random, and the fallback candidates (the plan's members).
    """

    __slots__ = ("_sticky", "candidates", "eligible", "fixed_plan", "groups", "held", "pools")

    def __init__(
        self, pools: tuple[Pool, ...], held: tuple[Target, ...], candidates: tuple[Target, ...]
    ) -> None:
        """Wrap the pools and the held targets (least bad first)."""
        self.pools = pools
        self.held = held
        self.candidates = candidates
        """Every target of every pool that is a fallback candidate."""
        eligible = False
        groups: tuple[Group, ...] | None = ()
        for pool in pools:
            if pool.eligible:
                eligible = True
                if pool.groups is None or groups is None:
                    groups = None
                else:
                    groups += pool.groups
        if groups is not None and held:
            groups += (fixed(held),)
        self.eligible = eligible
        """Whether any target is usable as a first choice."""
        self.groups = groups
        """What one request's order is drawn from; None when a pool orders per request."""
        self.fixed_plan: tuple[Target, ...] | None = None
        """The plan when nothing in it is random (every group fixed)."""
        if groups and is_fixed(groups):
            order = (
                groups[0].items if len(groups) == 1 else tuple(t for g in groups for t in g.items)
            )
            self.fixed_plan = plan_of(order)
        self._sticky: dict[str, Target | None] | None = None

    def sticky(self, key: str) -> Target | bool | None:
        """The eligible target a session stuck to ``key`` goes to first.

        None when ``key`` is not eligible; True when the first pool holding it holds it more than
        once (``metadata_match`` duplicates), where which one comes first is random: the caller
        then orders the whole plan to find out.
        """
        index = self._sticky
        if index is None:
            index = {}
            for pool in self.pools:
                seen: dict[str, int] = {}
                for target in pool.eligible:
                    seen[target.key] = seen.get(target.key, 0) + 1
                for target in pool.eligible:
                    if target.key not in index:
                        index[target.key] = target if seen[target.key] == 1 else None
            self._sticky = index
        if key not in index:
            return None
        hit = index[key]
        return True if hit is None else hit


class Snapshot(View):
    """What health allowed for one route and pool key when it was built (see module docs)."""

    __slots__ = (
        "_variants",
        "built_at",
        "cooling",
        "expires",
        "key_states",
        "key_tpots",
        "keys",
        "over",
        "probes",
        "state_version",
        "tpot_version",
    )

    def __init__(
        self,
        pools: tuple[Pool, ...],
        held: tuple[Target, ...],
        candidates: tuple[Target, ...],
        over: Mapping[Target, float],
        cooling: frozenset[Target],
        stamp: tuple[int, int, float],
        expires: float,
        keys: tuple[str, ...] = (),
        key_states: tuple[int | None, ...] = (),
        key_tpots: tuple[int | None, ...] = (),
    ) -> None:
        """Record the pools, the held targets and the health stamp they were read at."""
        super().__init__(pools, held, candidates)
        self.keys = keys
        """Every member's key, for ``versions_of``."""
        self.key_states = key_states
        self.key_tpots = key_tpots
        self.over = over
        """Over-SLA targets (available, but their mean TPOT is above the cutoff) and the mean."""
        self.cooling = cooling
        self.probes: tuple[Target, ...] = (
            tuple(t for p in pools for t in p.members if t in over) if over else ()
        )
        """The over-SLA targets, in the order probe draws are made."""
        self.state_version, self.tpot_version, self.built_at = stamp
        self.expires = expires
        self._variants: dict[tuple[Target, ...], View] | None = None

    def with_probes(
        self, probed: tuple[Target, ...], cache: RouteCache, health: HealthView
    ) -> View:
        """The view where the ``probed`` over-SLA targets are eligible too."""
        variants = self._variants
        if variants is None:
            variants = self._variants = {}
        view = variants.get(probed)
        if view is None:
            let_in = set(probed)
            pools = []
            for pool in self.pools:
                if not let_in.intersection(pool.members):
                    pools.append(pool)
                    continue
                allowed = set(pool.eligible) | let_in
                eligible = tuple(t for t in pool.members if t in allowed)
                pools.append(
                    Pool(pool.name, pool.members, eligible, cache.prepare(eligible, health))
                )
            held = tuple(t for t in self.held if t not in let_in)
            view = View(tuple(pools), held, self.candidates)
            if len(variants) >= MAX_VARIANTS:
                variants.clear()
            variants[probed] = view
        return view


class RouteCache:
    """The snapshots of one route, one per metadata pool key."""

    __slots__ = (
        "_entries",
        "_keys",
        "_plain",
        "_prepared",
        "conditioned",
        "strategy",
        "unconditioned",
    )

    def __init__(self, strategy: Strategy, targets: tuple[Target, ...]) -> None:
        """Split the route's targets into conditioned and unconditioned ones."""
        self.strategy = strategy
        self.conditioned: tuple[Target, ...] = tuple(t for t in targets if t.metadata_match)
        """Targets with ``metadata_match``, in config order."""
        self.unconditioned: tuple[Target, ...] = (
            tuple(t for t in targets if not t.metadata_match) if self.conditioned else targets
        )
        self._plain: Snapshot | None = None
        """The snapshot for the empty pool key (the only one without conditioned targets)."""
        self._entries: dict[tuple[int, ...], Snapshot] | None = None
        self._prepared: dict[tuple[Target, ...], tuple[Group, ...] | None] | None = None
        self._keys: tuple[tuple[str, ...], tuple[Target, ...]] | None = None
        """The unconditioned pool's keys and fallback candidates, once computed."""

    def pool_key(self, metadata: Mapping[str, str]) -> tuple[int, ...]:
        """Which conditioned targets the request metadata matches (indexes into ``conditioned``)."""
        if not self.conditioned:
            return ()
        return tuple(
            i
            for i, target in enumerate(self.conditioned)
            if all(metadata.get(k) == v for k, v in target.metadata_match.items())
        )

    def snapshot(self, key: tuple[int, ...], health: HealthView) -> Snapshot:
        """The current snapshot for ``key``: the cached one if still valid, else a new one."""
        stamp_of = getattr(health, "routing_stamp", None)
        if stamp_of is None:
            return self._build(key, health, None)
        stamp: tuple[int, int, float] = stamp_of()
        if key:
            entries = self._entries
            snap = entries.get(key) if entries is not None else None
        else:
            snap = self._plain
        if snap is not None and snap.built_at <= stamp[2] < snap.expires:
            if snap.state_version == stamp[0] and snap.tpot_version in (0, stamp[1]):
                return snap
            if _still_valid(snap, cast(CacheableHealth, health), stamp):
                return snap
        snap = self._build(key, health, stamp)
        if not key:
            self._plain = snap
        else:
            if self._entries is None or len(self._entries) >= MAX_POOL_KEYS:
                self._entries = {}
            self._entries[key] = snap
        return snap

    def prepare(self, eligible: tuple[Target, ...], health: HealthView) -> tuple[Group, ...] | None:
        """The strategy's groups for ``eligible`` (once per set if the strategy reads no health)."""
        strategy = self.strategy
        if strategy.prepare_windows:
            return strategy.prepare(eligible, health)
        prepared = self._prepared
        if prepared is None:
            prepared = self._prepared = {}
        elif eligible in prepared:
            return prepared[eligible]
        if len(prepared) >= MAX_PREPARED:
            prepared.clear()
        groups = prepared[eligible] = strategy.prepare(eligible, health)
        return groups

    def _build(
        self, key: tuple[int, ...], health: HealthView, stamp: tuple[int, int, float] | None
    ) -> Snapshot:
        cacheable = cast(CacheableHealth, health) if stamp is not None else None
        windows = self.strategy.prepare_windows
        available = health.available
        expires = math.inf
        reads_tpot = False
        pools: list[Pool] = []
        held: list[Target] = []
        over: dict[Target, float] | None = None
        cooling: set[Target] | None = None
        specs: tuple[tuple[str, tuple[Target, ...]], ...] = (("unconditioned", self.unconditioned),)
        if key:
            matched = tuple(self.conditioned[i] for i in key)
            specs = (("metadata match", matched), *specs)
        for name, members in specs:
            if not members:
                continue
            eligible: list[Target] = []
            for target in members:
                if not available(target.key):
                    held.append(target)
                    if cooling is None:
                        cooling = set()
                    cooling.add(target)
                    if cacheable is not None:
                        expires = min(expires, cacheable.cooldown_until(target.key))
                    continue
                cutoff = target.sla_cutoff_s
                if cutoff is None:
                    eligible.append(target)
                    continue
                reads_tpot = True
                mean, _ = health.tpot(target.key, target.sla_window_s)
                if cacheable is not None:
                    end = cacheable.tpot_expiry(target.key, target.sla_window_s)
                    expires = min(expires, end - EXPIRY_MARGIN_S)
                if mean is None or mean <= cutoff:
                    eligible.append(target)
                else:
                    if over is None:
                        over = {}
                    over[target] = mean
                    held.append(target)
            usable = members if len(eligible) == len(members) else tuple(eligible)
            groups = self.prepare(usable, health)
            if groups is not None and windows and usable:
                reads_tpot = True
                if cacheable is not None:
                    for target in usable:
                        for window in windows:
                            end = cacheable.tpot_expiry(target.key, window)
                            expires = min(expires, end - EXPIRY_MARGIN_S)
            pools.append(Pool(name, members, usable, groups))
        if len(held) > 1:
            # Least bad first: the shortest cooldown left, then the fewest consecutive failures.
            held.sort(key=lambda t: (health.cooldown_remaining(t.key), health.failures(t.key)))
        if key:
            everyone = tuple(t for p in pools for t in p.members)
            keys = tuple(t.key for t in everyone)
            candidates = tuple(t for t in everyone if t.fallback_candidate)
        else:
            if self._keys is None:
                plain = self.unconditioned
                self._keys = (
                    tuple(t.key for t in plain),
                    tuple(t for t in plain if t.fallback_candidate),
                )
            keys, candidates = self._keys
        key_states: tuple[int | None, ...] = ()
        key_tpots: tuple[int | None, ...] = ()
        if cacheable is None:
            stamp = (0, 0, -math.inf)
        else:
            assert stamp is not None
            key_states = cacheable.versions_of(keys, False)
            if reads_tpot:
                key_tpots = cacheable.versions_of(keys, True)
            else:
                stamp = (stamp[0], 0, stamp[2])  # 0: valid whatever new TPOT samples come in
        return Snapshot(
            tuple(pools),
            tuple(held),
            candidates,
            over if over is not None else _NO_OVER,
            frozenset(cooling) if cooling is not None else frozenset(),
            stamp,
            expires,
            keys,
            key_states,
            key_tpots,
        )


def _still_valid(snap: Snapshot, health: CacheableHealth, stamp: tuple[int, int, float]) -> bool:
    """Whether none of the snapshot's own targets changed since it was built.

    If so, the snapshot adopts the new global versions: the next request takes the quick check.
    """
    if snap.state_version != stamp[0] and (health.versions_of(snap.keys, False) != snap.key_states):
        return False
    if snap.tpot_version not in (0, stamp[1]) and (
        health.versions_of(snap.keys, True) != snap.key_tpots
    ):
        return False
    snap.state_version = stamp[0]
    if snap.tpot_version:
        snap.tpot_version = stamp[1]
    return True
