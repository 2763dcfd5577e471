"""resolve() with a real health tracker: cooldown filtering, all-unhealthy fallback, SLA cutoff."""

from __future__ import annotations

from random import Random

import pytest

from extproc.health import HealthSettings, HealthTracker, Outcome
from extproc.routing.table import RoutingTable
from tests.unit.support import (
    FakeClock,
    health_tracker,
    observe_failures,
    observe_tpot,
    plans,
    primaries,
    table_from_yaml,
)

CONFIG = """
gateway:
  health:
    consecutive_failures: 3
    cooldown_seconds: 10
    max_cooldown_seconds: 120
    failure_rate: 0.75
    failure_rate_min_requests: 8
    failure_window_seconds: 30
    max_retry_after_seconds: 90
{probe}
providers:
  - name: p
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{{name: a}}, {{name: b}}, {{name: c}}, {{name: x}}, {{name: y}}]
virtual_model_groups:
  - name: health
    virtual_models:
      - name: split
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - {{target: p/a, weight: 50}}
            - {{target: p/b, weight: 30}}
            - {{target: p/c, weight: 20}}
      - name: strict
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - {{target: p/a, weight: 50, fallback_candidate: false}}
            - {{target: p/b, weight: 30}}
            - {{target: p/c, weight: 20}}
      - name: sla
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - target: p/x
              priority: 0
              sla_cutoff: {{time_per_output_token_ms: 50, window_seconds: 10}}
            - {{target: p/y, priority: 1}}
      - name: lonely
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - target: p/x
              priority: 0
              sla_cutoff: {{time_per_output_token_ms: 50, window_seconds: 10}}
"""

A, B, C, X, Y = "p/a", "p/b", "p/c", "p/x", "p/y"
SPLIT, STRICT, SLA, LONELY = "health/split", "health/strict", "health/sla", "health/lonely"


def make_table(probe_ratio: float | None = None) -> RoutingTable:
    probe = "" if probe_ratio is None else f"    sla_probe_ratio: {probe_ratio}"
    return table_from_yaml(CONFIG.format(probe=probe))


@pytest.fixture()
def table() -> RoutingTable:
    return make_table(0.0)


def rate_limit(health: HealthTracker, key: str, seconds: float) -> None:
    health.observe(Outcome(target=key, status=429, retry_after_s=seconds))


def tpot(health: HealthTracker, key: str, value: float, n: int = 1) -> None:
    observe_tpot(health, key, value, n, output_tokens=20)


# --- configuration -----------------------------------------------------------------------------


def test_compile_table_health_settings_come_from_gateway_health(table: RoutingTable) -> None:
    assert table.health_settings == HealthSettings(
        consecutive_failures=3,
        failure_rate=0.75,
        failure_rate_min_requests=8,
        failure_window_s=30.0,
        cooldown_base_s=10.0,
        cooldown_max_s=120.0,
        retry_after_max_s=90.0,
    )
    assert table.sla_probe_ratio == 0.0
    assert make_table().sla_probe_ratio == 0.05  # the documented default
    assert make_table(0.25).sla_probe_ratio == 0.25


def test_compile_table_sla_cutoff_and_window(table: RoutingTable) -> None:
    vm = table.lookup(SLA)
    assert vm is not None
    x, y = vm.targets
    assert x.sla_cutoff_s == pytest.approx(0.05)
    assert x.sla_window_s == 10.0
    assert y.sla_cutoff_s is None
    assert 10.0 in table.tpot_windows


# --- cooldown filtering ------------------------------------------------------------------------


def test_resolve_healthy_weighted_split_is_unchanged(
    table: RoutingTable, health: HealthTracker
) -> None:
    counts = primaries(plans(table, health, SPLIT, 10_000))
    assert abs(counts[A] / 10_000 - 0.5) < 0.02
    assert abs(counts[B] / 10_000 - 0.3) < 0.02
    assert abs(counts[C] / 10_000 - 0.2) < 0.02


def test_resolve_cooling_target_weight_spreads_over_the_rest(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_failures(health, A, 3)
    assert not health.available(A)
    plan_list = plans(table, health, SPLIT, 10_000)
    counts = primaries(plan_list)
    assert A not in counts
    assert abs(counts[B] / 10_000 - 0.6) < 0.02
    assert abs(counts[C] / 10_000 - 0.4) < 0.02
    # Still in the plan, as the last-resort fallback.
    for plan in plan_list:
        assert len(plan) == 3
        assert plan[-1] == A
        assert set(plan[:2]) == {B, C}


def test_resolve_cooling_non_candidate_is_not_kept_as_fallback(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_failures(health, A, 3)
    plan_list = plans(table, health, STRICT, 2_000)
    for plan in plan_list:
        assert sorted(plan) == [B, C]
    counts = primaries(plan_list)
    assert abs(counts[B] / 2_000 - 0.6) < 0.04


def test_resolve_target_is_primary_again_after_cooldown(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    observe_failures(health, A, 3)
    clock.now += 9.9
    assert A not in primaries(plans(table, health, SPLIT, 1_000))
    clock.now += 0.1
    counts = primaries(plans(table, health, SPLIT, 10_000))
    assert abs(counts[A] / 10_000 - 0.5) < 0.02


def test_resolve_rate_limited_target_is_skipped_for_retry_after(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    rate_limit(health, B, 30.0)
    counts = primaries(plans(table, health, SPLIT, 7_000))
    assert B not in counts
    assert abs(counts[A] / 7_000 - 50 / 70) < 0.02
    clock.now += 30.0
    assert B in primaries(plans(table, health, SPLIT, 1_000))


def test_resolve_two_cooling_targets_are_held_least_bad_first(
    table: RoutingTable, health: HealthTracker
) -> None:
    rate_limit(health, A, 60.0)
    observe_failures(health, B, 3)  # 10 s
    for plan in plans(table, health, SPLIT, 500):
        assert plan == [C, B, A]


# --- every target unhealthy --------------------------------------------------------------------


def test_resolve_all_cooling_still_routes_to_least_bad(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    rate_limit(health, A, 30.0)  # 30 s left, 1 failure
    observe_failures(health, B, 3)  # 10 s left, 3 failures
    rate_limit(health, C, 10.0)  # 10 s left, 1 failure: ties B on time, fewer failures
    for plan in plans(table, health, SPLIT, 500):
        assert plan == [C, B, A]
    clock.now += 5.0
    assert plans(table, health, SPLIT, 1) == [[C, B, A]]


def test_resolve_all_cooling_prefers_shortest_cooldown_over_fewest_failures(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_failures(health, A, 3)  # 10 s, 3 failures
    rate_limit(health, B, 80.0)  # 80 s, 1 failure
    rate_limit(health, C, 40.0)  # 40 s, 1 failure
    for plan in plans(table, health, SPLIT, 200):
        assert plan == [A, C, B]


def test_resolve_all_cooling_primary_may_be_a_non_candidate(
    table: RoutingTable, health: HealthTracker
) -> None:
    # least bad, but not a fallback candidate: it is still the primary
    observe_failures(health, A, 3)
    rate_limit(health, B, 80.0)
    rate_limit(health, C, 40.0)
    assert plans(table, health, STRICT, 1) == [[A, C, B]]
    rate_limit(health, A, 90.0)  # now the worst: as a non-candidate it drops out of the plan
    assert plans(table, health, STRICT, 1) == [[C, B]]


def test_resolve_all_cooling_single_target_still_goes_out(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_failures(health, X, 5)
    assert not health.available(X)
    assert plans(table, health, LONELY, 1) == [[X]]


# --- SLA cutoff --------------------------------------------------------------------------------


def test_resolve_sla_within_cutoff_keeps_priority_order(
    table: RoutingTable, health: HealthTracker
) -> None:
    tpot(health, X, 0.04, 5)
    for plan in plans(table, health, SLA, 500):
        assert plan == [X, Y]


def test_resolve_sla_at_cutoff_is_still_healthy(table: RoutingTable, health: HealthTracker) -> None:
    tpot(health, X, 0.05)  # one sample: the mean is exactly the cutoff
    assert plans(table, health, SLA, 200) == [[X, Y]] * 200


def test_resolve_sla_unmeasured_target_is_healthy(
    table: RoutingTable, health: HealthTracker
) -> None:
    assert plans(table, health, SLA, 200) == [[X, Y]] * 200


def test_resolve_sla_over_cutoff_without_probes_is_never_primary(
    table: RoutingTable, health: HealthTracker
) -> None:
    tpot(health, X, 0.08, 5)
    for plan in plans(table, health, SLA, 2_000):
        assert plan == [Y, X]  # skipped, but kept as the last-resort fallback


def test_resolve_sla_over_cutoff_with_probe_ratio_one_is_always_primary(
    clock: FakeClock,
) -> None:
    table = make_table(1.0)
    health = health_tracker(table, clock)
    tpot(health, X, 0.08, 5)
    assert plans(table, health, SLA, 1_000) == [[X, Y]] * 1_000


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_resolve_sla_over_cutoff_gets_probe_share(clock: FakeClock, ratio: float) -> None:
    table = make_table(ratio)
    health = health_tracker(table, clock)
    tpot(health, X, 0.08, 5)
    plan_list = plans(table, health, SLA, 10_000)
    share = primaries(plan_list)[X] / 10_000
    assert abs(share - ratio) < 0.02
    assert all(plan in ([X, Y], [Y, X]) for plan in plan_list)


def test_resolve_sla_default_probe_share_is_small(clock: FakeClock) -> None:
    table = make_table()
    health = health_tracker(table, clock)
    tpot(health, X, 0.08, 5)
    share = primaries(plans(table, health, SLA, 20_000))[X] / 20_000
    assert abs(share - 0.05) < 0.01


def test_resolve_sla_recovers_when_slow_samples_age_out(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    tpot(health, X, 0.08, 5)
    clock.now += 9.0
    assert plans(table, health, SLA, 1) == [[Y, X]]
    clock.now += 1.0  # the 10 s window is empty now
    assert health.tpot(X, 10.0) == (None, 0)
    assert plans(table, health, SLA, 500) == [[X, Y]] * 500


def test_resolve_sla_recovers_when_fast_samples_lower_the_mean(
    table: RoutingTable, health: HealthTracker
) -> None:
    tpot(health, X, 0.08, 2)
    assert plans(table, health, SLA, 1) == [[Y, X]]
    tpot(health, X, 0.02, 3)  # mean 0.044: under the cutoff, healthy again
    assert plans(table, health, SLA, 300) == [[X, Y]] * 300
    tpot(health, X, 0.2, 1)  # mean 0.07: unhealthy again
    assert plans(table, health, SLA, 300) == [[Y, X]] * 300


def test_resolve_sla_recovers_through_probe_samples(clock: FakeClock) -> None:
    # The probe share keeps measuring: each probed request reports a fast TPOT, and the
    # target comes back without the slow samples having to age out.
    table = make_table(0.2)
    health = health_tracker(table, clock)
    rng = Random(3)
    tpot(health, X, 0.09, 3)
    probes = 0
    for _ in range(200):
        decision = table.resolve(SLA, "chat", rng, health)
        if decision.primary.key == X:
            probes += 1
            tpot(health, X, 0.01)
        mean, _ = health.tpot(X, 10.0)
        assert mean is not None
        if mean <= 0.05:
            break
    assert 1 <= probes <= 6
    assert plans(table, health, SLA, 200) == [[X, Y]] * 200


def test_resolve_sla_window_is_the_targets_own(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    tpot(health, X, 0.08, 5)
    clock.now += 10.0
    tpot(health, X, 0.03, 1)  # only the fresh sample is inside the 10 s window
    assert health.tpot(X, 10.0) == (pytest.approx(0.03), 1)
    assert plans(table, health, SLA, 100) == [[X, Y]] * 100


def test_resolve_sla_all_unhealthy_still_goes_out(
    table: RoutingTable, health: HealthTracker
) -> None:
    tpot(health, X, 0.5, 3)
    assert plans(table, health, LONELY, 50) == [[X]] * 50


def test_resolve_sla_and_cooldown_both_hold_a_target(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    tpot(health, X, 0.01, 3)  # fast, but cooling down
    observe_failures(health, X, 3)
    assert plans(table, health, SLA, 100) == [[Y, X]] * 100
    clock.now += 10.0
    assert plans(table, health, SLA, 100) == [[X, Y]] * 100
