"""routing.draw: group orders drawn lazily, and the Plan sequence over them."""

from __future__ import annotations

from collections import Counter
from random import Random

import pytest

from extproc.routing.draw import (
    SMALL_GROUP,
    TABLED,
    Drawing,
    Kind,
    Plan,
    by_weight,
    compact,
    draw,
    fixed,
    order_all,
    shuffled,
)
from extproc.routing.model import CatalogModel, Provider, RetryPolicy, Target

PROVIDER = Provider("p", "provider_p", "http", "127.0.0.1", 8000, "127.0.0.1:8000", "/v1")
RETRY = RetryPolicy(attempts=2, delay_ms=0, on_status=frozenset())


def target(name: str, weight: int = 1, candidate: bool = True) -> Target:
    model = CatalogModel(f"p/{name}", PROVIDER, name, frozenset({"chat"}))
    return Target(model, weight, 0, RETRY, frozenset(), candidate, {}, (), (), {})


def keys(targets: object) -> list[str]:
    return [t.key for t in targets]  # type: ignore[attr-defined]


def test_groups_from_weights() -> None:
    equal = [target(f"e{i}", 5) for i in range(4)]
    assert [g.kind for g in by_weight(equal)] == [Kind.SHUFFLE]
    mixed = [target("a", 3), target("z", 0), target("b", 1)]
    groups = by_weight(mixed)
    assert [g.kind for g in groups] == [Kind.WEIGHTED, Kind.FIXED]
    assert keys(groups[0].items) == ["p/a", "p/b"]
    assert groups[0].cumulative == (3.0, 4.0)
    assert keys(groups[1].items) == ["p/z"]


def test_compact_merges_fixed_runs_and_drops_empty_groups() -> None:
    a, b, c = target("a"), target("b"), target("c")
    groups = compact([fixed([a]), shuffled([]), fixed([b]), shuffled([c, a]), fixed([])])
    assert [(g.kind, keys(g.items)) for g in groups] == [
        (Kind.FIXED, ["p/a", "p/b"]),
        (Kind.SHUFFLE, ["p/c", "p/a"]),
    ]


@pytest.mark.parametrize("n", [2, TABLED, SMALL_GROUP, 40])
def test_shuffle_is_uniform_over_positions(n: int) -> None:
    members = [target(f"t{i}") for i in range(n)]
    group = shuffled(members)
    rng = Random(1)
    draws = 20_000
    at_first: Counter[str] = Counter()
    at_last: Counter[str] = Counter()
    for _ in range(draws):
        order = list(draw([group], rng))
        assert len(order) == n
        assert len(set(map(id, order))) == n
        at_first[order[0].key] += 1
        at_last[order[-1].key] += 1
    expected = draws / n
    tolerance = 5 * (expected**0.5)
    assert all(abs(at_first[t.key] - expected) < tolerance for t in members)
    assert all(abs(at_last[t.key] - expected) < tolerance for t in members)


@pytest.mark.parametrize("n", [2, TABLED, SMALL_GROUP, 40])
def test_weighted_order_is_successive_draws_by_weight(n: int) -> None:
    # Half the targets weigh 3, half weigh 1.
    members = [target(f"t{i}", 3 if i % 2 == 0 else 1) for i in range(n)]
    [group] = by_weight(members)
    rng = Random(2)
    draws = 20_000
    heavy_first = heavy_second = 0
    for _ in range(draws):
        order = list(draw([group], rng))
        assert len(order) == n
        heavy_first += order[0].weight == 3
        heavy_second += order[1].weight == 3
    total = 2 * n
    p_first = 3 * (n // 2) / total
    p_second = p_first * (3 * (n // 2 - 1)) / (total - 3) + (1 - p_first) * (3 * (n // 2)) / (
        total - 1
    )
    assert abs(heavy_first / draws - p_first) < 0.015
    assert abs(heavy_second / draws - p_second) < 0.015


def test_zero_weights_come_last() -> None:
    members = [target("z1", 0), target("a", 2), target("z2", 0), target("b", 5)]
    groups = compact(by_weight(members))
    rng = Random(3)
    for _ in range(200):
        order = keys(draw(groups, rng))
        assert sorted(order[:2]) == ["p/a", "p/b"]
        assert sorted(order[2:]) == ["p/z1", "p/z2"]


@pytest.mark.parametrize("n", [5, 40])
def test_skip_leaves_one_target_out_and_keeps_the_rest(n: int) -> None:
    members = [target(f"t{i}", 1 + i % 3) for i in range(n)]
    groups = compact(by_weight(members))
    rng = Random(4)
    for _ in range(100):
        order = list(draw(groups, rng, skip=members[1]))
        assert members[1] not in order
        assert len(order) == n - 1
        eager = order_all(groups, rng, skip=members[1])
        assert members[1] not in eager
        assert len(eager) == n - 1


def test_plan_draws_on_demand_and_filters_non_candidates() -> None:
    members = [target(f"t{i}", candidate=i % 4 != 0) for i in range(20)]
    candidates = tuple(t for t in members if t.fallback_candidate)
    drawing = Drawing([shuffled(members)], Random(5))
    primary = drawing.next()
    assert primary is not None
    plan = Plan([primary], drawing, candidates)
    expected = len(candidates) + (0 if primary.fallback_candidate else 1)
    assert len(plan) == expected
    assert len(plan.members()) == expected
    assert plan[0] is primary
    head = plan.head(6, lambda t: t.retry.attempts)  # 2 attempts each: 3 targets
    assert len(head) == 3
    whole = list(plan)
    assert len(whole) == expected
    assert whole[0] is primary
    assert all(t.fallback_candidate for t in whole[1:])
    assert plan == tuple(whole)
    assert plan[1:] == tuple(whole[1:])
    assert plan[-1] is whole[-1]
    assert hash(plan) == hash(tuple(whole))


def test_plan_of_fixed_targets() -> None:
    a, b = target("a"), target("b")
    plan = Plan.of([a, b])
    assert list(plan) == [a, b]
    assert len(plan) == 2
    assert plan.members() == (a, b)
    assert plan.head(1) == (a,)
    assert repr(plan) == "Plan(['p/a', 'p/b'])"


def test_tiny_weighted_group_tables_every_order_with_its_chance() -> None:
    a, b, c = target("a", 5), target("b", 3), target("c", 2)
    [group] = by_weight([a, b, c])
    assert len(group.orders) == 6
    chances = dict(zip(group.orders, (0.0, *group.order_odds), strict=False))
    odds = [hi - lo for lo, hi in zip((0.0, *group.order_odds), group.order_odds, strict=False)]
    table = dict(zip(group.orders, odds, strict=True))
    assert table[(a, b, c)] == pytest.approx(0.5 * 3 / 5)
    assert table[(c, b, a)] == pytest.approx(0.2 * 3 / 8)
    assert sum(odds) == pytest.approx(1.0)
    assert chances  # every order is reachable
    rng = Random(6)
    draws = 30_000
    counts = Counter(tuple(draw([group], rng)) for _ in range(draws))
    for order, chance in table.items():
        assert abs(counts[order] / draws - chance) < 0.01


@pytest.mark.parametrize("drawn", [0, 3, 25])
def test_rest_after_some_draws_orders_what_is_left_with_the_same_odds(drawn: int) -> None:
    # 40 targets, half weighing 3 and half 1: whatever was drawn one by one, the target right
    # after is heavy with the odds of one more draw by weight among those left.
    members = [target(f"t{i}", 3 if i % 2 == 0 else 1) for i in range(40)]
    groups = compact([*by_weight(members), fixed([target("tail")])])
    rng = Random(7)
    draws = 6_000
    hits = expected = 0.0
    for _ in range(draws):
        drawing = Drawing(groups, rng)
        head = [drawing.next() for _ in range(drawn)]
        rest = drawing.rest()
        assert drawing.next() is None
        order = [*head, *rest]
        assert sorted(t.key for t in order) == sorted(
            t.key for t in [*members, groups[-1].items[0]]
        )
        assert order[-1].key == "p/tail"
        left = [t for t in members if t not in head]
        expected += sum(t.weight for t in left if t.weight == 3) / sum(t.weight for t in left)
        hits += rest[0].weight == 3
    assert abs(hits / draws - expected / draws) < 0.025
