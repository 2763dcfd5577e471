"""The attempt plan of one request: which target each Envoy attempt goes to, and when to stop.

This module owns the retry and fallback semantics. A plan of targets becomes a fixed list of
*slots*, one per allowed attempt (a target with ``retry_config.attempts: 2`` gets two adjacent
slots). Envoy sends attempt *n* to slot *n*'s cluster. After each attempt the outcome decides the
next slot: a retry code moves to the same target's next slot; a fallback code (or a retry code once
that target's slots are spent) jumps to the next target's first slot; anything else ends the
request. Slots jumped over are answered locally by the upstream ext_proc and never reach a
provider. Pure logic: the caller supplies statuses and times.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from extproc.routing.model import Target

FAILED_STATUS = 503
"""Status a connection failure, reset or per-attempt timeout counts as."""


class Step(enum.Enum):
    """What to do with the attempt Envoy is starting."""

    SEND = "send"
    """Rewrite for the slot's target and let it go upstream."""
    SKIP = "skip"
    """Answer locally with a retriable failure so Envoy moves on to the next slot."""
    STOP = "stop"
    """The plan is over: answer locally with the last failure and do not retry."""


@dataclass(slots=True)
class AttemptRecord:
    """One attempt that was sent (or that Envoy tried to send) to a target."""

    slot: int
    target: Target
    started: float
    status: int | None = None
    """The upstream status; ``None`` until a response arrived (or forever, if none did)."""
    label: str = ""
    """What ``x-gateway-attempts`` shows: the status, or ``connect-error``/``timeout``/``reset``."""
    sent: bool = False
    """Whether the upstream ext_proc released the attempt to the provider."""


def build_slots(plan: tuple[Target, ...], max_attempts: int) -> tuple[Target, ...]:
    """One slot per allowed attempt, target by target, capped at ``max_attempts``."""
    slots: list[Target] = []
    for target in plan:
        slots.extend([target] * target.retry.attempts)
        if len(slots) >= max_attempts:
            break
    return tuple(slots[:max_attempts])


@dataclass(slots=True)
class AttemptPlan:
    """Mutable per-request cursor over the slots."""

    slots: tuple[Target, ...]
    next_slot: int = 0
    seen: int = -1
    """Highest slot Envoy has started that we know of."""
    done: bool = False
    records: list[AttemptRecord] = field(default_factory=list)

    def begin(self, slot: int, now: float) -> tuple[Step, float]:
        """Envoy starts attempt ``slot`` (0-based): return the step and a delay in seconds.

        Earlier attempts that never produced a response are settled here first, as 503s: one we
        released that went silent (``timeout``), and ones Envoy made that never reached us because
        the connection was refused before our stream opened (``connect-error``).
        """
        last = self.last
        if last is not None and last.status is None and last.slot < slot:
            last.label = "timeout" if last.sent else "connect-error"
            self._settle(last, FAILED_STATUS)
        for missing in range(self.seen + 1, min(slot, len(self.slots))):
            if self.done:
                break
            if missing >= self.next_slot:
                self.failed_without_response(missing, now, FAILED_STATUS)
        self.seen = max(self.seen, slot)
        if self.done or slot >= len(self.slots):
            self.done = True
            return Step.STOP, 0.0
        if slot < self.next_slot:
            return Step.SKIP, 0.0
        self.next_slot = slot
        target = self.slots[slot]
        delay = 0.0
        previous = self.last
        if previous is not None and previous.target is target:
            delay = target.retry.delay_ms / 1000.0
        self.records.append(AttemptRecord(slot=slot, target=target, started=now))
        return Step.SEND, delay

    def failed_without_response(self, slot: int, now: float, status: int) -> None:
        """Record an attempt on ``slot`` that failed before reaching the provider."""
        record = AttemptRecord(
            slot=slot, target=self.slots[slot], started=now, label="connect-error"
        )
        self.records.append(record)
        self._settle(record, status)

    def mark_sent(self) -> None:
        """The current attempt left for the provider."""
        if self.records:
            self.records[-1].sent = True

    def outcome(self, slot: int, status: int) -> bool:
        """Record a response status for ``slot``; return whether another attempt should follow."""
        record = next((r for r in reversed(self.records) if r.slot == slot), None)
        if record is None or record.status is not None:
            return False
        record.label = str(status)
        return self._settle(record, status)

    def _settle(self, record: AttemptRecord, status: int) -> bool:
        record.status = record.status if record.status is not None else status
        if status < 400:
            self.done = True
            return False
        target = record.target
        slot = record.slot
        if (
            status in target.retry.on_status
            and slot + 1 < len(self.slots)
            and self.slots[slot + 1] is target
        ):
            self.next_slot = slot + 1
            return True
        if status in target.fallback_status:
            following = next(
                (i for i in range(slot + 1, len(self.slots)) if self.slots[i] is not target), None
            )
            if following is not None:
                self.next_slot = following
                return True
        self.done = True
        return False

    @property
    def last(self) -> AttemptRecord | None:
        """The most recent attempt, if any."""
        return self.records[-1] if self.records else None

    def summary(self) -> str:
        """``target:label`` for every attempt, in order (the ``x-gateway-attempts`` value)."""
        return ",".join(f"{r.target.key}:{r.label or 'pending'}" for r in self.records)
