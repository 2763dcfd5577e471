"""The health model: failure cooldowns with backoff, Retry-After, and TPOT windows (fake clock)."""

from __future__ import annotations

import pytest

from extproc.health import HealthSettings, HealthTracker, Outcome, is_failure, parse_retry_after
from tests.unit.support import FakeClock

KEY = "prov/model"
OTHER = "prov/other"


SETTINGS = HealthSettings(
    consecutive_failures=3,
    failure_rate=0.5,
    failure_rate_min_requests=10,
    failure_window_s=60.0,
    cooldown_base_s=5.0,
    cooldown_max_s=300.0,
    retry_after_max_s=600.0,
)


def tracker(
    clock: FakeClock, settings: HealthSettings = SETTINGS, windows: tuple[float, ...] = ()
) -> HealthTracker:
    return HealthTracker(settings, clock=clock, windows=windows)


def fail(health: HealthTracker, key: str = KEY, status: int | None = 503, **kw: float) -> None:
    health.observe(Outcome(target=key, status=status, **kw))  # type: ignore[arg-type]


def succeed(health: HealthTracker, key: str = KEY, tpot_s: float | None = None) -> None:
    health.observe(Outcome(target=key, status=200, tpot_s=tpot_s))


def fail_n(health: HealthTracker, n: int, key: str = KEY) -> None:
    for _ in range(n):
        fail(health, key)


# --- failure classification --------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 404, 408, 429, 500, 502, 503, 504, 599, None])
def test_is_failure_counts_unusable_target_statuses(status: int | None) -> None:
    assert is_failure(status)


@pytest.mark.parametrize("status", [200, 201, 204, 301, 400, 413, 422])
def test_is_failure_ignores_success_and_client_errors(status: int) -> None:
    assert not is_failure(status)


def test_health_tracker_400_is_not_a_failure(clock: FakeClock) -> None:
    health = tracker(clock)
    fail_n(health, 2)
    for _ in range(5):
        health.observe(Outcome(target=KEY, status=400))
    # A client error says nothing bad about the target: it counts as a success.
    assert health.failures(KEY) == 0
    assert health.available(KEY)


@pytest.mark.parametrize("status", [401, 403, 404, 408, 429, 500, 503, None])
def test_health_tracker_failure_statuses_count_and_trip(
    clock: FakeClock, status: int | None
) -> None:
    health = tracker(clock)
    for expected in (1, 2):
        fail(health, status=status)
        assert health.failures(KEY) == expected
        assert health.available(KEY)
    fail(health, status=status)
    assert health.failures(KEY) == 3
    assert not health.available(KEY)
    assert health.cooldown_remaining(KEY) == pytest.approx(5.0)


# --- consecutive failures and backoff ----------------------------------------------------------


def test_health_tracker_unknown_target_is_available(clock: FakeClock) -> None:
    health = tracker(clock)
    assert health.available("nobody/knows")
    assert health.cooldown_remaining("nobody/knows") == 0.0
    assert health.failures("nobody/knows") == 0
    assert health.tpot("nobody/knows", 60.0) == (None, 0)
    assert health.snapshot() == {}


def test_health_tracker_consecutive_failures_trip_base_cooldown(clock: FakeClock) -> None:
    health = tracker(clock)
    fail_n(health, 2)
    assert health.available(KEY)
    assert health.cooldown_remaining(KEY) == 0.0
    fail(health)
    assert not health.available(KEY)
    assert health.cooldown_remaining(KEY) == pytest.approx(5.0)
    clock.now += 4.9
    assert not health.available(KEY)
    assert health.cooldown_remaining(KEY) == pytest.approx(0.1)
    clock.now += 0.1
    assert health.available(KEY)
    assert health.cooldown_remaining(KEY) == 0.0


def test_health_tracker_consecutive_threshold_comes_from_settings(clock: FakeClock) -> None:
    settings = HealthSettings(consecutive_failures=5, cooldown_base_s=7.0)
    health = tracker(clock, settings)
    fail_n(health, 4)
    assert health.available(KEY)
    fail(health)
    assert health.cooldown_remaining(KEY) == pytest.approx(7.0)


def test_health_tracker_success_resets_consecutive_failures(clock: FakeClock) -> None:
    health = tracker(clock)
    fail_n(health, 2)
    succeed(health)
    assert health.failures(KEY) == 0
    fail_n(health, 2)
    assert health.available(KEY)
    assert health.failures(KEY) == 2


def test_health_tracker_failure_after_cooldown_doubles_it(clock: FakeClock) -> None:
    health = tracker(clock)
    fail_n(health, 3)
    assert health.cooldown_remaining(KEY) == pytest.approx(5.0)
    for expected in (10.0, 20.0, 40.0, 80.0):
        clock.now += health.cooldown_remaining(KEY) + 1.0
        assert health.available(KEY)
        fail(health)  # a single failure re-trips: no success came in between
        assert not health.available(KEY)
        assert health.cooldown_remaining(KEY) == pytest.approx(expected)


def test_health_tracker_backoff_is_capped_at_cooldown_max(clock: FakeClock) -> None:
    settings = HealthSettings(cooldown_base_s=5.0, cooldown_max_s=30.0)
    health = tracker(clock, settings)
    fail_n(health, 3)
    seen = [health.cooldown_remaining(KEY)]
    for _ in range(6):
        clock.now += health.cooldown_remaining(KEY) + 1.0
        fail(health)
        seen.append(health.cooldown_remaining(KEY))
    assert seen == pytest.approx([5.0, 10.0, 20.0, 30.0, 30.0, 30.0, 30.0])


def test_health_tracker_success_between_cooldowns_resets_doubling(clock: FakeClock) -> None:
    health = tracker(clock)
    fail_n(health, 3)
    clock.now += 6.0
    fail(health)
    assert health.cooldown_remaining(KEY) == pytest.approx(10.0)
    clock.now += 11.0
    succeed(health)
    assert health.failures(KEY) == 0
    assert health.available(KEY)
    # After a success it takes a full run of consecutive failures again, and the base cooldown.
    fail_n(health, 2)
    assert health.available(KEY)
    fail(health)
    assert health.cooldown_remaining(KEY) == pytest.approx(5.0)


def test_health_tracker_targets_are_independent(clock: FakeClock) -> None:
    health = tracker(clock)
    fail_n(health, 3, KEY)
    fail(health, OTHER)
    assert not health.available(KEY)
    assert health.available(OTHER)
    assert health.failures(OTHER) == 1


# --- failure rate ------------------------------------------------------------------------------


def rate_settings() -> HealthSettings:
    return HealthSettings(
        consecutive_failures=100,
        failure_rate=0.5,
        failure_rate_min_requests=4,
        failure_window_s=60.0,
        cooldown_base_s=5.0,
    )


def test_health_tracker_failure_rate_trips_without_consecutive_failures(clock: FakeClock) -> None:
    health = tracker(clock, rate_settings())
    succeed(health)
    fail(health)
    succeed(health)
    assert health.available(KEY)
    assert health.failures(KEY) == 0
    fail(health)  # 2 failures out of 4 attempts: rate 0.5 >= 0.5 with 4 >= 4 attempts
    assert health.failures(KEY) == 1
    assert not health.available(KEY)
    assert health.cooldown_remaining(KEY) == pytest.approx(5.0)


def test_health_tracker_failure_rate_needs_min_requests(clock: FakeClock) -> None:
    health = tracker(clock, rate_settings())
    fail(health)
    succeed(health)
    fail(health)  # rate 2/3 but only 3 attempts in the window
    assert health.available(KEY)


def test_health_tracker_failure_rate_below_threshold_does_not_trip(clock: FakeClock) -> None:
    health = tracker(clock, rate_settings())
    for _ in range(3):
        succeed(health)
        succeed(health)
        fail(health)  # rate 1/3 at most
        assert health.available(KEY)


def test_health_tracker_failure_rate_window_expires_old_outcomes(clock: FakeClock) -> None:
    health = tracker(clock, rate_settings())
    fail(health)
    succeed(health)
    fail(health)
    clock.now += 60.0  # those three outcomes leave the 60 s window
    succeed(health)
    fail(health)
    succeed(health)
    assert health.available(KEY)  # 1 failure of 3 attempts in the window: no trip
    fail(health)  # 2 of 4 in the window now
    assert not health.available(KEY)


def test_health_tracker_failure_rate_counts_only_recent_attempts(clock: FakeClock) -> None:
    health = tracker(clock, rate_settings())
    for _ in range(3):
        succeed(health)
    clock.now += 61.0  # the successes expire; they must not dilute the new failures
    succeed(health)
    fail(health)
    succeed(health)
    assert health.available(KEY)
    fail(health)
    assert not health.available(KEY)


# --- Retry-After -------------------------------------------------------------------------------


def test_health_tracker_429_retry_after_cools_for_exactly_that_long(clock: FakeClock) -> None:
    health = tracker(clock)
    fail(health, status=429, retry_after_s=42.0)
    assert health.failures(KEY) == 1
    assert not health.available(KEY)
    assert health.cooldown_remaining(KEY) == pytest.approx(42.0)
    clock.now += 41.5
    assert not health.available(KEY)
    clock.now += 0.5
    assert health.available(KEY)


def test_health_tracker_429_retry_after_is_capped(clock: FakeClock) -> None:
    health = tracker(clock, HealthSettings(retry_after_max_s=120.0))
    fail(health, status=429, retry_after_s=3600.0)
    assert health.cooldown_remaining(KEY) == pytest.approx(120.0)


def test_health_tracker_429_retry_after_zero_does_not_cool(clock: FakeClock) -> None:
    health = tracker(clock)
    fail(health, status=429, retry_after_s=0.0)
    assert health.available(KEY)
    assert health.failures(KEY) == 1


def test_health_tracker_429_without_retry_after_is_an_ordinary_failure(clock: FakeClock) -> None:
    health = tracker(clock)
    fail(health, status=429)
    assert health.available(KEY)
    fail_n(health, 2)
    assert health.cooldown_remaining(KEY) == pytest.approx(5.0)


def test_health_tracker_retry_after_only_counts_on_429(clock: FakeClock) -> None:
    health = tracker(clock)
    fail(health, status=503, retry_after_s=42.0)
    assert health.available(KEY)


def test_health_tracker_retry_after_never_shortens_a_cooldown(clock: FakeClock) -> None:
    health = tracker(clock)
    fail(health, status=429, retry_after_s=100.0)
    clock.now += 10.0
    fail(health, status=429, retry_after_s=5.0)
    assert health.cooldown_remaining(KEY) == pytest.approx(90.0)


# --- TPOT windows ------------------------------------------------------------------------------


def test_health_tracker_tpot_samples_go_to_every_window(clock: FakeClock) -> None:
    health = tracker(clock, windows=(10.0, 60.0))
    succeed(health, tpot_s=0.02)
    succeed(health, tpot_s=0.04)
    for window in (10.0, 60.0):
        mean, count = health.tpot(KEY, window)
        assert count == 2
        assert mean == pytest.approx(0.03)
    assert health.tpot(KEY, 30.0) == (None, 0)  # a window nobody registered


def test_health_tracker_tpot_mean_is_over_the_window(clock: FakeClock) -> None:
    health = tracker(clock, windows=(10.0, 60.0))
    succeed(health, tpot_s=0.1)
    clock.now += 5.0
    succeed(health, tpot_s=0.2)
    clock.now += 6.0  # the first sample is 11 s old: outside 10 s, inside 60 s
    mean, count = health.tpot(KEY, 10.0)
    assert (mean, count) == (pytest.approx(0.2), 1)
    mean, count = health.tpot(KEY, 60.0)
    assert (mean, count) == (pytest.approx(0.15), 2)


def test_health_tracker_tpot_window_expires_completely(clock: FakeClock) -> None:
    health = tracker(clock, windows=(10.0,))
    for value in (0.1, 0.2, 0.3):
        succeed(health, tpot_s=value)
    assert health.tpot(KEY, 10.0) == (pytest.approx(0.2), 3)
    clock.now += 9.99
    assert health.tpot(KEY, 10.0)[1] == 3
    clock.now += 0.02
    assert health.tpot(KEY, 10.0) == (None, 0)
    succeed(health, tpot_s=0.5)  # a fresh sample starts a fresh mean
    assert health.tpot(KEY, 10.0) == (pytest.approx(0.5), 1)


def test_health_tracker_failures_and_missing_tpot_add_no_samples(clock: FakeClock) -> None:
    health = tracker(clock, windows=(10.0,))
    fail(health, tpot_s=0.5)
    succeed(health, tpot_s=None)
    succeed(health, tpot_s=-1.0)
    assert health.tpot(KEY, 10.0) == (None, 0)


def test_health_tracker_register_windows_extends_existing_targets(clock: FakeClock) -> None:
    health = tracker(clock, windows=(10.0,))
    succeed(health, tpot_s=0.1)
    assert health.tpot(KEY, 60.0) == (None, 0)
    health.register_windows([60.0, 10.0])
    succeed(health, tpot_s=0.3)
    assert health.tpot(KEY, 60.0) == (pytest.approx(0.3), 1)
    assert health.tpot(KEY, 10.0) == (pytest.approx(0.2), 2)  # the old window is untouched
    succeed(health, OTHER, tpot_s=0.4)  # and new targets get every window
    assert health.tpot(OTHER, 60.0) == (pytest.approx(0.4), 1)
    assert health.tpot(OTHER, 10.0) == (pytest.approx(0.4), 1)


# --- snapshot ----------------------------------------------------------------------------------


def test_health_tracker_snapshot_reports_every_known_target(clock: FakeClock) -> None:
    health = tracker(clock)
    succeed(health, OTHER)
    fail_n(health, 3, KEY)
    clock.now += 2.0
    snapshot = health.snapshot()
    assert set(snapshot) == {KEY, OTHER}
    assert snapshot[OTHER] == (True, 0, 0.0)
    available, failures, remaining = snapshot[KEY]
    assert (available, failures) == (False, 3)
    assert remaining == pytest.approx(3.0)
    clock.now += 3.0
    assert health.snapshot()[KEY] == (True, 3, 0.0)


# --- Retry-After parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("2.5", 2.5),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("", None),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("-1", None),
        ("inf", None),
        ("nan", None),
        ("soon", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected
