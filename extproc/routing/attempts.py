"""The attempt plan of one request: which target each Envoy attempt goes to, and when to stop.

This module owns the retry and fallback semantics. A plan of targets becomes a list of *slots*,
one per allowed attempt (a target with ``retry_config.attempts: 2`` gets two adjacent slots), and a
*schedule* mapping Envoy's attempt number to a slot. The schedule starts as slot 0, 1, 2, ...
After each attempt its status decides the next slot: a retry code moves to the same target's next
slot; a fallback code (or a retry code once that target's slots are spent) jumps to the next
target's first slot; success or any other code ends the request. A jump rewrites the rest of the
schedule, which the upstream ext_proc hands back to Envoy's cluster specifier before the retry.
Pure logic: the caller supplies statuses and times.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc.routing.draw import Plan
from extproc.routing.model import Target

FAILED_STATUS = 503
"""Status a connection failure, reset or per-attempt timeout counts as."""
TIMEOUT_SHARE = 0.9
"""An unanswered attempt is a ``timeout`` once this share of its timeout had passed."""


class Step(enum.Enum):
    """What to do with the attempt Envoy is starting."""

    SEND = "send"
    """Rewrite for the scheduled target and let it go upstream."""
    STOP = "stop"
    """The plan is over: answer locally with the last failure (Envoy retried on its own)."""


@dataclass(slots=True)
class AttemptRecord:
    """One attempt that was sent (or that Envoy tried to send) to a target."""

    attempt: int
    """Envoy's attempt number, 0-based."""
    slot: int
    target: Target
    started: float
    status: int | None = None
    """The upstream status; ``None`` until a response arrived (or forever, if none did)."""
    label: str = ""
    """What ``x-gateway-attempts`` shows: the status, or ``connect-error``/``timeout``."""
    sent: bool = False
    """Whether the upstream ext_proc released the attempt to the provider."""
    sent_at: float | None = None
    headers_at: float | None = None
    """When the response headers arrived."""
    retry_after_s: float | None = None
    reported: bool = False
    """Whether health and telemetry have seen this attempt."""


def build_slots(plan: Sequence[Target], max_attempts: int) -> tuple[Target, ...]:
    """One slot per allowed attempt, target by target, capped at ``max_attempts``."""
    slots: list[Target] = []
    if isinstance(plan, Plan):
        # A plan drawn on demand draws only the targets whose slots are needed.
        plan = plan.head(max_attempts, _attempts)
    for target in plan:
        slots.extend([target] * target.retry.attempts)
        if len(slots) >= max_attempts:
            break
    return tuple(slots[:max_attempts])


def _attempts(target: Target) -> int:
    return target.retry.attempts


@dataclass(slots=True)
class AttemptPlan:
    """Mutable per-request cursor over the slots."""

    slots: tuple[Target, ...]
    schedule: list[int] = field(default_factory=list)
    """``schedule[n]`` is the slot Envoy's attempt ``n`` (0-based) goes to."""
    done: bool = False
    records: list[AttemptRecord] = field(default_factory=list)
    seen: int = -1
    """Highest attempt number Envoy has started that we know of."""
    timeout_s: float | None = None
    """The per-attempt timeout Envoy enforces (None: unknown, any released attempt timed out)."""

    def __post_init__(self) -> None:
        """Start with the optimistic schedule: every slot in order."""
        if not self.schedule:
            self.schedule = list(range(len(self.slots)))

    def clusters(self) -> list[str]:
        """The cluster of every scheduled attempt, in attempt order."""
        return [self.slots[s].model.provider.cluster for s in self.schedule]

    def begin(self, attempt: int, now: float) -> tuple[Step, float]:
        """Envoy starts ``attempt`` (0-based): return the step and a delay in seconds.

        Earlier attempts that never produced a response are settled here first, as 503s: one we
        released that went silent (``timeout``), and ones Envoy made that never reached us because
        the connection was refused before our stream opened (``connect-error``).
        """
        last = self.last
        if last is not None and last.status is None and last.attempt < attempt:
            last.label = self.unanswered_label(last, now)
            self._settle(last, FAILED_STATUS)
        for missing in range(self.seen + 1, attempt):
            if self.done or missing >= len(self.schedule):
                break
            self.failed_without_response(missing, now, FAILED_STATUS)
        self.seen = max(self.seen, attempt)
        if self.done or attempt >= len(self.schedule):
            self.done = True
            return Step.STOP, 0.0
        slot = self.schedule[attempt]
        target = self.slots[slot]
        previous = self.last
        delay = target.retry.delay_ms / 1000.0 if previous and previous.target is target else 0.0
        self.records.append(AttemptRecord(attempt=attempt, slot=slot, target=target, started=now))
        return Step.SEND, delay

    def unanswered_label(self, record: AttemptRecord, now: float) -> str:
        """``timeout`` or ``connect-error`` for an attempt that ended with no response.

        Envoy runs the upstream filter while it connects, so even an attempt whose connection was
        refused may have been released by us first: only the time it lasted tells them apart.
        """
        if not record.sent:
            return "connect-error"
        return "timeout" if self.timed_out(record, now) else "connect-error"

    def timed_out(self, record: AttemptRecord, now: float) -> bool:
        """Whether ``record`` has lasted long enough for Envoy's per-attempt timeout to end it."""
        if self.timeout_s is None:
            return True
        started = record.sent_at if record.sent_at is not None else record.started
        return now - started >= TIMEOUT_SHARE * self.timeout_s

    def failed_without_response(self, attempt: int, now: float, status: int) -> None:
        """Record that ``attempt`` failed before any response reached us (connection failure)."""
        if attempt >= len(self.schedule):
            return
        slot = self.schedule[attempt]
        record = AttemptRecord(
            attempt=attempt, slot=slot, target=self.slots[slot], started=now, label="connect-error"
        )
        self.records.append(record)
        self._settle(record, status)

    def mark_sent(self, now: float) -> None:
        """The current attempt left for the provider."""
        if self.records:
            self.records[-1].sent = True
            self.records[-1].sent_at = now

    def outcome(self, attempt: int, status: int) -> bool:
        """Record a response status for ``attempt``; return whether another attempt follows."""
        record = next((r for r in reversed(self.records) if r.attempt == attempt), None)
        if record is None or record.status is not None:
            return False
        record.label = str(status)
        return self._settle(record, status)

    def _settle(self, record: AttemptRecord, status: int) -> bool:
        record.status = status
        nxt = self._next_slot(record.slot, status)
        if nxt is None:
            self.done = True
            del self.schedule[record.attempt + 1 :]
            return False
        self.schedule[record.attempt + 1 :] = range(nxt, len(self.slots))
        return True

    def _next_slot(self, slot: int, status: int) -> int | None:
        if status < 400:
            return None
        target = self.slots[slot]
        if (
            status in target.retry.on_status
            and slot + 1 < len(self.slots)
            and self.slots[slot + 1] is target
        ):
            return slot + 1
        if status in target.fallback_status:
            return next(
                (i for i in range(slot + 1, len(self.slots)) if self.slots[i] is not target), None
            )
        return None

    @property
    def last(self) -> AttemptRecord | None:
        """The most recent attempt, if any."""
        return self.records[-1] if self.records else None

    def summary(self) -> str:
        """``target:label`` for every attempt, in order (the ``x-gateway-attempts`` value)."""
        return ",".join(f"{r.target.key}:{r.label or 'pending'}" for r in self.records)
