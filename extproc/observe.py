"""Reporting attempts: from attempt records to health outcomes, metrics and trace spans.

This module owns the translation of what the streams saw (statuses, times, token counts) into
``HealthTracker.observe`` calls and telemetry. Failed attempts are reported as soon as they are
settled; the attempt that answered the client is reported when its response ends (its tokens and
time per output token are known only then). Each attempt is reported exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import trace

from extproc import telemetry as names
from extproc.health import HealthTracker, Outcome, is_failure
from extproc.routing.attempts import AttemptRecord
from extproc.telemetry import Telemetry

if TYPE_CHECKING:
    from extproc.processor import RequestContext


@dataclass(frozen=True, slots=True)
class ResponseFacts:
    """What the router stream learned from the final response body."""

    completed: bool
    """Whether the response reached its end (False: the stream broke or the client left)."""
    ended_at: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: float | None = None
    response_model: str | None = None


def attempt_kind(records: list[AttemptRecord], index: int) -> str:
    """``primary`` for the first attempt, ``retry`` on the same target, else ``fallback``."""
    if index == 0:
        return "primary"
    return "retry" if records[index - 1].target is records[index].target else "fallback"


def time_per_output_token(
    duration_s: float, ttft_s: float | None, output_tokens: int | None
) -> float | None:
    """Streams: (duration - TTFT) / max(tokens - 1, 1); otherwise duration / max(tokens, 1)."""
    if not output_tokens or output_tokens <= 0:
        return None
    if ttft_s is not None:
        return max(duration_s - ttft_s, 0.0) / max(output_tokens - 1, 1)
    return duration_s / max(output_tokens, 1)


class Recorder:
    """Feeds the health model and telemetry from one runtime's requests."""

    def __init__(
        self, health: HealthTracker, telemetry: Telemetry, clock: Callable[[], float]
    ) -> None:
        """Report into ``health`` and ``telemetry``; times come from ``clock``."""
        self.health = health
        self.telemetry = telemetry
        self.clock = clock

    def decided(self, context: RequestContext) -> None:
        """Count the routing decision and open the request's span (when tracing)."""
        telemetry = self.telemetry
        vm = context.virtual_model.name
        telemetry.count_decision(vm, context.decision.primary.key)
        if not telemetry.tracing:
            return  # no tracer configured: no span work on the hot path
        span = telemetry.tracer.start_span(
            "vmrouter.request",
            attributes={
                names.VIRTUAL_MODEL: vm,
                names.OPERATION: names.OPERATION_NAMES[context.operation],
                "vmrouter.plan": ",".join(t.key for t in context.decision.plan),
            },
        )
        if span.is_recording():
            context.span = span

    def settled_failures(self, context: RequestContext) -> None:
        """Report every attempt whose failure is known and not yet reported."""
        records = context.plan.records
        for index, record in enumerate(records):
            if record.reported or record.status is None:
                continue
            failed = record.label in ("timeout", "connect-error") or is_failure(record.status)
            if failed:
                self._report(context, index, failed=True, facts=None)

    def finished(self, context: RequestContext, facts: ResponseFacts) -> None:
        """Report the remaining attempts once the request is over, and end its span."""
        self.settled_failures(context)
        records = context.plan.records
        for index, record in enumerate(records):
            if not record.reported:
                broken = not facts.completed and index == len(records) - 1
                self._report(context, index, failed=broken, facts=None if broken else facts)
        span = context.span
        if span is not None:
            last = context.plan.last
            if last is not None:
                span.set_attributes(
                    {names.TARGET: last.target.key, "vmrouter.attempts": context.plan.summary()}
                )
                if last.status is not None and last.status >= 400:
                    span.set_status(trace.StatusCode.ERROR)
            span.end()
            context.span = None

    def _report(
        self, context: RequestContext, index: int, *, failed: bool, facts: ResponseFacts | None
    ) -> None:
        record = context.plan.records[index]
        record.reported = True
        target = record.target
        if record.sent:
            self.health.ended(target.key)
        now = self.clock()
        started = record.sent_at if record.sent_at is not None else record.started
        ttfb = record.headers_at - started if record.headers_at is not None else None
        status = record.status
        if failed:
            end = record.headers_at if record.headers_at is not None else now
            duration = max(end - started, 0.0)
            if status is not None and status < 400:
                status = None  # a success that broke mid-response counts as no response
            outcome = Outcome(
                target=target.key,
                status=status if record.label not in ("timeout", "connect-error") else None,
                ttfb_s=ttfb,
                duration_s=duration,
                retry_after_s=record.retry_after_s,
            )
            self.health.observe(outcome)
            self._metrics(context, index, record, duration, None, None, None, None, error=True)
            return
        end = facts.ended_at if facts is not None else now
        duration = max(end - started, 0.0)
        ttft = (
            facts.first_token_at - started
            if facts is not None and facts.first_token_at is not None
            else None
        )
        completion = facts.completion_tokens if facts is not None else None
        tpot = None
        if context.operation != "embedding":
            tpot = time_per_output_token(duration, ttft, completion)
        self.health.observe(
            Outcome(
                target=target.key,
                status=status,
                ttfb_s=ttfb,
                duration_s=duration,
                output_tokens=completion,
                tpot_s=tpot,
                input_tokens=facts.prompt_tokens if facts is not None else None,
            )
        )
        prompt = facts.prompt_tokens if facts is not None else None
        model = facts.response_model if facts is not None else None
        self._metrics(context, index, record, duration, ttft, tpot, prompt, completion, model=model)

    def _metrics(
        self,
        context: RequestContext,
        index: int,
        record: AttemptRecord,
        duration: float,
        ttft: float | None,
        tpot: float | None,
        prompt: int | None,
        completion: int | None,
        *,
        error: bool = False,
        model: str | None = None,
    ) -> None:
        target = record.target
        kind = attempt_kind(context.plan.records, index)
        label = record.label or (str(record.status) if record.status is not None else "none")
        self.telemetry.record_attempt(
            context.virtual_model.name,
            target,
            context.operation,
            label,
            kind,
            duration,
            error=error,
            response_model=model,
            ttft=ttft,
            tpot=tpot,
            input_tokens=prompt,
            output_tokens=completion,
        )
        parent = context.span
        if parent is not None:
            ctx = trace.set_span_in_context(parent)
            start_ns = time.time_ns() - int(duration * 1e9)
            span = self.telemetry.tracer.start_span(
                "vmrouter.attempt",
                context=ctx,
                start_time=start_ns,
                attributes={
                    names.TARGET: target.key,
                    names.OUTCOME: label,
                    names.ATTEMPT_KIND: kind,
                    "vmrouter.attempt.index": index,
                    "vmrouter.attempt.duration_s": duration,
                },
            )
            if error:
                span.set_status(trace.StatusCode.ERROR)
            span.end()
