"""The per-route health snapshot cache: reused while nothing changed, rebuilt as soon as it did."""

from __future__ import annotations

from collections import Counter
from random import Random

import pytest

from extproc.health import HealthTracker, Outcome
from extproc.routing.eligibility import Snapshot
from extproc.routing.explain import Explanation
from extproc.routing.strategy import NO_HEALTH
from extproc.routing.table import RequestFacts, RoutingTable
from tests.unit.support import (
    FakeClock,
    health_tracker,
    observe_failures,
    observe_tpot,
    plans,
    primaries,
)

MANY = 30
"""Targets of the ``big`` models: more than a plan drawn whole (``EAGER_PLAN``)."""

CONFIG = (
    """
gateway:
  health:
    consecutive_failures: 3
    cooldown_seconds: 10
    sla_probe_ratio: 0.0
providers:
  - name: p
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: a}, {name: b}, {name: c}, {name: x}, {name: y}]
  - name: q
    type: openai-compatible
    base_url: http://127.0.0.1:8002/v1
    models:
"""
    + "".join(f"      - {{name: m{i:02d}}}\n" for i in range(MANY))
    + """
virtual_model_groups:
  - name: cache
    virtual_models:
      - name: split
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - {target: p/a, weight: 50}
            - {target: p/b, weight: 30}
            - {target: p/c, weight: 20}
      - name: other
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: p/x, priority: 0}
            - {target: p/y, priority: 1}
      - name: sla
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - target: p/x
              priority: 0
              sla_cutoff: {time_per_output_token_ms: 50, window_seconds: 10}
            - {target: p/y, priority: 1}
      - name: fast
        routing_config:
          type: latency-based-routing
          window_seconds: 60
          band: 1.2
          min_samples: 2
          load_balance_targets: [{target: p/a}, {target: p/b}, {target: p/c}]
      - name: regions
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: p/x, priority: 0, metadata_match: {region: EU}}
            - {target: p/y, priority: 0, metadata_match: {region: US}}
            - {target: p/a, priority: 1}
      - name: big
        routing_config:
          type: weight-based-routing
          load_balance_targets:
"""
    + "".join(
        f"            - {{target: q/m{i:02d}, weight: {4 if i < 10 else 3}}}\n" for i in range(MANY)
    )
    + """
      - name: big-equal
        routing_config:
          type: priority-based-routing
          load_balance_targets:
"""
    + "".join(
        f"            - {{target: q/m{i:02d}, priority: 0"
        + (", fallback_candidate: false" if i % 7 == 3 else "")
        + "}\n"
        for i in range(MANY)
    )
)

A, B, C, X, Y = "p/a", "p/b", "p/c", "p/x", "p/y"
SPLIT, OTHER, SLA, FAST = "cache/split", "cache/other", "cache/sla", "cache/fast"
REGIONS, BIG, BIG_EQUAL = "cache/regions", "cache/big", "cache/big-equal"


def snapshot(table: RoutingTable, name: str, health: object, key: tuple[int, ...] = ()) -> Snapshot:
    vm = table.lookup(name)
    assert vm is not None
    return vm.routes[0].cache.snapshot(key, health)  # type: ignore[arg-type]


def first(table: RoutingTable, health: HealthTracker, name: str, seed: int = 1) -> list[str]:
    return plans(table, health, name, 1, seed)[0]


# --- reuse -------------------------------------------------------------------------------------


def test_snapshot_is_reused_while_nothing_changes(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    built = snapshot(table, SPLIT, health)
    clock.now += 1000
    assert snapshot(table, SPLIT, health) is built
    health.observe(Outcome(target=A, status=200, tpot_s=0.01, output_tokens=10))
    assert snapshot(table, SPLIT, health) is built  # no TPOT read, no failure: still valid


def test_snapshot_survives_a_change_to_another_route_target(
    table: RoutingTable, health: HealthTracker
) -> None:
    built = snapshot(table, SPLIT, health)
    observe_failures(health, X, 3)  # a target of another virtual model
    assert snapshot(table, SPLIT, health) is built
    observe_failures(health, A, 1)  # one of its own: rebuilt (the failure count orders held ones)
    assert snapshot(table, SPLIT, health) is not built


def test_snapshot_is_per_tracker(table: RoutingTable, clock: FakeClock) -> None:
    sick = health_tracker(table, clock)
    observe_failures(sick, A, 3)
    assert A not in primaries(plans(table, sick, SPLIT, 300))
    fresh = health_tracker(table, clock)  # e.g. Runtime.reset_health
    assert A in primaries(plans(table, fresh, SPLIT, 300))
    assert A in primaries(plans(table, NO_HEALTH, SPLIT, 300))  # type: ignore[arg-type]
    assert A not in primaries(plans(table, sick, SPLIT, 300))


def test_snapshot_is_rebuilt_when_the_clock_goes_back(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    built = snapshot(table, SPLIT, health)
    clock.now -= 1
    assert snapshot(table, SPLIT, health) is not built


# --- cooldowns ---------------------------------------------------------------------------------


def test_target_entering_cooldown_is_excluded_on_the_very_next_decision(
    table: RoutingTable, health: HealthTracker
) -> None:
    assert A in primaries(plans(table, health, SPLIT, 300))  # warm the cache
    observe_failures(health, A, 3)
    for plan in plans(table, health, SPLIT, 300):
        assert plan[0] != A
        assert plan[-1] == A  # the last resort


def test_cooldown_ending_by_the_clock_alone_reincludes_the_target(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    observe_failures(health, A, 3)
    assert A not in primaries(plans(table, health, SPLIT, 300))
    clock.now += 9.999
    assert A not in primaries(plans(table, health, SPLIT, 300))
    clock.now += 0.001  # exactly the end of the 10 s cooldown: no observation in between
    counts = primaries(plans(table, health, SPLIT, 4_000))
    assert abs(counts[A] / 4_000 - 0.5) < 0.04


def test_held_targets_reorder_when_failures_change(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    observe_failures(health, A, 3)
    observe_failures(health, B, 3)  # same 10 s cooldown as A, same failure count
    assert first(table, health, SPLIT) == [C, A, B]  # ties keep the config order
    observe_failures(health, A, 1)  # A: 4 failures, its cooldown doubles: now the worst
    assert first(table, health, SPLIT) == [C, B, A]


def test_success_of_a_last_resort_target_ends_its_cooldown_at_once(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_failures(health, A, 3)
    assert A not in primaries(plans(table, health, SPLIT, 300))
    health.observe(Outcome(target=A, status=200))
    assert A in primaries(plans(table, health, SPLIT, 300))


# --- SLA ---------------------------------------------------------------------------------------


def test_sla_trip_is_seen_on_the_next_decision_and_recovery_by_the_clock(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    observe_tpot(health, X, 0.02, n=3)
    assert first(table, health, SLA) == [X, Y]
    observe_tpot(health, X, 0.5, n=1)  # mean 0.14 s: over the 50 ms cutoff
    assert first(table, health, SLA) == [Y, X]
    clock.now += 9.0
    assert first(table, health, SLA) == [Y, X]
    clock.now += 1.0  # every sample has left the 10 s window: unmeasured, so within its SLA
    assert first(table, health, SLA) == [X, Y]


def test_sla_snapshot_does_not_outlive_its_oldest_sample(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    observe_tpot(health, X, 0.5, n=1)
    clock.now += 5.0
    observe_tpot(health, X, 0.01, n=3)  # mean 0.1325: over
    assert first(table, health, SLA) == [Y, X]
    clock.now += 5.0  # the slow sample leaves; the mean of the fast ones is 0.01
    assert first(table, health, SLA) == [X, Y]


# --- latency ranking ---------------------------------------------------------------------------


def test_latency_ranking_follows_new_samples(table: RoutingTable, health: HealthTracker) -> None:
    observe_tpot(health, A, 0.010, n=2)
    observe_tpot(health, B, 0.050, n=2)
    observe_tpot(health, C, 0.100, n=2)
    assert first(table, health, FAST) == [A, B, C]
    observe_tpot(health, C, 0.001, n=8)  # C's mean drops to 0.0208: second
    assert first(table, health, FAST) == [A, C, B]
    observe_tpot(health, B, 0.0001, n=50)  # B's mean drops below A's: first
    assert first(table, health, FAST)[0] == B


def test_latency_samples_leaving_the_window_make_a_target_explored_again(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    observe_tpot(health, C, 0.5, n=2)
    clock.now += 30
    observe_tpot(health, A, 0.010, n=2)
    observe_tpot(health, B, 0.011, n=2)
    assert first(table, health, FAST)[-1] == C
    clock.now += 30  # C's samples are 60 s old: gone; unmeasured targets are tried first
    assert first(table, health, FAST)[0] == C


# --- metadata pools ----------------------------------------------------------------------------


def test_each_metadata_pool_has_its_own_snapshot(
    table: RoutingTable, health: HealthTracker
) -> None:
    rng = Random(1)

    def plan_for(metadata: dict[str, str]) -> list[str]:
        facts = RequestFacts(metadata=metadata)
        return [t.key for t in table.resolve(REGIONS, "chat", rng, health, facts).plan]

    assert plan_for({"region": "EU"}) == [X, A]
    assert plan_for({"region": "US"}) == [Y, A]
    assert plan_for({}) == [A]
    observe_failures(health, X, 3)
    assert plan_for({"region": "EU"}) == [A, X]
    assert plan_for({"region": "US"}) == [Y, A]


# --- long plans, drawn on demand ---------------------------------------------------------------


def test_long_plan_holds_every_target_once_and_knows_its_length_without_drawing(
    table: RoutingTable, health: HealthTracker
) -> None:
    decision = table.resolve(BIG, "chat", Random(3), health)
    plan = decision.plan
    assert len(plan) == MANY
    assert len(plan.members()) == MANY
    assert len(plan.head(4)) == 4
    keys = [t.key for t in plan]
    assert sorted(keys) == sorted(f"q/m{i:02d}" for i in range(MANY))
    assert plan == tuple(plan)


def test_long_weighted_plan_primary_and_second_follow_the_weights(
    table: RoutingTable, health: HealthTracker
) -> None:
    draws = 30_000
    plan_list = plans(table, health, BIG, draws, seed=5)
    firsts = primaries(plan_list)
    heavy = sum(firsts[f"q/m{i:02d}"] for i in range(10))  # 10 x 4 of a total weight of 100
    assert abs(heavy / draws - 0.40) < 0.015
    seconds = Counter(plan[1] for plan in plan_list)
    # P(second is heavy) = sum over first picks of P(first) * P(heavy | first removed)
    expected = 0.40 * (36 / 96) + 0.60 * (40 / 97)
    assert abs(sum(seconds[f"q/m{i:02d}"] for i in range(10)) / draws - expected) < 0.015


def test_long_plan_cooling_targets_go_last(table: RoutingTable, health: HealthTracker) -> None:
    observe_failures(health, "q/m00", 3)
    for plan in plans(table, health, BIG, 200):
        assert plan[-1] == "q/m00"
        assert "q/m00" not in plan[:-1]


def test_long_plan_drops_non_candidates_after_the_primary(
    table: RoutingTable, health: HealthTracker
) -> None:
    strict = {f"q/m{i:02d}" for i in range(MANY) if i % 7 == 3}
    plan_list = plans(table, health, BIG_EQUAL, 3_000, seed=9)
    for plan in plan_list:
        assert not strict.intersection(plan[1:])
        assert len(plan) == MANY - len(strict) + (1 if plan[0] in strict else 0)
    counts = primaries(plan_list)
    assert set(counts) == {f"q/m{i:02d}" for i in range(MANY)}  # a shuffle over every target
    assert all(50 < n < 160 for n in counts.values())


def test_long_plan_sticky_target_first_and_not_repeated(
    table: RoutingTable, health: HealthTracker
) -> None:
    facts = RequestFacts(sticky_target="q/m17")
    decision = table.resolve(BIG, "chat", Random(2), health, facts)
    keys = [t.key for t in decision.plan]
    assert decision.sticky_hit
    assert keys[0] == "q/m17"
    assert keys.count("q/m17") == 1
    assert len(keys) == MANY


@pytest.mark.parametrize("name", [BIG, BIG_EQUAL])
def test_long_plan_explain_does_not_change_the_decision(
    table: RoutingTable, health: HealthTracker, name: str
) -> None:
    observe_failures(health, "q/m05", 3)
    for seed in range(10):
        explanation = Explanation()
        table.resolve(name, "chat", Random(seed), health, explain=explanation)
        plain = table.resolve(name, "chat", Random(seed), health)
        assert [t.key for t in plain.plan] == explanation.plan
