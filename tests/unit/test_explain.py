"""resolve(..., explain=Explanation()): what was considered, filtered, scored and planned."""

from __future__ import annotations

from random import Random

from extproc.health import HealthTracker
from extproc.routing.explain import Explanation
from extproc.routing.table import RequestFacts, RoutingTable
from tests.unit.support import (
    FakeClock,
    observe_failures,
    observe_tpot,
)

CONFIG = """
gateway:
  health:
    consecutive_failures: 3
    cooldown_seconds: 10
providers:
  - name: p
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: a}, {name: b}, {name: c}, {name: d}, {name: e}]
virtual_model_groups:
  - name: explain
    virtual_models:
      - name: weighted
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - {target: p/a, weight: 100, metadata_match: {region: EU}}
            - {target: p/e, weight: 100, metadata_match: {region: US}}
            - {target: p/b, weight: 50}
            - {target: p/c, weight: 30, fallback_candidate: false}
            - {target: p/d, weight: 20}
      - name: priority
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: p/a, priority: 0}
            - {target: p/b, priority: 0}
            - {target: p/c, priority: 1, fallback_candidate: false}
            - {target: p/d, priority: 2}
            - {target: p/e, priority: 0, metadata_match: {tier: gold}}
      - name: latency
        routing_config:
          type: latency-based-routing
          window_seconds: 100
          band: 1.2
          min_samples: 3
          load_balance_targets:
            - {target: p/a}
            - {target: p/b}
            - {target: p/c}
            - {target: p/d, fallback_candidate: false}
            - {target: p/e, metadata_match: {region: US}}
      - name: category
        routing_config:
          type: category-based-routing
          categories:
            - name: code
              keywords: [python]
              routing_config:
                type: priority-based-routing
                load_balance_targets:
                  - {target: p/a, priority: 0}
                  - {target: p/b, priority: 1, fallback_candidate: false}
                  - {target: p/c, priority: 2}
                  - {target: p/e, priority: 0, metadata_match: {region: US}}
            - name: default
              routing_config:
                type: weight-based-routing
                load_balance_targets:
                  - {target: p/d, weight: 100}
"""

A, B, C, D, E = "p/a", "p/b", "p/c", "p/d", "p/e"


def cool(health: HealthTracker, key: str) -> None:
    observe_failures(health, key, 3)
    assert not health.available(key)


def explain(
    table: RoutingTable,
    name: str,
    health: HealthTracker,
    metadata: dict[str, str] | None = None,
    text: str = "",
    seed: int = 1,
) -> tuple[Explanation, list[str]]:
    explanation = Explanation()
    facts = RequestFacts(metadata=metadata or {}, text=text)
    decision = table.resolve(name, "chat", Random(seed), health, facts, explanation)
    return explanation, [t.key for t in decision.plan]


def reasons(explanation: Explanation) -> dict[str, str]:
    return dict(explanation.filtered)


COOLING = "cooling down (10.0s left, 3 consecutive failures)"
NO_FALLBACK = "fallback_candidate: false (never a fallback)"


# --- weighted ----------------------------------------------------------------------------------


def test_explain_weighted_with_metadata_cooling_and_fallback_filters(
    table: RoutingTable, health: HealthTracker
) -> None:
    cool(health, D)
    explanation, plan = explain(table, "explain/weighted", health, {"region": "EU"})
    assert explanation.virtual_model == "explain/weighted"
    assert explanation.strategy == "weight-based-routing"
    assert explanation.category is None
    assert explanation.metadata == {"region": "EU"}
    assert explanation.candidates == [A, E, B, C, D]
    assert explanation.filtered == [
        (E, "metadata_match region=US does not match"),
        (D, COOLING),
        (C, NO_FALLBACK),
    ]
    assert explanation.pools == [("metadata match", [A]), ("unconditioned", [B, C])]
    # weights renormalised within each pool, over the eligible targets only (D's 20 is gone)
    assert explanation.scores == {
        A: "weight 100 = 100.0%",
        B: "weight 50 = 62.5%",
        C: "weight 30 = 37.5%",
    }
    assert plan == [A, B, D]
    assert explanation.plan == plan
    assert explanation.sticky == ""
    assert explanation.notes == []


def test_explain_weighted_without_metadata_drops_both_conditioned_targets(
    table: RoutingTable, health: HealthTracker
) -> None:
    explanation, plan = explain(table, "explain/weighted", health)
    assert explanation.filtered[:2] == [
        (A, "metadata_match region=EU does not match"),
        (E, "metadata_match region=US does not match"),
    ]
    assert explanation.pools == [("unconditioned", [B, C, D])]
    assert explanation.scores == {
        B: "weight 50 = 50.0%",
        C: "weight 30 = 30.0%",
        D: "weight 20 = 20.0%",
    }
    assert A not in plan
    assert E not in plan
    assert explanation.plan == plan


# --- priority ----------------------------------------------------------------------------------


def test_explain_priority_with_metadata_cooling_and_fallback_filters(
    table: RoutingTable, health: HealthTracker
) -> None:
    cool(health, B)
    explanation, plan = explain(table, "explain/priority", health, {"tier": "silver"})
    assert explanation.strategy == "priority-based-routing"
    assert explanation.candidates == [A, B, C, D, E]
    assert explanation.filtered == [
        (E, "metadata_match tier=gold does not match"),
        (B, COOLING),
        (C, NO_FALLBACK),
    ]
    assert explanation.pools == [("unconditioned", [A, C, D])]
    assert explanation.scores == {A: "priority 0", C: "priority 1", D: "priority 2"}
    assert plan == [A, D, B]
    assert explanation.plan == plan


def test_explain_priority_ties_and_matching_pool(
    table: RoutingTable, health: HealthTracker
) -> None:
    explanation, plan = explain(table, "explain/priority", health, {"tier": "gold"})
    assert explanation.pools == [("metadata match", [E]), ("unconditioned", [A, B, C, D])]
    assert explanation.scores == {
        E: "priority 0",
        A: "priority 0 (tied with 1 other)",
        B: "priority 0 (tied with 1 other)",
        C: "priority 1",
        D: "priority 2",
    }
    assert plan[0] == E
    assert sorted(plan[1:3]) == [A, B]
    assert plan[3:] == [D]
    assert explanation.filtered == [(C, NO_FALLBACK)]


# --- latency -----------------------------------------------------------------------------------


def test_explain_latency_with_metadata_cooling_and_fallback_filters(
    table: RoutingTable, health: HealthTracker
) -> None:
    observe_tpot(health, A, 0.020)
    observe_tpot(health, B, 0.050)
    observe_tpot(health, D, 0.100)
    cool(health, C)
    explanation, plan = explain(table, "explain/latency", health, {"region": "EU"})
    assert explanation.strategy == "latency-based-routing"
    assert explanation.filtered == [
        (E, "metadata_match region=US does not match"),
        (C, COOLING),
        (D, NO_FALLBACK),
    ]
    assert explanation.pools == [("unconditioned", [A, B, D])]
    assert explanation.scores == {
        A: "tpot 20.0 ms over 3 samples (in the 1.2x band)",
        B: "tpot 50.0 ms over 3 samples (outside the 1.2x band)",
        D: "tpot 100.0 ms over 3 samples (outside the 1.2x band)",
    }
    assert plan == [A, B, C]
    assert explanation.plan == plan


def test_explain_latency_exploring_targets(table: RoutingTable, health: HealthTracker) -> None:
    observe_tpot(health, A, 0.020, n=2)
    explanation, _ = explain(table, "explain/latency", health, {"region": "US"})
    assert explanation.pools == [("metadata match", [E]), ("unconditioned", [A, B, C, D])]
    assert explanation.scores[A] == "exploring (2 of 3 samples)"
    assert explanation.scores[E] == "exploring (0 of 3 samples)"


# --- category ----------------------------------------------------------------------------------


def test_explain_category_with_metadata_cooling_and_fallback_filters(
    table: RoutingTable, health: HealthTracker
) -> None:
    cool(health, A)
    explanation, plan = explain(
        table, "explain/category", health, {"region": "EU"}, text="Fix my Python script"
    )
    assert explanation.category == "code"
    assert explanation.category_reason == "keyword 'python'"
    assert explanation.strategy == "priority-based-routing"
    assert explanation.candidates == [A, B, C, E]  # only the category's targets
    assert explanation.filtered == [
        (E, "metadata_match region=US does not match"),
        (A, COOLING),
    ]
    assert explanation.pools == [("unconditioned", [B, C])]
    assert explanation.scores == {B: "priority 1", C: "priority 2"}
    # B (not a fallback candidate) is the primary: allowed, nothing dropped for it
    assert plan == [B, C, A]
    assert explanation.plan == plan


def test_explain_category_fallback_candidate_false_dropped_behind_primary(
    table: RoutingTable, health: HealthTracker
) -> None:
    explanation, plan = explain(table, "explain/category", health, {"region": "EU"}, text="python")
    assert plan == [A, C]
    assert explanation.filtered == [
        (E, "metadata_match region=US does not match"),
        (B, NO_FALLBACK),
    ]


def test_explain_category_default(table: RoutingTable, health: HealthTracker) -> None:
    explanation, plan = explain(table, "explain/category", health, text="hello")
    assert (explanation.category, explanation.category_reason) == ("default", "default")
    assert explanation.strategy == "weight-based-routing"
    assert explanation.candidates == [D]
    assert explanation.scores == {D: "weight 100 = 100.0%"}
    assert plan == [D]


# --- notes, sticky -----------------------------------------------------------------------------


def test_explain_every_target_cooling_notes_the_last_resort(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    cool(health, A)
    clock.now += 1
    cool(health, B)
    cool(health, C)
    cool(health, D)
    explanation, plan = explain(table, "explain/priority", health)
    assert explanation.notes == ["every target is unhealthy: trying the least bad one"]
    assert explanation.pools == [("unconditioned", [])]
    assert explanation.scores == {}
    assert plan[0] == A  # the shortest cooldown left
    assert reasons(explanation)[A] == "cooling down (9.0s left, 3 consecutive failures)"


def test_explain_does_not_change_the_decision(table: RoutingTable, health: HealthTracker) -> None:
    cool(health, D)
    for seed in range(20):
        _, explained = explain(table, "explain/weighted", health, {"region": "EU"}, seed=seed)
        facts = RequestFacts(metadata={"region": "EU"})
        plain = table.resolve("explain/weighted", "chat", Random(seed), health, facts)
        assert [t.key for t in plain.plan] == explained


# --- render and compact ------------------------------------------------------------------------


def full_explanation(table: RoutingTable, health: HealthTracker) -> Explanation:
    cool(health, A)
    explanation = Explanation()
    facts = RequestFacts(metadata={"region": "EU"}, text="python", sticky_target=C)
    table.resolve("explain/category", "chat", Random(1), health, facts, explanation)
    explanation.notes.append("a note")
    return explanation


def test_explain_render_contains_every_section(table: RoutingTable, health: HealthTracker) -> None:
    explanation = full_explanation(table, health)
    text = explanation.render()
    lines = text.splitlines()
    assert lines[0] == "virtual model: explain/category"
    assert lines[1] == "strategy:      priority-based-routing"
    assert "category:      code (keyword 'python')" in lines
    assert "metadata:      region=EU" in lines
    for section in ("candidates:", "filters:", "pools:", "scores:"):
        assert section in lines
    assert f"  - {E}: metadata_match region=US does not match" in lines
    assert f"  - {A}: {COOLING}" in lines
    assert f"  - {B}: {NO_FALLBACK}" in lines
    assert f"  - unconditioned: {B}, {C}" in lines
    assert f"  - {B}: priority 1" in lines
    assert f"  - {C}: priority 2" in lines
    assert f"sticky:        session stuck to {C}" in lines
    assert "note:          a note" in lines
    assert f"primary:       {C}" in lines
    assert f"fallbacks:     {A}" in lines
    for candidate in (A, B, C, E):
        assert f"  - {candidate}" in lines


def test_explain_render_minimal(table: RoutingTable, health: HealthTracker) -> None:
    explanation, _ = explain(table, "explain/category", health, text="hello")
    lines = explanation.render().splitlines()
    assert "filters:" in lines
    assert "  (none)" in lines
    assert "fallbacks:     (none)" in lines
    assert not any(line.startswith(("metadata:", "sticky:", "note:")) for line in lines)
    empty = Explanation().render()
    assert "primary:" not in empty


def test_explain_compact_is_one_printable_line(table: RoutingTable, health: HealthTracker) -> None:
    explanation = full_explanation(table, health)
    explanation.filtered.append((D, "über\nlong\treason"))
    line = explanation.compact()
    assert "\n" not in line
    assert all(32 <= ord(ch) < 127 for ch in line)
    assert line.startswith("strategy=priority-based-routing; category=code; ")
    assert f"filtered={E}(metadata_match region=US does not match)," in line
    assert f"scores={B}(priority 1),{C}(priority 2)" in line
    assert f"sticky=session stuck to {C}" in line
    assert line.endswith(f"plan={C},{A}")


def test_explain_compact_minimal_and_bounded() -> None:
    explanation = Explanation(strategy="round-robin-routing", plan=["p/a"])
    assert explanation.compact() == "strategy=round-robin-routing; plan=p/a"
    explanation.filtered = [(f"p/t{i}", "x" * 50) for i in range(200)]
    assert len(explanation.compact()) == 4000
