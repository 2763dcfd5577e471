"""The health model: what every attempt's outcome says about its target.

This module owns per-target state fed by ``observe`` (one ``Outcome`` per attempt): time-per-
output-token samples in sliding windows (for latency-based routing and SLA cutoffs), and failure
health (consecutive failures, failure rate, cooldown with exponential backoff, ``Retry-After``).
It is one component with an injected clock, shared by all strategies. It decides nothing about a
request: ``routing.table`` reads it through the ``HealthView`` protocol. State lives in memory in
one process.

Routing caches what it read from here (``routing.eligibility``), so the tracker says when that may
have changed: ``routing_stamp()`` returns two version numbers and the time. ``state_version``
changes whenever a target's cooldown or consecutive-failure count changes (availability and the
order of held targets); ``tpot_version`` whenever a time-per-output-token sample is added (SLA
cutoffs, latency ranking). Each change also records its number against the target
(``versions_of``), so a cache that sees a new global version can tell whether any of *its* targets
changed before recomputing. What changes with time alone, a cooldown ending or a sample leaving its
window, is not versioned: ``cooldown_until`` and ``tpot_expiry`` give the instants, and a cache
keeps the earliest one. Version numbers come from one process-wide counter, so two trackers (e.g.
after ``Runtime.reset_health``) never hand out the same stamp.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

FAILURE_STATUSES = frozenset({401, 403, 404, 408, 429})
"""Client-error statuses that still say the target is unusable (auth, missing model, rate limit)."""
MAX_SAMPLES = 50_000
"""Per target and window: a bound on memory under heavy traffic (oldest samples go first)."""

_VERSIONS = itertools.count(1)
"""Every version number any tracker hands out: unique in the process, so stamps never collide."""


def is_failure(status: int | None) -> bool:
    """Whether an attempt's status counts against its target's health (None: no response)."""
    return status is None or status >= 500 or status in FAILURE_STATUSES


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Failure-health tuning (``gateway.health`` in the config)."""

    consecutive_failures: int = 3
    """Consecutive failed attempts that put a target into cooldown."""
    failure_rate: float = 0.5
    """Failure share within ``failure_window_s`` that puts a target into cooldown..."""
    failure_rate_min_requests: int = 10
    """...once the window holds at least this many attempts."""
    failure_window_s: float = 60.0
    cooldown_base_s: float = 5.0
    """First cooldown; each further cooldown without a success in between doubles it."""
    cooldown_max_s: float = 300.0
    retry_after_max_s: float = 600.0
    """Cap on a cooldown taken from a 429's ``Retry-After``."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt on one target produced."""

    target: str
    status: int | None
    """HTTP status, or None when no response arrived (connection failure, timeout, reset)."""
    ttfb_s: float | None = None
    duration_s: float | None = None
    output_tokens: int | None = None
    tpot_s: float | None = None
    """Time per output token, when the attempt succeeded and produced tokens."""
    retry_after_s: float | None = None
    input_tokens: int | None = None


class _Window:
    """Samples within a sliding time window, with a running sum (amortised O(1) queries)."""

    __slots__ = ("length", "samples", "total")

    def __init__(self, length: float) -> None:
        self.length = length
        self.samples: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def add(self, now: float, value: float) -> None:
        self.samples.append((now, value))
        self.total += value
        if len(self.samples) > MAX_SAMPLES:
            self.total -= self.samples.popleft()[1]

    def expire(self, now: float) -> None:
        horizon = now - self.length
        samples = self.samples
        while samples and samples[0][0] <= horizon:
            self.total -= samples.popleft()[1]
        if not samples:
            self.total = 0.0

    def mean(self, now: float) -> tuple[float | None, int]:
        self.expire(now)
        count = len(self.samples)
        return (self.total / count if count else None), count

    def expiry(self) -> float:
        """When the oldest sample leaves the window (infinity when empty); call after ``expire``."""
        return self.samples[0][0] + self.length if self.samples else math.inf


@dataclass(slots=True)
class TargetHealth:
    """Everything known about one target."""

    tpot: dict[float, _Window] = field(default_factory=dict)
    tokens: dict[float, _Window] = field(default_factory=dict)
    """Input + output tokens per attempt (summed for lowest-usage routing)."""
    throughput: dict[float, _Window] = field(default_factory=dict)
    """Output tokens per second of each successful attempt."""
    outcomes: _Window | None = None
    """1.0 per failure, 0.0 per success, over the failure window."""
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    cooldown_level: int = 0
    last_failure: float = -math.inf
    in_flight: int = 0
    """Attempts released to the target and not yet finished (this process only)."""


class HealthTracker:
    """Per-target health, fed by attempt outcomes, read by routing."""

    def __init__(
        self,
        settings: HealthSettings | None = None,
        clock: Callable[[], float] | None = None,
        windows: Iterable[float] = (),
    ) -> None:
        """Track with ``settings``; ``windows`` are the TPOT window lengths (s) routing asks for."""
        import time

        self.settings = settings or HealthSettings()
        self.clock = clock or time.monotonic
        self._windows: set[float] = set(windows)
        self._targets: dict[str, TargetHealth] = {}
        self.listener: Callable[[Outcome], None] | None = None
        """Called with every locally observed outcome (replication to other replicas)."""
        self.state_version = next(_VERSIONS)
        """Changes whenever a target's cooldown or consecutive failures change."""
        self.tpot_version = next(_VERSIONS)
        """Changes whenever a time-per-output-token sample is added (or a window registered)."""
        self._state_versions: dict[str, int] = {}
        """Per target: the ``state_version`` of its last cooldown or failure-count change."""
        self._tpot_versions: dict[str, int] = {}
        """Per target: the ``tpot_version`` of its last TPOT sample."""

    def register_windows(self, windows: Iterable[float]) -> None:
        """Also keep TPOT samples for these window lengths (called when a config is compiled)."""
        new = set(windows) - self._windows
        if not new:
            return
        self._windows |= new
        self.tpot_version = version = next(_VERSIONS)
        for key, state in self._targets.items():
            self._tpot_versions[key] = version
            for length in new:
                state.tpot.setdefault(length, _Window(length))
                state.tokens.setdefault(length, _Window(length))
                state.throughput.setdefault(length, _Window(length))

    def _state(self, key: str) -> TargetHealth:
        state = self._targets.get(key)
        if state is None:
            state = TargetHealth(
                tpot={w: _Window(w) for w in self._windows},
                tokens={w: _Window(w) for w in self._windows},
                throughput={w: _Window(w) for w in self._windows},
                outcomes=_Window(self.settings.failure_window_s),
            )
            self._targets[key] = state
        return state

    def observe(self, outcome: Outcome, *, share: bool = True) -> None:
        """Fold one attempt's outcome into its target's state (``share``: tell the listener)."""
        if share and self.listener is not None:
            self.listener(outcome)
        now = self.clock()
        state = self._state(outcome.target)
        assert state.outcomes is not None
        used = (outcome.input_tokens or 0) + (outcome.output_tokens or 0)
        if used:
            for window in state.tokens.values():
                window.add(now, float(used))
        if is_failure(outcome.status):
            self._fail(state, now, outcome)
            # the failure count changed, maybe the cooldown
            self.state_version = self._state_versions[outcome.target] = next(_VERSIONS)
            return
        state.outcomes.add(now, 0.0)
        if state.consecutive_failures or state.cooldown_until:
            self.state_version = self._state_versions[outcome.target] = next(_VERSIONS)
        state.consecutive_failures = 0
        state.cooldown_level = 0
        state.cooldown_until = 0.0  # it answered: a last-resort success ends its cooldown
        if outcome.tpot_s is not None and outcome.tpot_s >= 0:
            for window in state.tpot.values():
                window.add(now, outcome.tpot_s)
            self.tpot_version = self._tpot_versions[outcome.target] = next(_VERSIONS)
        if outcome.output_tokens and outcome.duration_s and outcome.duration_s > 0:
            rate = outcome.output_tokens / outcome.duration_s
            for window in state.throughput.values():
                window.add(now, rate)

    def _fail(self, state: TargetHealth, now: float, outcome: Outcome) -> None:
        settings = self.settings
        assert state.outcomes is not None
        state.outcomes.add(now, 1.0)
        state.consecutive_failures += 1
        state.last_failure = now
        if outcome.status == 429 and outcome.retry_after_s is not None:
            until = now + min(max(outcome.retry_after_s, 0.0), settings.retry_after_max_s)
            state.cooldown_until = max(state.cooldown_until, until)
            return
        rate, count = state.outcomes.mean(now)
        tripped = state.consecutive_failures >= settings.consecutive_failures or (
            count >= settings.failure_rate_min_requests
            and rate is not None
            and rate >= settings.failure_rate
        )
        if tripped:
            length = min(
                settings.cooldown_base_s * (2**state.cooldown_level), settings.cooldown_max_s
            )
            state.cooldown_level += 1
            state.cooldown_until = max(state.cooldown_until, now + length)

    # --- what routing caches depend on --------------------------------------------------------

    def routing_stamp(self) -> tuple[int, int, float]:
        """``(state_version, tpot_version, now)``: what a routing cache checks before reuse."""
        return self.state_version, self.tpot_version, self.clock()

    def versions_of(self, keys: tuple[str, ...], tpot: bool) -> tuple[int | None, ...]:
        """Each target's last state (or, with ``tpot``, TPOT) version; None if it never changed."""
        versions = self._tpot_versions if tpot else self._state_versions
        return tuple(map(versions.get, keys))

    def cooldown_until(self, key: str) -> float:
        """The instant the target's cooldown ends (in the past, or 0, when it is available)."""
        state = self._targets.get(key)
        return state.cooldown_until if state is not None else 0.0

    def tpot_expiry(self, key: str, window_s: float) -> float:
        """When the oldest TPOT sample in the window leaves it (infinity without samples).

        Reads the window as ``tpot`` last left it: call ``tpot`` for the same window first.
        """
        state = self._targets.get(key)
        window = state.tpot.get(window_s) if state is not None else None
        return window.expiry() if window is not None else math.inf

    # --- the HealthView protocol -------------------------------------------------------------

    def cooldown_remaining(self, key: str) -> float:
        """Seconds until the target leaves cooldown (0 when it is available)."""
        state = self._targets.get(key)
        if state is None:
            return 0.0
        return max(0.0, state.cooldown_until - self.clock())

    def available(self, key: str) -> bool:
        """Whether the target is out of cooldown (``cooldown_remaining`` is 0)."""
        state = self._targets.get(key)
        return state is None or state.cooldown_until <= self.clock()

    def tpot(self, key: str, window_s: float) -> tuple[float | None, int]:
        """Mean time per output token (s) over the last ``window_s`` seconds, and sample count."""
        state = self._targets.get(key)
        if state is None:
            return None, 0
        window = state.tpot.get(window_s)
        if window is None:
            return None, 0
        return window.mean(self.clock())

    def tokens(self, key: str, window_s: float) -> float:
        """Input + output tokens the target used over the last ``window_s`` seconds."""
        state = self._targets.get(key)
        window = state.tokens.get(window_s) if state is not None else None
        if window is None:
            return 0.0
        window.expire(self.clock())
        return max(window.total, 0.0)

    def throughput(self, key: str, window_s: float) -> tuple[float | None, int]:
        """Mean output tokens per second over the window, and the number of samples."""
        state = self._targets.get(key)
        window = state.throughput.get(window_s) if state is not None else None
        if window is None:
            return None, 0
        return window.mean(self.clock())

    def in_flight(self, key: str) -> int:
        """Attempts released to the target and not finished yet."""
        state = self._targets.get(key)
        return state.in_flight if state is not None else 0

    def started(self, key: str) -> None:
        """An attempt was released to the target."""
        self._state(key).in_flight += 1

    def ended(self, key: str) -> None:
        """An attempt on the target finished (any outcome)."""
        state = self._state(key)
        state.in_flight = max(0, state.in_flight - 1)

    def failures(self, key: str) -> int:
        """Consecutive failures of the target."""
        state = self._targets.get(key)
        return state.consecutive_failures if state is not None else 0

    def snapshot(self) -> dict[str, tuple[bool, int, float]]:
        """For every known target: (available, consecutive failures, cooldown seconds left)."""
        now = self.clock()
        return {
            key: (
                state.cooldown_until <= now,
                state.consecutive_failures,
                max(0.0, state.cooldown_until - now),
            )
            for key, state in self._targets.items()
        }


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds; HTTP dates are ignored)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
