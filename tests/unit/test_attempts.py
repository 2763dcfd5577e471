"""Retry and fallback semantics of one request's attempt plan (slots and schedule)."""

from __future__ import annotations

from random import Random

from extproc.routing.attempts import FAILED_STATUS, AttemptPlan, Step, build_slots
from extproc.routing.model import Target
from extproc.routing.table import RoutingTable
from tests.unit.support import table_from_yaml

PROVIDERS = """
providers:
  - name: pa
    type: openai-compatible
    base_url: http://a.internal/v1
    models: [{name: m}]
  - name: pb
    type: openai-compatible
    base_url: http://b.internal/v1
    models: [{name: m}]
  - name: pc
    type: openai-compatible
    base_url: http://c.internal/v1
    models: [{name: m}]
"""

CONFIG = (
    PROVIDERS
    + """
virtual_model_groups:
  - name: grp
    virtual_models:
      # Defaults everywhere: 2 attempts per target, 100 ms delay, retry 429/500/502/503,
      # fall back on 401/403/404/429/500/502/503.
      - name: defaults
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: pa/m, priority: 0}
            - {target: pb/m, priority: 1}
            - {target: pc/m, priority: 2}
      - name: uneven
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: pa/m, priority: 0, retry_config: {attempts: 3, delay: 250}}
            - {target: pb/m, priority: 1, retry_config: {attempts: 1}}
            - {target: pc/m, priority: 2, retry_config: {attempts: 4}}
      - name: single
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: pa/m, priority: 0, retry_config: {attempts: 1}}
            - {target: pb/m, priority: 1, retry_config: {attempts: 1}}
      - name: custom
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - target: pa/m
              priority: 0
              retry_config: {attempts: 2, delay: 0, on_status_codes: [500]}
              fallback_status_codes: [429]
            - target: pb/m
              priority: 1
              retry_config: {attempts: 2, delay: 40, on_status_codes: ["429"]}
              fallback_status_codes: [503]
            - {target: pc/m, priority: 2}
"""
)

CLUSTER_A = "provider_pa"
CLUSTER_B = "provider_pb"
CLUSTER_C = "provider_pc"


def _table() -> RoutingTable:
    return table_from_yaml(CONFIG)


def _plan_targets(name: str) -> tuple[Target, ...]:
    return _table().resolve(f"grp/{name}", "chat", Random(1)).plan


def _plan(name: str, max_attempts: int = 10) -> AttemptPlan:
    return AttemptPlan(slots=build_slots(_plan_targets(name), max_attempts))


def _keys(targets: tuple[Target, ...] | list[Target]) -> list[str]:
    return [t.key for t in targets]


def _send(plan: AttemptPlan, attempt: int, now: float = 0.0) -> float:
    """Begin ``attempt``, assert it goes upstream, mark it sent and return its delay."""
    step, delay = plan.begin(attempt, now)
    assert step is Step.SEND
    plan.mark_sent(0.0)
    return delay


# --- build_slots -------------------------------------------------------------------------------


def test_build_slots_repeats_each_target_retry_attempts_times() -> None:
    targets = _plan_targets("defaults")
    assert _keys(targets) == ["pa/m", "pb/m", "pc/m"]
    slots = build_slots(targets, 10)
    assert _keys(slots) == ["pa/m", "pa/m", "pb/m", "pb/m", "pc/m", "pc/m"]
    assert slots[0] is slots[1] is targets[0]
    assert slots[2] is slots[3] is targets[1]


def test_build_slots_honours_per_target_attempts() -> None:
    slots = build_slots(_plan_targets("uneven"), 10)
    assert _keys(slots) == ["pa/m"] * 3 + ["pb/m"] + ["pc/m"] * 4


def test_build_slots_caps_at_max_attempts() -> None:
    targets = _plan_targets("defaults")
    assert _keys(build_slots(targets, 4)) == ["pa/m", "pa/m", "pb/m", "pb/m"]
    assert _keys(build_slots(targets, 3)) == ["pa/m", "pa/m", "pb/m"]
    assert _keys(build_slots(targets, 1)) == ["pa/m"]
    assert _keys(build_slots(_plan_targets("uneven"), 5)) == ["pa/m"] * 3 + ["pb/m", "pc/m"]


def test_attempt_plan_starts_with_every_slot_in_order() -> None:
    plan = _plan("defaults")
    assert plan.schedule == [0, 1, 2, 3, 4, 5]
    assert plan.clusters() == [CLUSTER_A, CLUSTER_A, CLUSTER_B, CLUSTER_B, CLUSTER_C, CLUSTER_C]
    assert not plan.done
    assert plan.last is None
    assert plan.summary() == ""


# --- success and terminal codes ----------------------------------------------------------------


def test_attempt_plan_first_attempt_goes_to_first_slot_without_delay() -> None:
    plan = _plan("defaults")
    step, delay = plan.begin(0, 5.0)
    assert (step, delay) == (Step.SEND, 0.0)
    record = plan.last
    assert record is not None
    assert (record.attempt, record.slot, record.target.key, record.started) == (0, 0, "pa/m", 5.0)
    assert record.status is None
    assert not record.sent
    plan.mark_sent(0.0)
    assert record.sent
    assert plan.summary() == "pa/m:pending"


def test_attempt_plan_success_on_first_attempt_ends_and_truncates_schedule() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    assert plan.outcome(0, 200) is False
    assert plan.done
    assert plan.schedule == [0]
    assert plan.clusters() == [CLUSTER_A]
    assert plan.summary() == "pa/m:200"
    assert plan.begin(1, 1.0) == (Step.STOP, 0.0)


def test_attempt_plan_code_in_neither_list_ends_the_request() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    assert plan.outcome(0, 400) is False
    assert plan.done
    assert plan.schedule == [0]
    assert plan.begin(1, 1.0) == (Step.STOP, 0.0)
    assert plan.summary() == "pa/m:400"
    assert len(plan.records) == 1


def test_attempt_plan_outcome_is_recorded_once() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    assert plan.outcome(0, 503) is True
    assert plan.outcome(0, 200) is False
    assert plan.records[0].status == 503
    assert not plan.done


def test_attempt_plan_outcome_for_unknown_attempt_is_ignored() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    assert plan.outcome(3, 503) is False
    assert plan.records[0].status is None
    assert plan.schedule == [0, 1, 2, 3, 4, 5]


# --- retries -----------------------------------------------------------------------------------


def test_attempt_plan_retry_code_moves_to_same_target_next_slot() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    assert plan.outcome(0, 503) is True
    assert plan.schedule == [0, 1, 2, 3, 4, 5]
    assert not plan.done
    step, delay = plan.begin(1, 1.0)
    assert step is Step.SEND
    assert delay == 0.1
    assert plan.last is not None
    assert (plan.last.slot, plan.last.target.key) == (1, "pa/m")


def test_attempt_plan_retry_delay_is_the_target_delay_in_seconds() -> None:
    plan = _plan("uneven")
    _send(plan, 0)
    assert plan.outcome(0, 429) is True
    assert _send(plan, 1) == 0.25
    assert plan.outcome(1, 502) is True
    assert _send(plan, 2) == 0.25
    assert plan.summary() == "pa/m:429,pa/m:502,pa/m:pending"


def test_attempt_plan_retry_code_after_slots_spent_falls_back_to_next_target() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    assert plan.outcome(0, 500) is True
    _send(plan, 1)
    assert plan.outcome(1, 500) is True
    assert plan.schedule == [0, 1, 2, 3, 4, 5]
    delay = _send(plan, 2)
    assert delay == 0.0  # a new target: no retry delay
    assert plan.last is not None
    assert (plan.last.slot, plan.last.target.key) == (2, "pb/m")
    assert plan.outcome(2, 200) is False
    assert plan.done
    assert plan.schedule == [0, 1, 2]
    assert plan.summary() == "pa/m:500,pa/m:500,pb/m:200"


def test_attempt_plan_fallback_only_code_jumps_to_next_target() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    assert plan.outcome(0, 401) is True  # 401 falls back but is not a retry code
    assert plan.schedule == [0, 2, 3, 4, 5]
    assert plan.clusters() == [CLUSTER_A, CLUSTER_B, CLUSTER_B, CLUSTER_C, CLUSTER_C]
    assert _send(plan, 1) == 0.0
    assert plan.last is not None
    assert (plan.last.attempt, plan.last.slot, plan.last.target.key) == (1, 2, "pb/m")


def test_attempt_plan_rewrites_schedule_on_every_jump() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    plan.outcome(0, 403)
    _send(plan, 1)  # pb/m, slot 2
    plan.outcome(1, 404)
    assert plan.schedule == [0, 2, 4, 5]
    assert plan.clusters() == [CLUSTER_A, CLUSTER_B, CLUSTER_C, CLUSTER_C]
    _send(plan, 2)
    assert plan.last is not None
    assert plan.last.target.key == "pc/m"
    assert plan.summary() == "pa/m:403,pb/m:404,pc/m:pending"


def test_attempt_plan_fallback_code_on_last_target_ends() -> None:
    plan = _plan("single")
    assert _keys(plan.slots) == ["pa/m", "pb/m"]
    _send(plan, 0)
    assert plan.outcome(0, 503) is True
    _send(plan, 1)
    assert plan.outcome(1, 503) is False
    assert plan.done
    assert plan.schedule == [0, 1]
    assert plan.begin(2, 2.0) == (Step.STOP, 0.0)


def test_attempt_plan_retry_code_on_last_slot_of_last_target_ends() -> None:
    plan = _plan("defaults")
    for attempt in range(5):
        _send(plan, attempt)
        assert plan.outcome(attempt, 429) is True
    _send(plan, 5)
    assert plan.outcome(5, 429) is False
    assert plan.done
    assert plan.summary() == ",".join(["pa/m:429"] * 2 + ["pb/m:429"] * 2 + ["pc/m:429"] * 2)


def test_attempt_plan_fallback_skips_slots_cut_by_max_attempts() -> None:
    plan = AttemptPlan(slots=build_slots(_plan_targets("defaults"), 3))
    assert plan.clusters() == [CLUSTER_A, CLUSTER_A, CLUSTER_B]
    _send(plan, 0)
    assert plan.outcome(0, 401) is True
    assert plan.schedule == [0, 2]
    _send(plan, 1)
    assert plan.outcome(1, 503) is False  # pb/m has no second slot and no target follows
    assert plan.done


def test_attempt_plan_begin_beyond_schedule_stops() -> None:
    plan = _plan("single")
    assert plan.begin(2, 0.0) == (Step.STOP, 0.0)
    assert plan.done


def test_attempt_plan_begin_beyond_rewritten_schedule_stops() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    plan.outcome(0, 401)
    assert len(plan.schedule) == 5
    assert plan.begin(5, 1.0) == (Step.STOP, 0.0)
    # the gap attempts 1..4 were settled as connection failures, exhausting the plan
    assert plan.done
    assert plan.summary() == (
        "pa/m:401,pb/m:connect-error,pb/m:connect-error,pc/m:connect-error,pc/m:connect-error"
    )


# --- attempts with no response -----------------------------------------------------------------


def test_attempt_plan_silent_sent_attempt_is_settled_as_timeout() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    step, delay = plan.begin(1, 30.0)
    first = plan.records[0]
    assert first.label == "timeout"
    assert first.status == FAILED_STATUS == 503
    assert step is Step.SEND
    assert delay == 0.1  # a timeout is retried on the same target like a 503
    assert plan.last is not None
    assert (plan.last.attempt, plan.last.slot) == (1, 1)
    assert plan.summary() == "pa/m:timeout,pa/m:pending"


def test_attempt_plan_unsent_attempt_without_response_is_connect_error() -> None:
    plan = _plan("defaults")
    assert plan.begin(0, 0.0)[0] is Step.SEND  # begun but never released (no mark_sent)
    plan.begin(1, 1.0)
    assert plan.records[0].label == "connect-error"
    assert plan.records[0].status == 503


def test_attempt_plan_attempts_that_never_reached_us_are_connect_errors() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    assert plan.outcome(0, 503) is True
    step, delay = plan.begin(2, 7.0)  # Envoy's attempt 1 was refused before our stream opened
    assert step is Step.SEND
    gap = plan.records[1]
    assert (gap.attempt, gap.slot, gap.target.key) == (1, 1, "pa/m")
    assert (gap.label, gap.status, gap.started, gap.sent) == ("connect-error", 503, 7.0, False)
    # pa/m's slots are spent by the gap and 503 falls back: attempt 2 goes to pb/m
    assert plan.last is not None
    assert (plan.last.attempt, plan.last.slot, plan.last.target.key) == (2, 2, "pb/m")
    assert delay == 0.0
    assert plan.summary() == "pa/m:503,pa/m:connect-error,pb/m:pending"


def test_attempt_plan_outcome_less_gap_is_timeout_then_connect_error() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    step, _ = plan.begin(2, 3.0)
    assert step is Step.SEND
    assert [(r.attempt, r.label) for r in plan.records] == [
        (0, "timeout"),
        (1, "connect-error"),
        (2, ""),
    ]
    assert plan.summary() == "pa/m:timeout,pa/m:connect-error,pb/m:pending"


def test_attempt_plan_first_attempt_that_never_reached_us_is_connect_error() -> None:
    plan = _plan("defaults")
    step, delay = plan.begin(1, 0.0)
    assert step is Step.SEND
    assert plan.summary() == "pa/m:connect-error,pa/m:pending"
    assert delay == 0.1


def test_attempt_plan_gap_after_terminal_code_stops() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    plan.outcome(0, 400)
    assert plan.begin(2, 1.0) == (Step.STOP, 0.0)
    assert plan.summary() == "pa/m:400"


def test_attempt_plan_failed_without_response_beyond_schedule_is_ignored() -> None:
    plan = _plan("single")
    plan.failed_without_response(5, 0.0, 503)
    assert plan.records == []


# --- summary -----------------------------------------------------------------------------------


def test_attempt_plan_summary_lists_target_and_label_in_order() -> None:
    plan = _plan("defaults")
    _send(plan, 0)
    plan.outcome(0, 429)
    _send(plan, 1)
    plan.outcome(1, 502)
    _send(plan, 2)
    plan.outcome(2, 200)
    assert plan.summary() == "pa/m:429,pa/m:502,pb/m:200"


# --- per-target status lists -------------------------------------------------------------------


def test_attempt_plan_custom_codes_fallback_not_in_retry_list_jumps() -> None:
    plan = _plan("custom")
    assert _keys(plan.slots) == ["pa/m", "pa/m", "pb/m", "pb/m", "pc/m", "pc/m"]
    _send(plan, 0)
    assert plan.outcome(0, 429) is True  # pa/m retries only 500; 429 is its fallback code
    assert plan.schedule == [0, 2, 3, 4, 5]
    _send(plan, 1)
    assert plan.last is not None
    assert plan.last.target.key == "pb/m"
    assert plan.outcome(1, 429) is True  # pb/m retries 429
    assert plan.schedule == [0, 2, 3, 4, 5]
    assert _send(plan, 2) == 0.04
    assert plan.last.target.key == "pb/m"
    assert plan.last.slot == 3


def test_attempt_plan_custom_codes_retry_only_listed_status() -> None:
    plan = _plan("custom")
    _send(plan, 0)
    assert plan.outcome(0, 500) is True  # pa/m retries 500
    assert plan.schedule == [0, 1, 2, 3, 4, 5]
    assert _send(plan, 1) == 0.0  # pa/m's delay is 0
    assert plan.last is not None
    assert plan.last.slot == 1
    # slots spent; 500 is not in pa/m's fallback list (only 429): the request ends
    assert plan.outcome(1, 500) is False
    assert plan.done
    assert plan.schedule == [0, 1]


def test_attempt_plan_custom_codes_default_code_not_listed_ends() -> None:
    plan = _plan("custom")
    _send(plan, 0)
    assert plan.outcome(0, 503) is False  # a default code, but pa/m lists neither
    assert plan.done


def test_attempt_plan_custom_codes_second_target_uses_its_own_lists() -> None:
    plan = _plan("custom")
    _send(plan, 0)
    plan.outcome(0, 429)
    _send(plan, 1)  # pb/m, slot 2
    assert plan.outcome(1, 503) is True  # pb/m: 503 is not a retry code, it falls back
    assert plan.schedule == [0, 2, 4, 5]
    _send(plan, 2)
    assert plan.last is not None
    assert plan.last.target.key == "pc/m"
    assert plan.outcome(2, 500) is True  # pc/m has the defaults: 500 retries
    assert plan.schedule == [0, 2, 4, 5]


def test_attempt_plan_custom_codes_second_target_ends_on_unlisted_code() -> None:
    plan = _plan("custom")
    _send(plan, 0)
    plan.outcome(0, 429)
    _send(plan, 1)
    assert plan.outcome(1, 500) is False  # pb/m neither retries nor falls back on 500
    assert plan.done
    assert plan.schedule == [0, 2]
    assert plan.clusters() == [CLUSTER_A, CLUSTER_B]


def test_unanswered_attempt_label_tells_a_refused_connection_from_a_timeout() -> None:
    # Envoy runs the upstream filter while it connects: an attempt we released can still have
    # had its connection refused. Only how long it lasted tells the two apart.
    plan = AttemptPlan(slots=build_slots(_plan_targets("defaults"), 10), timeout_s=2.0)
    plan.begin(0, 100.0)
    assert plan.unanswered_label(plan.records[-1], 100.5) == "connect-error"  # never released
    plan.mark_sent(100.0)
    assert plan.unanswered_label(plan.records[-1], 100.01) == "connect-error"
    assert plan.unanswered_label(plan.records[-1], 101.7) == "connect-error"
    assert plan.unanswered_label(plan.records[-1], 101.81) == "timeout"  # past 90% of 2 s
    plan.begin(1, 100.02)  # Envoy's retry settles attempt 0 as it was: a quick failure
    assert plan.records[0].label == "connect-error"
    assert plan.records[0].status == FAILED_STATUS
    plan.mark_sent(100.02)
    plan.begin(2, 102.5)
    assert plan.records[1].label == "timeout"


def test_unanswered_attempt_label_without_a_known_timeout_calls_a_released_one_timeout() -> None:
    plan = _plan("defaults")
    plan.begin(0, 100.0)
    plan.mark_sent(100.0)
    assert plan.unanswered_label(plan.records[-1], 100.001) == "timeout"
