"""Per-stream processing: what the router-level and upstream-level ext_proc streams do.

This module owns the meaning of each ext_proc phase. A client request opens one *router* stream
(request headers and body only) and one *upstream* stream per attempt (request headers, response
headers, and the answering attempt's response body). The router stream resolves the model and
writes the attempt plan; each upstream stream rewrites its attempt for its target, reports the
attempt's status back into the plan, and, for the attempt that answers the client, handles the
response (``response``). They share one ``RequestContext``, found through the
``io.vmrouter.request`` dynamic metadata that Envoy forwards to the upstream streams; the router
stream lasts until the request ends, and its end reports whatever the response did not. Protocol
mechanics (the stream loop, gRPC) live in ``servicer``; protobuf encoding lives in ``envoy``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from random import Random
from typing import Any
from urllib.parse import urlsplit

from extproc import envoy
from extproc.envoy_config import (
    HEADER_SERVED_MODEL,
    HEADER_VIRTUAL_MODEL,
    INTERNAL_HEADER_PREFIX,
    MAX_ATTEMPTS,
    METADATA_NS,
    PRIORITY_GROUP_NS,
    REQUEST_NS,
    RETRY_HEADER,
)
from extproc.errors import GatewayError, InvalidRequest, error_body
from extproc.health import HealthTracker, parse_retry_after
from extproc.observe import Recorder
from extproc.request import (
    EXPLAIN_HEADER,
    METADATA_HEADER,
    MODELS_PATH,
    check_content_type,
    last_user_text,
    operation_for,
    parse_body,
    parse_metadata_header,
    split_path,
    target_body,
    upstream_path,
    wants_usage_injection,
)
from extproc.response import body_mode, finish, inspect, reply_fields, settle_unanswered
from extproc.routing.attempts import AttemptPlan, Step, build_slots
from extproc.routing.explain import Explanation
from extproc.routing.model import Operation, Target
from extproc.routing.table import RequestFacts, RoutingDecision, RoutingTable, VirtualModel
from extproc.sse import StreamObserver
from extproc.state import MemoryStickyStore, RedisStickyStore, StickyStore
from extproc.sync import HealthSync
from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)


def models_list_body(table: RoutingTable) -> bytes:
    """The ``GET /v1/models`` answer: virtual models (by name and slug), then catalog models."""
    data: list[dict[str, Any]] = []
    for vm in table.virtual_models:
        data.append({"id": vm.name, "object": "model", "created": 0, "owned_by": "virtual"})
        if vm.slug:
            data.append({"id": vm.slug, "object": "model", "created": 0, "owned_by": "virtual"})
    for vm in table.catalog_models:
        owner = vm.targets[0].model.provider.name
        data.append({"id": vm.name, "object": "model", "created": 0, "owned_by": owner})
    return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()


class Runtime:
    """Process-wide state the streams share: the table, the health model, in-flight requests."""

    def __init__(
        self,
        table: RoutingTable,
        *,
        rng: Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        health: HealthTracker | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        """Start serving ``table``; ``rng``, ``clock``, health and telemetry are injectable."""
        self.rng = rng or Random()
        self.clock = clock
        self.requests: dict[str, RequestContext] = {}
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self.telemetry = telemetry or Telemetry(prometheus=False)
        self.health = health or HealthTracker(table.health_settings, clock=clock)
        self.recorder = Recorder(self.health, self.telemetry, clock)
        self.telemetry.watch_health(self._health_snapshot)
        self.table = table
        self.models_body = models_list_body(table)
        self.health.register_windows(table.tpot_windows)
        self.sticky: StickyStore = MemoryStickyStore(clock)
        self.sync: HealthSync | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start_shared_state(self) -> None:
        """Connect to Redis when the config's ``state.backend`` is redis (else nothing to do)."""
        state = self.table.state
        if state.backend != "redis" or self.sync is not None:
            return
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(
            state.url, socket_connect_timeout=0.2, socket_timeout=0.5, health_check_interval=5
        )
        self.sticky = RedisStickyStore(client, state.key_prefix, clock=self.clock)
        self.sync = HealthSync(client, lambda: self.health, state.key_prefix)
        self.health.listener = self.sync.publish
        self.sync.start()
        log.info("sharing sticky sessions and health through redis at %s", _redacted(state.url))

    async def close(self) -> None:
        """Stop background work and release connections."""
        if self.sync is not None:
            await self.sync.stop()
            self.sync = None
        await self.sticky.close()
        for task in list(self._background):
            task.cancel()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _health_snapshot(self) -> dict[str, tuple[bool, int, float]]:
        return self.health.snapshot()

    def swap(self, table: RoutingTable) -> None:
        """Serve a new table from the next request on; in-flight requests keep their decisions."""
        self.health.settings = table.health_settings
        self.health.register_windows(table.tpot_windows)
        self.models_body = models_list_body(table)
        self.table = table

    def reset_health(self) -> None:
        """Forget every target's health (an operator action; also used between tests)."""
        listener = self.health.listener
        self.health = HealthTracker(self.table.health_settings, clock=self.clock)
        self.health.register_windows(self.table.tpot_windows)
        self.health.listener = listener
        self.recorder.health = self.health

    def new_request_id(self) -> str:
        """A process-unique id for correlating the streams of one request."""
        return f"{self._id_prefix}-{next(self._ids)}"


@dataclass(slots=True)
class RequestContext:
    """Everything the streams of one client request share."""

    request_id: str
    decision: RoutingDecision
    body: dict[str, Any]
    upstream_suffix: str
    query: str
    client_headers: dict[str, str]
    stream: bool
    plan: AttemptPlan
    operation: Operation = "chat"
    managed_headers: frozenset[str] = field(default_factory=frozenset)
    """Header names any target sets or removes: restored from the client's request per attempt."""
    inject_usage: bool = False
    """The client streams without asking for usage: we ask upstream and strip the usage chunk."""
    span: Any = None
    """The request's trace span while it is open."""
    sticky_session: str | None = None
    """The session key when the virtual model is sticky and the request carries identifiers."""
    observer: StreamObserver | None = None
    """Reads the answering stream's chunks (first token, usage) while they pass."""
    answering: int | None = None
    """Envoy's attempt number whose response goes to the client, once that is decided."""
    finished: bool = False
    """Whether the request has been reported (``response.finish``)."""

    @property
    def virtual_model(self) -> VirtualModel:
        """The resolved virtual (or catalog) model."""
        return self.decision.virtual_model


def attempt_groups(plan: AttemptPlan) -> envoy.Metadata:
    """Dynamic metadata for the priority-group cluster specifier: attempt n goes to group n."""
    return {PRIORITY_GROUP_NS: envoy.priority_groups(tuple(plan.clusters()))}


def _error_response(exc: GatewayError) -> envoy.ProcessingResponse:
    return envoy.immediate_response(exc.http_status, exc.body(), details=f"vmrouter_{exc.code}")


class RouterStream:
    """The router-level filter's stream: resolve and plan; its end is the request's end."""

    def __init__(self, runtime: Runtime) -> None:
        """Bind to the shared runtime."""
        self.runtime = runtime
        self.headers: dict[str, str] = {}
        self.operation: Operation = "chat"
        self.suffix = ""
        self.query = ""
        self.context: RequestContext | None = None
        self.answered_locally = False

    def close(self) -> None:
        """The request ended: report what its response did not, then forget the request."""
        context = self.context
        if context is None:
            return
        if not context.finished:
            settle_unanswered(context.plan, self.runtime.clock())
            finish(self.runtime, context, completed=False)
        self.runtime.requests.pop(context.request_id, None)

    async def handle(self, request: envoy.ProcessingRequest) -> envoy.ProcessingResponse:
        """Answer one message of the router stream."""
        kind = request.WhichOneof("request")
        try:
            if self.answered_locally:
                # Our own immediate responses come back through the response path: pass them.
                return envoy.continue_response(kind or "request_headers")
            match kind:
                case "request_headers":
                    return self._request_headers(request.request_headers)
                case "request_body":
                    return await self._request_body(request.request_body)
                case _:
                    return envoy.continue_response(kind or "request_headers")
        except GatewayError as exc:
            self.answered_locally = True
            return _error_response(exc)

    def _request_headers(self, message: Any) -> envoy.ProcessingResponse:
        self.headers = envoy.decode_headers(message)
        path, self.query = split_path(self.headers.get(":path", "/"))
        method = self.headers.get(":method", "GET")
        if path == MODELS_PATH:
            if method != "GET":
                raise _MethodNotAllowed(f"Use GET for {MODELS_PATH}.")
            self.answered_locally = True
            return envoy.immediate_response(200, self.runtime.models_body)
        self.operation, self.suffix = operation_for(path)
        if method != "POST":
            raise _MethodNotAllowed(f"Use POST for {path}.")
        check_content_type(self.headers.get("content-type"))
        if message.end_of_stream:
            raise InvalidRequest("The request body is empty; expected a JSON object with 'model'.")
        spoofed = [h for h in self.headers if h.startswith(INTERNAL_HEADER_PREFIX)]
        return envoy.request_headers_response(remove_headers=spoofed or None)

    async def _request_body(self, message: Any) -> envoy.ProcessingResponse:
        body, model = parse_body(message.body)
        runtime = self.runtime
        table = runtime.table
        headers = self.headers
        metadata = parse_metadata_header(headers.get(METADATA_HEADER))
        metadata.update(table.gateway_metadata)
        vm = table.lookup(model)
        session = None
        sticky_target = None
        if vm is not None and vm.sticky is not None:
            identity = vm.sticky.session(headers, metadata)
            if identity is not None:
                session = f"{vm.name}|{identity}"
                sticky_target = await runtime.sticky.get(session)
        text = last_user_text(body) if vm is not None and len(vm.routes) > 1 else ""
        facts = RequestFacts(metadata=metadata, text=text, sticky_target=sticky_target)
        explanation = Explanation() if headers.get(EXPLAIN_HEADER, "") in ("1", "true") else None
        decision = table.resolve(
            model, self.operation, runtime.rng, runtime.health, facts, explanation
        )
        slots = build_slots(decision.plan, MAX_ATTEMPTS)
        request_id = runtime.new_request_id()
        managed: set[str] = {"authorization", METADATA_HEADER, EXPLAIN_HEADER}
        for target in decision.plan.members():  # no need to draw the order for this
            managed.update(name for name, _ in target.headers_set)
            managed.update(target.headers_remove)
        context = RequestContext(
            request_id=request_id,
            decision=decision,
            body=body,
            upstream_suffix=self.suffix,
            query=self.query,
            client_headers={
                k: v for k, v in headers.items() if not k.startswith(INTERNAL_HEADER_PREFIX)
            },
            stream=body.get("stream") is True,
            plan=AttemptPlan(
                slots=slots,
                timeout_s=min(
                    decision.virtual_model.attempt_timeout_ms, runtime.table.first_byte_timeout_ms
                )
                / 1000.0,
            ),
            operation=self.operation,
            managed_headers=frozenset(managed),
            inject_usage=wants_usage_injection(body, self.operation),
            sticky_session=session,
        )
        runtime.requests[request_id] = context
        self.context = context
        runtime.recorder.decided(context)
        reply = {HEADER_VIRTUAL_MODEL: decision.virtual_model.name, **reply_fields(context.plan)}
        if explanation is not None:
            reply[EXPLAIN_HEADER] = explanation.compact()
        return envoy.request_body_response(
            set_headers=[
                ("x-envoy-max-retries", str(len(slots) - 1)),
                (
                    "x-envoy-upstream-rq-per-try-timeout-ms",
                    str(decision.virtual_model.attempt_timeout_ms),
                ),
            ],
            clear_route_cache=True,
            dynamic_metadata={
                **attempt_groups(context.plan),
                REQUEST_NS: {"request_id": request_id},
                METADATA_NS: reply,
            },
        )


class _MethodNotAllowed(GatewayError):
    http_status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class UpstreamStream:
    """An upstream-level filter's stream: one attempt of one request, and its response.

    Envoy sends this filter only the headers in ``envoy_config.UPSTREAM_FORWARDED_HEADERS``
    (``forward_rules``): reading another one here needs it added there.
    """

    def __init__(self, runtime: Runtime) -> None:
        """Bind to the shared runtime."""
        self.runtime = runtime
        self.context: RequestContext | None = None
        self.attempt = -1
        self.answered_locally = False

    def close(self) -> None:
        """Nothing to release: the router stream owns the request context."""

    async def handle(self, request: envoy.ProcessingRequest) -> envoy.ProcessingResponse:
        """Answer one message of an attempt's stream."""
        kind = request.WhichOneof("request")
        if self.answered_locally:
            return envoy.continue_response(kind or "request_headers")
        match kind:
            case "request_headers":
                return await self._request_headers(request)
            case "response_headers":
                return self._response_headers(request.response_headers)
            case "response_body":
                return self._response_body(request.response_body)
            case _:
                return envoy.continue_response(kind or "request_headers")

    async def _request_headers(self, request: envoy.ProcessingRequest) -> envoy.ProcessingResponse:
        attempt_count = envoy.header_value(request.request_headers, "x-envoy-attempt-count")
        request_id = envoy.metadata_string(request, REQUEST_NS, "request_id")
        context = self.runtime.requests.get(request_id or "")
        if context is None:
            self.answered_locally = True
            return _error_response(
                _RoutingStateLost("The gateway lost track of this request; please retry.")
            )
        self.context = context
        try:
            self.attempt = int(attempt_count or "1") - 1
        except ValueError:
            self.attempt = 0
        plan = context.plan
        step, delay = plan.begin(self.attempt, self.runtime.clock())
        if step is Step.STOP:
            return self._plan_exhausted(context)
        target = plan.slots[plan.schedule[self.attempt]]
        if delay > 0:
            await asyncio.sleep(delay)
        context.plan.mark_sent(self.runtime.clock())
        self.runtime.health.started(target.key)
        self.runtime.recorder.settled_failures(context)
        body = target_body(context.body, target, include_usage=context.inject_usage)
        set_headers, remove_headers = _attempt_headers(context, target, first=self.attempt == 0)
        return envoy.request_headers_response(
            set_headers=set_headers,
            remove_headers=remove_headers,
            replace_body=body,
            dynamic_metadata={
                METADATA_NS: {"content_length": str(len(body)), **reply_fields(plan)}
            },
        )

    def _plan_exhausted(self, context: RequestContext) -> envoy.ProcessingResponse:
        """Envoy started an attempt the plan has no slot for: answer it locally.

        Envoy retries on its own after a refused connection, a reset or a timeout, even once the
        plan has ended; the client then gets the last failure. If the attempt whose response was
        going to the client broke off while we were reading its body (none of it had reached the
        client yet), the client gets a 504 when it ran out of time, else a 502.
        """
        self.answered_locally = True
        plan = context.plan
        last = plan.last
        if last is None:
            status, message = 503, "upstream failed (no attempt)"
        elif context.answering is not None:
            timed_out = plan.timed_out(last, self.runtime.clock())
            status = 504 if timed_out else 502
            how = "timed out" if timed_out else "broke off"
            message = f"{last.target.key} answered {last.label}, but its response {how}"
        else:
            status = last.status or 503
            message = f"{last.target.key} failed ({last.label})"
        return envoy.immediate_response(
            status,
            error_body(message, "upstream_error", status),
            details="vmrouter_plan_exhausted",
            dynamic_metadata={METADATA_NS: reply_fields(plan)},
        )

    def _response_headers(self, message: Any) -> envoy.ProcessingResponse:
        context = self.context
        if context is None:
            return envoy.response_headers_response()
        try:
            status = int(envoy.header_value(message, ":status") or "0")
        except ValueError:
            status = 502
        plan = context.plan
        again = plan.outcome(self.attempt, status)
        record = plan.last
        if record is not None and record.attempt == self.attempt:
            record.headers_at = self.runtime.clock()
            if status == 429:
                record.retry_after_s = parse_retry_after(envoy.header_value(message, "retry-after"))
        self.runtime.recorder.settled_failures(context)
        reply = {METADATA_NS: reply_fields(plan)}
        if again:
            return envoy.response_headers_response(
                set_headers=[(RETRY_HEADER, "1")],
                dynamic_metadata={**attempt_groups(plan), **reply},
            )
        # This response goes to the client (a provider's own x-vm-retry must not retry it).
        context.answering = self.attempt
        if message.end_of_stream:
            finish(self.runtime, context, completed=True)
            return envoy.response_headers_response(
                remove_headers=[RETRY_HEADER], dynamic_metadata=reply
            )
        mode = body_mode(context, status)
        remove = [RETRY_HEADER]
        if mode == envoy.BODY_STREAMED:
            # Chunks pass through us one by one: we note the first token and read the usage
            # chunk (and strip it if we asked for it), so Envoy must not keep a content-length.
            remove.append("content-length")
            context.observer = StreamObserver(strip_usage=context.inject_usage)
        return envoy.response_headers_response(
            remove_headers=remove, body_mode=mode, dynamic_metadata=reply
        )

    def _response_body(self, message: Any) -> envoy.ProcessingResponse:
        context = self.context
        if context is None or context.answering != self.attempt or context.finished:
            return envoy.response_body_response()
        observer = context.observer
        if observer is not None:
            replacement = observer.feed(bytes(message.body), self.runtime.clock())
            if message.end_of_stream:
                tail = observer.finish()
                if tail:
                    replacement = (replacement if replacement is not None else message.body) + tail
                finish(self.runtime, context, completed=True)
            return envoy.response_body_response(replace_body=replacement, streamed=True)
        if not message.end_of_stream:
            return envoy.response_body_response()
        inspected = inspect(bytes(message.body), context)
        served = inspected.served_model
        finish(
            self.runtime,
            context,
            completed=True,
            prompt_tokens=inspected.prompt_tokens,
            completion_tokens=inspected.completion_tokens,
            response_model=served,
        )
        return envoy.response_body_response(
            replace_body=inspected.replacement,
            dynamic_metadata={METADATA_NS: {HEADER_SERVED_MODEL: served}} if served else None,
        )


class _RoutingStateLost(GatewayError):
    http_status = 503
    error_type = "service_unavailable"
    code = "routing_state_lost"


def _attempt_headers(
    context: RequestContext, target: Target, *, first: bool = False
) -> tuple[list[tuple[str, str]], list[str]]:
    """Headers for one attempt, restored from the client's request before this target's overrides.

    Envoy keeps header changes from one attempt to the next, so every header any target of the
    plan touches is reset here to what the client sent (or removed) before applying this target's
    ``headers_override`` and credentials. The ``first`` attempt still carries the client's
    headers as they came (less our internal ones), so only real changes are sent for it.
    """
    provider = target.model.provider
    wanted: dict[str, str | None] = {
        name: context.client_headers.get(name) for name in context.managed_headers
    }
    wanted["authorization"] = None
    wanted[METADATA_HEADER] = None  # gateway-internal: never forwarded
    wanted[EXPLAIN_HEADER] = None
    wanted.update(dict.fromkeys(target.headers_remove))
    wanted.update(target.headers_set)
    if provider.auth_header is not None:
        wanted[provider.auth_header[0]] = provider.auth_header[1]
    set_headers: list[tuple[str, str]] = [
        (":path", upstream_path(target, context.upstream_suffix, context.query)),
        (":authority", provider.authority),
    ]
    remove_headers: list[str] = []
    client = context.client_headers
    for name, header_value in wanted.items():
        if first and client.get(name) == header_value:
            continue  # already so (absent, or the client's own value)
        if header_value is None:
            remove_headers.append(name)
        else:
            set_headers.append((name, header_value))
    return set_headers, remove_headers


def _redacted(url: str) -> str:
    """A Redis URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@")
