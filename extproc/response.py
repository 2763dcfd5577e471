"""The client's response: its gateway headers, the answering attempt's body, the request's end.

This module owns what the gateway does with responses. The router-level filter sees requests only;
every response phase happens on the upstream-level stream of the attempt that answers:

* the values of the ``x-gateway-*`` response headers. They are written as dynamic metadata
  (``reply_fields``) at every step of a request, always saying what the client should read if
  Envoy answered on its own at that moment (a timeout, a refused connection: Envoy's local replies
  never pass through an ext_proc filter); the route renders them into whatever response goes out;
* how the answering attempt's body reaches the ext_proc (``body_mode``): streamed chunk by chunk
  for a successful stream, buffered otherwise;
* what is read from that body (``inspect``: served model, usage) and the OpenAI-shaped error that
  replaces a non-OpenAI error body;
* the report of the request once it is over (``finish``), and of the attempt Envoy gave up on
  without telling us when the request ends first (``settle_unanswered``).

Protobuf stays in ``envoy``; the streams that call this live in ``processor``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from extproc import envoy
from extproc.envoy_config import HEADER_ATTEMPTS, HEADER_SERVED_MODEL, HEADER_TARGET
from extproc.errors import error_body
from extproc.observe import ResponseFacts
from extproc.routing.attempts import FAILED_STATUS, AttemptPlan
from extproc.routing.model import Target
from extproc.sse import usage_of

if TYPE_CHECKING:
    from extproc.processor import RequestContext, Runtime


def _unanswered(plan: AttemptPlan) -> tuple[int, Target, str] | None:
    """The attempt an Envoy local reply right now would be about: (attempt, target, label).

    That is the latest attempt if it has no response yet (``timeout`` once it was released to the
    provider, else ``connect-error``), or else the attempt the plan still expects when it has not
    reached us (Envoy cancels a refused attempt's stream before we answer it). None once the plan
    is settled.
    """
    last = plan.last
    if last is not None and last.status is None:
        return last.attempt, last.target, "timeout" if last.sent else "connect-error"
    if plan.done:
        return None
    attempt = last.attempt + 1 if last is not None else 0
    if attempt >= len(plan.schedule):
        return None
    return attempt, plan.slots[plan.schedule[attempt]], "connect-error"


def reply_fields(plan: AttemptPlan) -> dict[str, str]:
    """``x-gateway-target``, ``-served-model`` and ``-attempts`` as the client should see them now.

    Once the plan is settled these are the facts; before, they describe the Envoy local reply that
    would end the request at this point (see ``_unanswered``).
    """
    records = plan.records
    attempts = plan.summary()
    target = records[-1].target if records else None
    pending = _unanswered(plan)
    if pending is not None:
        attempt, target, label = pending
        settled = records[:-1] if records and records[-1].attempt == attempt else records
        parts = [f"{r.target.key}:{r.label}" for r in settled]
        parts.append(f"{target.key}:{label}")
        attempts = ",".join(parts)
    if target is None:
        return {HEADER_ATTEMPTS: attempts}
    return {
        HEADER_TARGET: target.key,
        HEADER_SERVED_MODEL: target.model.upstream_model,
        HEADER_ATTEMPTS: attempts,
    }


def settle_unanswered(plan: AttemptPlan, now: float) -> None:
    """The request ended before its answer reached us: settle the attempt Envoy gave up on.

    It gets the label the client was shown (``reply_fields``) and counts as a 503.
    """
    pending = _unanswered(plan)
    if pending is None:
        return
    attempt, _, label = pending
    last = plan.last
    if last is not None and last.attempt == attempt:
        last.label = label
        last.status = FAILED_STATUS
    else:
        plan.failed_without_response(attempt, now, FAILED_STATUS)


def body_mode(context: RequestContext, status: int) -> int:
    """How the answering attempt's body comes to us.

    A successful stream chunk by chunk, never buffered (the client gets each chunk at once);
    anything else whole.
    """
    if context.stream and 200 <= status < 300:
        return envoy.BODY_STREAMED
    return envoy.BODY_BUFFERED


@dataclass(frozen=True, slots=True)
class Inspected:
    """What a buffered response body says."""

    served_model: str | None
    replacement: bytes | None
    """An OpenAI-shaped error body to send instead, or None to send the body unchanged."""
    prompt_tokens: int | None
    completion_tokens: int | None


def inspect(body: bytes, context: RequestContext) -> Inspected:
    """Read a buffered response once: served model, usage, and an OpenAI-shaped error if needed."""
    last = context.plan.last
    status = last.status if last is not None and last.status is not None else 200
    try:
        decoded = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        decoded = None
    prompt, completion, served = usage_of(decoded)
    replacement = None
    if status >= 400 and not (isinstance(decoded, dict) and isinstance(decoded.get("error"), dict)):
        target = last.target.key if last is not None else "upstream"
        text = body.decode("utf-8", "replace").strip()[:500] or "no body"
        replacement = error_body(f"{target} answered {status}: {text}", "upstream_error", status)
    return Inspected(served, replacement, prompt, completion)


def finish(
    runtime: Runtime,
    context: RequestContext,
    *,
    completed: bool,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    response_model: str | None = None,
) -> None:
    """Report the request once (its answer ended, or the request did) and re-stick its session.

    A streamed answer's tokens and first-token time come from its ``StreamObserver``.
    """
    context.finished = True
    observer = context.observer
    facts = ResponseFacts(
        completed=completed,
        ended_at=runtime.clock(),
        prompt_tokens=observer.prompt_tokens if observer else prompt_tokens,
        completion_tokens=observer.completion_tokens if observer else completion_tokens,
        first_token_at=observer.first_token_at if observer else None,
        response_model=response_model,
    )
    runtime.recorder.finished(context, facts)
    last = context.plan.last
    if (
        completed
        and context.sticky_session is not None
        and last is not None
        and last.status is not None
        and last.status < 400
    ):
        # The session (re)sticks to whichever target served it, with a fresh TTL.
        sticky = context.virtual_model.sticky
        assert sticky is not None
        runtime.spawn(runtime.sticky.set(context.sticky_session, last.target.key, sticky.ttl_s))
