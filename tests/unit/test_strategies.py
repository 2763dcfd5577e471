"""The request-aware strategies with a real HealthTracker, a fake clock and seeded randomness."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from random import Random

import pytest

from extproc.config import parse_config
from extproc.errors import ConfigError
from extproc.health import HealthTracker, Outcome
from extproc.routing.least_busy import LeastBusyStrategy
from extproc.routing.lowest_price import LowestPriceStrategy, unit_price
from extproc.routing.lowest_usage import LowestUsageStrategy
from extproc.routing.round_robin import RoundRobinStrategy
from extproc.routing.table import RequestFacts, RoutingTable
from extproc.routing.throughput import HighestThroughputStrategy
from tests.unit.support import FakeClock, config_problems, observe_failures, table_from_yaml

CONFIG = """
gateway:
  health:
    consecutive_failures: 3
    cooldown_seconds: 10
providers:
  - name: p
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: a}, {name: b}, {name: c}, {name: d}]
  - name: shop
    type: openai-compatible
    base_url: http://127.0.0.1:8002/v1
    models:
      - {name: cheap, price: {input: 0.5, output: 1.5}}
      - {name: mid1, price: {input: 2, output: 4}}
      - {name: mid2, price: {input: 3, output: 3}}
      - {name: pricey, price: {input: 10, output: 30}}
virtual_model_groups:
  - name: strat
    virtual_models:
      - name: rr
        routing_config:
          type: round-robin-routing
          load_balance_targets: [{target: p/a}, {target: p/b}, {target: p/c}]
      - name: rr-pools
        routing_config:
          type: round-robin
          load_balance_targets:
            - {target: p/a, metadata_match: {region: EU}}
            - {target: p/b, metadata_match: {region: EU}}
            - {target: p/c}
            - {target: p/d}
      - name: busy
        routing_config:
          type: least-busy-routing
          load_balance_targets: [{target: p/a}, {target: p/b}, {target: p/c}]
      - name: usage
        routing_config:
          type: lowest-usage-routing
          window_seconds: 60
          load_balance_targets: [{target: p/a}, {target: p/b}, {target: p/c}]
      - name: price
        routing_config:
          type: lowest-price-routing
          load_balance_targets:
            - {target: shop/pricey}
            - {target: shop/mid1, weight: 75}
            - {target: shop/cheap}
            - {target: shop/mid2, weight: 25}
      - name: price-tie
        routing_config:
          type: lowest-price
          load_balance_targets:
            - {target: shop/mid1, weight: 75}
            - {target: shop/mid2, weight: 25}
            - {target: shop/pricey}
      - name: fast
        routing_config:
          type: highest-throughput-routing
          window_seconds: 100
          min_samples: 3
          load_balance_targets:
            - {target: p/a}
            - {target: p/b}
            - {target: p/c}
            - {target: p/d}
      - name: weighted
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - {target: p/a, weight: 50}
            - {target: p/b, weight: 30}
            - {target: p/c, weight: 20}
      - name: prio
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: p/a, priority: 0}
            - {target: p/b, priority: 0}
            - {target: p/c, priority: 1}
      - name: latency
        routing_config:
          type: latency-based-routing
          window_seconds: 100
          band: 1.2
          min_samples: 3
          load_balance_targets: [{target: p/a}, {target: p/b}, {target: p/c}]
"""

A, B, C, D = "p/a", "p/b", "p/c", "p/d"
CHEAP, MID1, MID2, PRICEY = "shop/cheap", "shop/mid1", "shop/mid2", "shop/pricey"


def plan(
    table: RoutingTable,
    name: str,
    rng: Random,
    health: HealthTracker,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    facts = RequestFacts(metadata=metadata or {})
    return [t.key for t in table.resolve(name, "chat", rng, health, facts).plan]


def used(health: HealthTracker, key: str, input_tokens: int, output_tokens: int) -> None:
    health.observe(
        Outcome(target=key, status=200, input_tokens=input_tokens, output_tokens=output_tokens)
    )


def produced(health: HealthTracker, key: str, tokens_per_s: float, n: int = 3) -> None:
    for _ in range(n):
        health.observe(
            Outcome(target=key, status=200, output_tokens=100, duration_s=100 / tokens_per_s)
        )


def scores(table: RoutingTable, name: str, health: HealthTracker) -> dict[str, str]:
    vm = table.lookup(name)
    assert vm is not None
    return vm.strategy.explain(vm.targets, health)


# --- build_strategy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "routing_type"),
    [
        ("strat/rr", RoundRobinStrategy, "round-robin-routing"),
        ("strat/rr-pools", RoundRobinStrategy, "round-robin"),
        ("strat/busy", LeastBusyStrategy, "least-busy-routing"),
        ("strat/usage", LowestUsageStrategy, "lowest-usage-routing"),
        ("strat/price", LowestPriceStrategy, "lowest-price-routing"),
        ("strat/price-tie", LowestPriceStrategy, "lowest-price"),
        ("strat/fast", HighestThroughputStrategy, "highest-throughput-routing"),
    ],
)
def test_build_strategy_new_types_and_aliases(
    table: RoutingTable, name: str, cls: type, routing_type: str
) -> None:
    vm = table.lookup(name)
    assert vm is not None
    assert isinstance(vm.strategy, cls)
    assert vm.routing_type == routing_type


def test_build_strategy_windows_reach_the_health_tracker(table: RoutingTable) -> None:
    assert {60.0, 100.0} <= set(table.tpot_windows)


# --- round-robin -------------------------------------------------------------------------------


def test_round_robin_rotates_over_targets_in_order(
    table: RoutingTable, health: HealthTracker
) -> None:
    rng = Random(1)
    plans = [plan(table, "strat/rr", rng, health) for _ in range(6)]
    assert plans == [[A, B, C], [B, C, A], [C, A, B], [A, B, C], [B, C, A], [C, A, B]]


def test_round_robin_is_not_random(table: RoutingTable, health: HealthTracker) -> None:
    other = table_from_yaml(CONFIG)
    first = [plan(table, "strat/rr", Random(1), health)[0] for _ in range(9)]
    second = [plan(other, "strat/rr", Random(99), health)[0] for _ in range(9)]
    assert first == second == [A, B, C] * 3


def test_round_robin_skips_a_cooling_target_and_continues_rotating(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    rng = Random(2)
    assert plan(table, "strat/rr", rng, health)[0] == A
    observe_failures(health, B, 3)
    assert not health.available(B)
    plans = [plan(table, "strat/rr", rng, health) for _ in range(8)]
    firsts = [p[0] for p in plans]
    assert B not in firsts
    # the rotation goes on over the two healthy targets: strictly alternating
    assert all(x != y for x, y in pairwise(firsts))
    assert Counter(firsts) == {A: 4, C: 4}
    # the cooling target stays as a last-resort fallback
    assert all(p[-1] == B for p in plans)
    clock.now += 11  # cooldown over
    firsts = [plan(table, "strat/rr", rng, health)[0] for _ in range(6)]
    assert Counter(firsts) == {A: 2, B: 2, C: 2}


def test_round_robin_rotates_within_metadata_pool(
    table: RoutingTable, health: HealthTracker
) -> None:
    # EU requests: {a, b} take precedence, {c, d} follow. Both pools must rotate per request.
    rng = Random(3)
    plans = [plan(table, "strat/rr-pools", rng, health, {"region": "EU"}) for _ in range(4)]
    assert all(sorted(p[:2]) == [A, B] and sorted(p[2:]) == [C, D] for p in plans)
    assert Counter(p[0] for p in plans) == {A: 2, B: 2}


def test_round_robin_explain_gives_each_target_its_position(
    table: RoutingTable, health: HealthTracker
) -> None:
    assert scores(table, "strat/rr", health) == {
        A: "position 0 of 3",
        B: "position 1 of 3",
        C: "position 2 of 3",
    }


def test_round_robin_order_of_no_targets_is_empty(health: HealthTracker) -> None:
    assert RoundRobinStrategy().order([], health, Random(1)) == []


# --- least-busy --------------------------------------------------------------------------------


def test_least_busy_prefers_fewest_in_flight(table: RoutingTable, health: HealthTracker) -> None:
    for _ in range(3):
        health.started(A)
    health.started(B)
    rng = Random(4)
    for _ in range(50):
        assert plan(table, "strat/busy", rng, health) == [C, B, A]


def test_least_busy_ended_attempts_free_the_target(
    table: RoutingTable, health: HealthTracker
) -> None:
    for key in (A, A, B, C, C):
        health.started(key)
    assert plan(table, "strat/busy", Random(5), health)[0] == B
    health.ended(A)
    health.ended(A)
    assert health.in_flight(A) == 0
    assert plan(table, "strat/busy", Random(5), health)[0] == A
    health.ended(A)  # never below zero
    assert health.in_flight(A) == 0


def test_least_busy_ties_are_random(table: RoutingTable, health: HealthTracker) -> None:
    rng = Random(6)
    firsts = Counter(plan(table, "strat/busy", rng, health)[0] for _ in range(3_000))
    assert set(firsts) == {A, B, C}
    assert all(900 < n < 1_100 for n in firsts.values())
    health.started(C)
    firsts = Counter(plan(table, "strat/busy", rng, health)[0] for _ in range(2_000))
    assert set(firsts) == {A, B}
    assert abs(firsts[A] - 1_000) < 100


def test_least_busy_explain_reports_in_flight(table: RoutingTable, health: HealthTracker) -> None:
    health.started(A)
    health.started(A)
    assert scores(table, "strat/busy", health) == {
        A: "2 in flight",
        B: "0 in flight",
        C: "0 in flight",
    }


# --- lowest-usage ------------------------------------------------------------------------------


def test_lowest_usage_prefers_fewest_tokens_in_window(
    table: RoutingTable, health: HealthTracker
) -> None:
    used(health, A, 1_000, 500)  # 1500
    used(health, B, 100, 100)  # 200
    used(health, C, 300, 0)
    used(health, C, 0, 300)  # 600
    rng = Random(7)
    for _ in range(50):
        assert plan(table, "strat/usage", rng, health) == [B, C, A]


def test_lowest_usage_counts_failed_attempts_tokens(
    table: RoutingTable, health: HealthTracker
) -> None:
    health.observe(Outcome(target=A, status=500, input_tokens=50))
    assert health.tokens(A, 60) == 50
    assert plan(table, "strat/usage", Random(8), health)[-1] == A


def test_lowest_usage_window_expiry_forgets_old_tokens(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    used(health, A, 5_000, 5_000)
    clock.now += 30
    used(health, B, 10, 10)
    assert plan(table, "strat/usage", Random(9), health) == [C, B, A]
    clock.now += 30  # A's tokens are exactly 60 s old: out of the window
    assert health.tokens(A, 60) == 0
    assert health.tokens(B, 60) == 20
    assert plan(table, "strat/usage", Random(9), health)[-1] == B
    clock.now += 31
    rng = Random(10)
    firsts = Counter(plan(table, "strat/usage", rng, health)[0] for _ in range(3_000))
    assert all(900 < n < 1_100 for n in firsts.values())


def test_lowest_usage_explain_reports_tokens_and_window(
    table: RoutingTable, health: HealthTracker
) -> None:
    used(health, A, 120, 30)
    assert scores(table, "strat/usage", health) == {
        A: "150 tokens in 60s",
        B: "0 tokens in 60s",
        C: "0 tokens in 60s",
    }


# --- lowest-price ------------------------------------------------------------------------------


def test_lowest_price_cheapest_first_and_most_expensive_last(
    table: RoutingTable, health: HealthTracker
) -> None:
    rng = Random(11)
    for _ in range(200):
        keys = plan(table, "strat/price", rng, health)
        assert keys[0] == CHEAP
        assert sorted(keys[1:3]) == [MID1, MID2]
        assert keys[3] == PRICEY


def test_lowest_price_equal_prices_drawn_by_weight(
    table: RoutingTable, health: HealthTracker
) -> None:
    vm = table.lookup("strat/price-tie")
    assert vm is not None
    assert {unit_price(t) for t in vm.targets if t.key != PRICEY} == {6.0}
    rng = Random(12)
    firsts: Counter[str] = Counter()
    for _ in range(8_000):
        keys = plan(table, "strat/price-tie", rng, health)
        assert keys[2] == PRICEY
        firsts[keys[0]] += 1
    assert 0.72 < firsts[MID1] / 8_000 < 0.78


def test_lowest_price_cooling_cheapest_goes_to_next_price(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_failures(health, CHEAP, 3)
    keys = plan(table, "strat/price", Random(13), health)
    assert keys[0] in (MID1, MID2)
    assert keys[-1] == CHEAP


def test_lowest_price_validation_requires_a_price_on_every_target() -> None:
    text = """
providers:
  - name: shop
    type: openai-compatible
    base_url: http://127.0.0.1:8002/v1
    models: [{name: cheap, price: {input: 1, output: 2}}, {name: free}]
virtual_model_groups:
  - name: strat
    virtual_models:
      - name: price
        routing_config:
          type: lowest-price-routing
          load_balance_targets: [{target: shop/cheap}, {target: shop/free}]
"""
    assert config_problems(text) == [
        "virtual_model_groups[0].virtual_models[0].routing_config.load_balance_targets[1].target:"
        " lowest-price routing needs a price on model 'shop/free'"
    ]
    # the short alias is checked too
    with pytest.raises(ConfigError):
        parse_config(text.replace("lowest-price-routing", "lowest-price"))
    # other strategies do not need a price
    parse_config(text.replace("lowest-price-routing", "round-robin-routing"))


def test_lowest_price_validation_rejects_negative_prices() -> None:
    text = """
providers:
  - name: shop
    type: openai-compatible
    base_url: http://127.0.0.1:8002/v1
    models: [{name: cheap, price: {input: -1, output: 2}}]
"""
    assert config_problems(text)[0].startswith("providers[0].models[0].price.input:")


def test_lowest_price_explain_reports_prices_and_weight(
    table: RoutingTable, health: HealthTracker
) -> None:
    assert scores(table, "strat/price", health) == {
        PRICEY: "10 in + 30 out per 1M tokens, weight 1",
        MID1: "2 in + 4 out per 1M tokens, weight 75",
        CHEAP: "0.5 in + 1.5 out per 1M tokens, weight 1",
        MID2: "3 in + 3 out per 1M tokens, weight 25",
    }


# --- highest-throughput ------------------------------------------------------------------------


def test_highest_throughput_unmeasured_first_then_descending_rate(
    table: RoutingTable, health: HealthTracker
) -> None:
    produced(health, A, 50)
    produced(health, B, 200)
    produced(health, C, 100, n=2)  # below min_samples: still being explored
    rng = Random(14)
    firsts: Counter[str] = Counter()
    for _ in range(1_000):
        keys = plan(table, "strat/fast", rng, health)
        assert sorted(keys[:2]) == [C, D]
        assert keys[2:] == [B, A]
        firsts[keys[0]] += 1
    assert abs(firsts[C] - 500) < 80


def test_highest_throughput_fastest_first_once_all_measured(
    table: RoutingTable, health: HealthTracker
) -> None:
    for key, rate in ((A, 10), (B, 40), (C, 30), (D, 20)):
        produced(health, key, rate)
    assert plan(table, "strat/fast", Random(15), health) == [B, C, D, A]


def test_highest_throughput_samples_expire(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    for key, rate in ((A, 10), (B, 40), (C, 30), (D, 20)):
        produced(health, key, rate)
    clock.now += 50
    produced(health, A, 1_000)
    clock.now += 50  # the first samples leave the 100 s window; A has only 3 fresh ones
    assert health.throughput(B, 100) == (None, 0)
    keys = plan(table, "strat/fast", Random(16), health)
    assert keys[-1] == A
    assert sorted(keys[:3]) == [B, C, D]


def test_highest_throughput_failures_and_missing_duration_are_not_samples(
    table: RoutingTable, health: HealthTracker
) -> None:
    health.observe(Outcome(target=A, status=500, output_tokens=100, duration_s=1.0))
    health.observe(Outcome(target=A, status=200, output_tokens=100))
    health.observe(Outcome(target=A, status=200, output_tokens=0, duration_s=1.0))
    assert health.throughput(A, 100) == (None, 0)


def test_highest_throughput_explain_reports_rate_or_exploring(
    table: RoutingTable, health: HealthTracker
) -> None:
    produced(health, A, 50)
    produced(health, B, 25, n=1)
    assert scores(table, "strat/fast", health) == {
        A: "50.0 tokens/s over 3 samples",
        B: "exploring (1 of 3 samples)",
        C: "exploring (0 of 3 samples)",
        D: "exploring (0 of 3 samples)",
    }


# --- explain() of the existing strategies ------------------------------------------------------


def test_weighted_explain_renormalises_over_eligible_targets(
    table: RoutingTable, health: HealthTracker
) -> None:
    assert scores(table, "strat/weighted", health) == {
        A: "weight 50 = 50.0%",
        B: "weight 30 = 30.0%",
        C: "weight 20 = 20.0%",
    }
    vm = table.lookup("strat/weighted")
    assert vm is not None
    eligible = [t for t in vm.targets if t.key != A]
    assert vm.strategy.explain(eligible, health) == {
        B: "weight 30 = 60.0%",
        C: "weight 20 = 40.0%",
    }


def test_priority_explain_reports_priority_and_ties(
    table: RoutingTable, health: HealthTracker
) -> None:
    assert scores(table, "strat/prio", health) == {
        A: "priority 0 (tied with 1 other)",
        B: "priority 0 (tied with 1 other)",
        C: "priority 1",
    }


def test_latency_explain_reports_tpot_band_or_exploring(
    table: RoutingTable, health: HealthTracker
) -> None:
    for _ in range(3):
        health.observe(Outcome(target=A, status=200, tpot_s=0.020, output_tokens=10))
        health.observe(Outcome(target=B, status=200, tpot_s=0.050, output_tokens=10))
    health.observe(Outcome(target=C, status=200, tpot_s=0.010, output_tokens=10))
    assert scores(table, "strat/latency", health) == {
        A: "tpot 20.0 ms over 3 samples (in the 1.2x band)",
        B: "tpot 50.0 ms over 3 samples (outside the 1.2x band)",
        C: "exploring (1 of 3 samples)",
    }


@pytest.mark.parametrize(
    "name",
    [
        "strat/rr",
        "strat/busy",
        "strat/usage",
        "strat/price",
        "strat/fast",
        "strat/weighted",
        "strat/prio",
        "strat/latency",
    ],
)
def test_every_strategy_explain_has_one_entry_per_target(
    table: RoutingTable, health: HealthTracker, name: str
) -> None:
    vm = table.lookup(name)
    assert vm is not None
    explained = vm.strategy.explain(vm.targets, health)
    assert list(explained) == [t.key for t in vm.targets]
    assert all(isinstance(v, str) and v for v in explained.values())
    assert vm.strategy.explain([], health) == {}


@pytest.mark.parametrize(
    "name",
    ["strat/rr", "strat/busy", "strat/usage", "strat/price", "strat/fast"],
)
def test_every_new_strategy_order_returns_each_target_once(
    table: RoutingTable, health: HealthTracker, name: str
) -> None:
    vm = table.lookup(name)
    assert vm is not None
    rng = Random(17)
    for _ in range(20):
        ordered = vm.strategy.order(vm.targets, health, rng)
        assert sorted(t.key for t in ordered) == sorted(t.key for t in vm.targets)


# --- config errors for the new routing types ---------------------------------------------------


@pytest.mark.parametrize(
    "routing_type",
    ["round-robin-routing", "round-robin", "highest-throughput-routing"],
)
def test_config_schema_error_path_has_no_routing_type_tag(routing_type: str) -> None:
    text = f"""
providers:
  - name: p
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{{name: a, price: {{input: 1, output: 1}}}}]
virtual_model_groups:
  - name: strat
    virtual_models:
      - name: vm
        routing_config:
          type: {routing_type}
          load_balance_targets: [{{target: p/a, bogus: 1}}]
"""
    assert config_problems(text) == [
        "virtual_model_groups[0].virtual_models[0].routing_config.load_balance_targets[0].bogus:"
        " unknown field"
    ]


def test_config_unknown_routing_type_lists_every_type() -> None:
    text = """
providers:
  - name: p
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: a}]
virtual_model_groups:
  - name: strat
    virtual_models:
      - name: vm
        routing_config:
          type: fastest-routing
          load_balance_targets: [{target: p/a}]
"""
    [problem] = config_problems(text)
    assert problem.startswith(
        "virtual_model_groups[0].virtual_models[0].routing_config: unknown routing type"
    )
    for name in (
        "weight-based-routing",
        "priority-based-routing",
        "latency-based-routing",
        "round-robin-routing",
        "least-busy-routing",
        "lowest-usage-routing",
        "lowest-price-routing",
        "highest-throughput-routing",
        "category-based-routing",
    ):
        assert name in problem
