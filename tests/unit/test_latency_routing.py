"""Latency-based routing with a real health tracker and a fake clock."""

from __future__ import annotations

from collections import Counter
from random import Random

import pytest

from extproc.health import HealthTracker, Outcome
from extproc.routing.latency import LatencyStrategy
from extproc.routing.table import RoutingTable
from tests.unit.support import (
    FakeClock,
    observe_tpot,
    plans,
    primaries,
)

CONFIG = """
providers:
  - name: p
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: a}, {name: b}, {name: c}]
virtual_model_groups:
  - name: lat
    virtual_models:
      - name: tuned
        routing_config:
          type: latency-based-routing
          window_seconds: 60
          band: 1.5
          min_samples: 2
          load_balance_targets:
            - {target: p/a}
            - {target: p/b}
            - {target: p/c}
      - name: default
        routing_config:
          type: latency-based-routing
          load_balance_targets:
            - {target: p/a}
            - {target: p/b}
            - {target: p/c}
"""

A, B, C = "p/a", "p/b", "p/c"
TUNED = "lat/tuned"
DEFAULT = "lat/default"


# --- configuration -----------------------------------------------------------------------------


def test_latency_strategy_settings_come_from_yaml(table: RoutingTable) -> None:
    tuned = table.lookup(TUNED)
    default = table.lookup(DEFAULT)
    assert tuned is not None
    assert default is not None
    assert isinstance(tuned.strategy, LatencyStrategy)
    assert isinstance(default.strategy, LatencyStrategy)
    assert (tuned.strategy.window_s, tuned.strategy.band, tuned.strategy.min_samples) == (
        60.0,
        1.5,
        2,
    )
    assert (default.strategy.window_s, default.strategy.band, default.strategy.min_samples) == (
        1200.0,
        1.2,
        3,
    )
    assert table.tpot_windows == frozenset({60.0, 1200.0})


def test_latency_strategy_windows_are_tracked_by_the_health_model(
    health: HealthTracker, clock: FakeClock
) -> None:
    observe_tpot(health, A, 0.01, n=2)
    assert health.tpot(A, 60.0) == (pytest.approx(0.01), 2)
    assert health.tpot(A, 1200.0) == (pytest.approx(0.01), 2)


# --- exploration -------------------------------------------------------------------------------


def test_latency_routing_unmeasured_target_comes_first(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_tpot(health, A, 0.010)
    observe_tpot(health, B, 0.011)
    observe_tpot(health, C, 0.500, n=1)  # slow, but below min_samples (2): it must be measured
    for plan in plans(table, health, TUNED, 200):
        assert plan[0] == C
        assert sorted(plan[1:]) == [A, B]


def test_latency_routing_target_without_samples_comes_first(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_tpot(health, A, 0.010)
    observe_tpot(health, B, 0.011)
    for plan in plans(table, health, DEFAULT, 200):
        assert plan[0] == C


def test_latency_routing_unmeasured_targets_share_the_first_place(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_tpot(health, A, 0.010)
    observe_tpot(health, B, 0.900, n=1)
    plan_list = plans(table, health, TUNED, 4_000)
    for plan in plan_list:
        assert set(plan[:2]) == {B, C}
        assert plan[2] == A
    assert abs(primaries(plan_list)[B] / 4_000 - 0.5) < 0.05


def test_latency_routing_with_nothing_measured_explores_all(
    table: RoutingTable, health: HealthTracker
) -> None:
    counts = primaries(plans(table, health, DEFAULT, 6_000))
    for key in (A, B, C):
        assert abs(counts[key] / 6_000 - 1 / 3) < 0.04


def test_latency_routing_min_samples_reached_ends_exploration(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_tpot(health, A, 0.010)
    observe_tpot(health, B, 0.011)
    observe_tpot(health, C, 0.500, n=1)
    assert plans(table, health, TUNED, 1)[0][0] == C
    observe_tpot(health, C, 0.500, n=1)  # now 2 samples: measured, and far too slow
    for plan in plans(table, health, TUNED, 200):
        assert plan[-1] == C


# --- the fast band -----------------------------------------------------------------------------


def test_latency_routing_band_shares_primary_traffic(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_tpot(health, A, 0.010)
    observe_tpot(health, B, 0.0115)  # within 1.2x of the fastest: counts as equally fast
    observe_tpot(health, C, 0.020)
    plan_list = plans(table, health, DEFAULT, 10_000)
    counts = primaries(plan_list)
    assert set(counts) == {A, B}
    assert abs(counts[A] / 10_000 - 0.5) < 0.03
    assert abs(counts[B] / 10_000 - 0.5) < 0.03
    assert all(plan[2] == C for plan in plan_list)


def test_latency_routing_three_way_band_shares_evenly(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_tpot(health, A, 0.0100)
    observe_tpot(health, B, 0.0110)
    observe_tpot(health, C, 0.0119)
    counts = primaries(plans(table, health, DEFAULT, 9_000))
    for key in (A, B, C):
        assert abs(counts[key] / 9_000 - 1 / 3) < 0.03


def test_latency_routing_band_edge_is_inclusive(table: RoutingTable, health: HealthTracker) -> None:
    observe_tpot(health, A, 0.5)
    observe_tpot(health, B, 0.75)  # exactly 1.5 x 0.5
    observe_tpot(health, C, 0.76)
    counts = primaries(plans(table, health, TUNED, 2_000))
    assert set(counts) == {A, B}


def test_latency_routing_slow_target_never_primary(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_tpot(health, A, 0.010)
    observe_tpot(health, B, 0.013)  # 1.3x: outside the default 1.2 band
    observe_tpot(health, C, 0.011)
    plan_list = plans(table, health, DEFAULT, 5_000)
    assert B not in primaries(plan_list)
    assert all(plan[-1] == B for plan in plan_list)


def test_latency_routing_targets_outside_band_follow_by_speed(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_tpot(health, A, 0.010)
    observe_tpot(health, B, 0.040)
    observe_tpot(health, C, 0.020)
    for plan in plans(table, health, DEFAULT, 100):
        assert plan == [A, C, B]


def test_latency_routing_band_is_relative_to_the_mean(
    table: RoutingTable, health: HealthTracker
) -> None:
    # B alternates fast and slow samples: its mean (0.011) is what counts, not its best sample.
    observe_tpot(health, A, 0.010)
    for value in (0.002, 0.020, 0.011):
        health.observe(Outcome(target=B, status=200, tpot_s=value))
    observe_tpot(health, C, 0.030)
    counts = primaries(plans(table, health, DEFAULT, 2_000))
    assert set(counts) == {A, B}


def test_latency_strategy_order_directly(table: RoutingTable, health: HealthTracker) -> None:
    vm = table.lookup(TUNED)
    assert vm is not None
    observe_tpot(health, A, 0.30)
    observe_tpot(health, B, 0.10)
    observe_tpot(health, C, 0.14)  # within 1.5x of B
    rng = Random(5)
    firsts: Counter[str] = Counter()
    for _ in range(2_000):
        order = [t.key for t in vm.strategy.order(vm.targets, health, rng)]
        assert order[2] == A
        assert set(order[:2]) == {B, C}
        firsts[order[0]] += 1
    assert abs(firsts[B] / 2_000 - 0.5) < 0.05


# --- window expiry -----------------------------------------------------------------------------


def test_latency_routing_slow_samples_age_out_and_target_is_explored(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    observe_tpot(health, B, 0.500)  # slow, at t0
    clock.now += 30.0
    observe_tpot(health, A, 0.010)
    observe_tpot(health, C, 0.012)
    for plan in plans(table, health, TUNED, 200):
        assert plan[-1] == B
    clock.now += 29.0  # t0 + 59 s: B's samples are still inside the 60 s window
    assert B not in primaries(plans(table, health, TUNED, 500))
    clock.now += 1.0  # t0 + 60 s: they age out; B is unmeasured again and gets explored
    assert health.tpot(B, 60.0) == (None, 0)
    for plan in plans(table, health, TUNED, 200):
        assert plan[0] == B


def test_latency_routing_regains_traffic_after_speeding_up(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    observe_tpot(health, A, 0.010)
    observe_tpot(health, B, 0.500)
    clock.now += 61.0  # everything ages out
    observe_tpot(health, A, 0.010)
    observe_tpot(health, B, 0.011)  # B is fast now
    observe_tpot(health, C, 0.100)
    counts = primaries(plans(table, health, TUNED, 4_000))
    assert set(counts) == {A, B}
    assert abs(counts[B] / 4_000 - 0.5) < 0.05


def test_latency_routing_uses_its_own_window(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    # Samples 100 s old are gone for the 60 s model but still count for the 1200 s default.
    observe_tpot(health, A, 0.010)
    observe_tpot(health, B, 0.500)
    observe_tpot(health, C, 0.011)
    clock.now += 100.0
    default_plans = plans(table, health, DEFAULT, 300)
    assert all(plan[-1] == B for plan in default_plans)
    tuned_firsts = primaries(plans(table, health, TUNED, 3_000))
    assert abs(tuned_firsts[B] / 3_000 - 1 / 3) < 0.04  # all three unmeasured again
