"""Per-stream processing: what the router-level and upstream-level ext_proc streams do.

This module owns the meaning of each ext_proc phase. A client request opens one *router* stream
(request headers and body, then the final response) and one *upstream* stream per attempt. The
router stream resolves the model and writes the attempt plan; each upstream stream rewrites its
attempt for its target and reports the attempt's status back into the plan. They share one
``RequestContext``, found through the ``io.vmrouter.request`` dynamic metadata that Envoy forwards
to the upstream streams. Protocol mechanics (the stream loop, gRPC) live in ``servicer``;
protobuf encoding lives in ``envoy``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random
from typing import Any

from extproc import envoy
from extproc.envoy_config import (
    INTERNAL_HEADER_PREFIX,
    MAX_ATTEMPTS,
    PRIORITY_GROUP_NS,
    REQUEST_NS,
    RETRY_HEADER,
)
from extproc.errors import GatewayError, InvalidRequest, error_body
from extproc.request import (
    MODELS_PATH,
    check_content_type,
    operation_for,
    parse_body,
    split_path,
    target_body,
    upstream_path,
)
from extproc.routing.attempts import AttemptPlan, Step, build_slots
from extproc.routing.model import Operation, Target
from extproc.routing.table import RoutingDecision, RoutingTable, VirtualModel

log = logging.getLogger(__name__)

HEADER_VIRTUAL_MODEL = "x-gateway-virtual-model"
HEADER_TARGET = "x-gateway-target"
HEADER_SERVED_MODEL = "x-gateway-served-model"
HEADER_ATTEMPTS = "x-gateway-attempts"
METADATA_NS = "io.vmrouter"


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
    """Process-wide state the streams share: the current table and the in-flight requests."""

    def __init__(
        self,
        table: RoutingTable,
        *,
        rng: Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start serving ``table``; ``rng`` and ``clock`` are injectable for tests."""
        self.rng = rng or Random()
        self.clock = clock
        self.requests: dict[str, RequestContext] = {}
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self.table = table
        self.models_body = models_list_body(table)

    def swap(self, table: RoutingTable) -> None:
        """Serve a new table from the next request on; in-flight requests keep their decisions."""
        self.models_body = models_list_body(table)
        self.table = table

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
    managed_headers: frozenset[str] = field(default_factory=frozenset)
    """Header names any target sets or removes: restored from the client's request per attempt."""

    @property
    def virtual_model(self) -> VirtualModel:
        """The resolved virtual (or catalog) model."""
        return self.decision.virtual_model


def attempt_groups(plan: AttemptPlan) -> dict[str, dict[str, Any]]:
    """Dynamic metadata for the priority-group cluster specifier: attempt n goes to group n."""
    groups = [
        {"name": f"a{i}", "clusters": [{"cluster_name": cluster, "weight": 1}]}
        for i, cluster in enumerate(plan.clusters())
    ]
    return {PRIORITY_GROUP_NS: {"priority_groups": groups}}


def _error_response(exc: GatewayError) -> envoy.ProcessingResponse:
    return envoy.immediate_response(exc.http_status, exc.body(), details=f"vmrouter_{exc.code}")


class RouterStream:
    """The router-level filter's stream: resolve, plan, then decorate the final response."""

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
        """Forget the request once its router stream ends."""
        if self.context is not None:
            self.runtime.requests.pop(self.context.request_id, None)

    def handle(self, request: envoy.ProcessingRequest) -> envoy.ProcessingResponse:
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
                    return self._request_body(request.request_body)
                case "response_headers":
                    return self._response_headers(request.response_headers)
                case "response_body":
                    return self._response_body(request.response_body)
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

    def _request_body(self, message: Any) -> envoy.ProcessingResponse:
        body, model = parse_body(message.body)
        runtime = self.runtime
        decision = runtime.table.resolve(model, self.operation, runtime.rng)
        slots = build_slots(decision.plan, MAX_ATTEMPTS)
        request_id = runtime.new_request_id()
        managed: set[str] = {"authorization"}
        for target in decision.plan:
            managed.update(name for name, _ in target.headers_set)
            managed.update(target.headers_remove)
        context = RequestContext(
            request_id=request_id,
            decision=decision,
            body=body,
            upstream_suffix=self.suffix,
            query=self.query,
            client_headers={
                k: v for k, v in self.headers.items() if not k.startswith(INTERNAL_HEADER_PREFIX)
            },
            stream=body.get("stream") is True,
            plan=AttemptPlan(slots=slots),
            managed_headers=frozenset(managed),
        )
        runtime.requests[request_id] = context
        self.context = context
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
            },
        )

    def _gateway_headers(self, context: RequestContext) -> list[tuple[str, str]]:
        headers = [(HEADER_VIRTUAL_MODEL, context.virtual_model.name)]
        last = context.plan.last
        if last is not None:
            headers.append((HEADER_TARGET, last.target.key))
            headers.append((HEADER_SERVED_MODEL, last.target.model.upstream_model))
        headers.append((HEADER_ATTEMPTS, context.plan.summary()))
        return headers

    def _response_headers(self, message: Any) -> envoy.ProcessingResponse:
        context = self.context
        if context is None:
            return envoy.response_headers_response()
        headers = envoy.decode_headers(message)
        status = int(headers.get(":status", "0") or 0)
        plan = context.plan
        last = plan.last
        if last is not None and last.status is None:
            # The final attempt got no response through the upstream filter: Envoy answered.
            last.label = "timeout" if last.sent else "connect-error"
            last.status = status
        elif last is not None and not plan.done and status >= 500:
            # The plan wanted another attempt that never reached us: its connection failed.
            plan.failed_without_response(last.attempt + 1, self.runtime.clock(), status)
        body_mode = None
        if (context.stream and 200 <= status < 300) or message.end_of_stream:
            body_mode = envoy.BODY_NONE
        return envoy.response_headers_response(
            set_headers=self._gateway_headers(context),
            remove_headers=[RETRY_HEADER],
            body_mode=body_mode,
        )

    def _response_body(self, message: Any) -> envoy.ProcessingResponse:
        context = self.context
        if context is None or not message.end_of_stream:
            return envoy.response_body_response()
        body = bytes(message.body)
        served, replacement = _inspect_response(body, context)
        set_headers = [(HEADER_SERVED_MODEL, served)] if served else None
        return envoy.response_body_response(set_headers=set_headers, replace_body=replacement)


def _inspect_response(body: bytes, context: RequestContext) -> tuple[str | None, bytes | None]:
    """The served model named by a buffered response, and an OpenAI-shaped error if needed."""
    last = context.plan.last
    status = last.status if last is not None and last.status is not None else 200
    try:
        decoded = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        decoded = None
    served = None
    if isinstance(decoded, dict) and isinstance(decoded.get("model"), str) and decoded["model"]:
        served = decoded["model"]
    if status < 400:
        return served, None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
        return served, None
    target = last.target.key if last is not None else "upstream"
    text = body.decode("utf-8", "replace").strip()[:500] or "no body"
    message = f"{target} answered {status}: {text}"
    return served, error_body(message, "upstream_error", status)


class _MethodNotAllowed(GatewayError):
    http_status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class UpstreamStream:
    """An upstream-level filter's stream: one attempt of one request."""

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
        if kind == "request_headers":
            return await self._request_headers(request)
        if kind == "response_headers":
            return self._response_headers(request.response_headers)
        return envoy.continue_response(kind or "request_headers")

    async def _request_headers(self, request: envoy.ProcessingRequest) -> envoy.ProcessingResponse:
        headers = envoy.decode_headers(request.request_headers)
        request_id = envoy.metadata_string(request, REQUEST_NS, "request_id")
        context = self.runtime.requests.get(request_id or "")
        if context is None:
            self.answered_locally = True
            return _error_response(
                _RoutingStateLost("The gateway lost track of this request; please retry.")
            )
        self.context = context
        try:
            self.attempt = int(headers.get("x-envoy-attempt-count", "1")) - 1
        except ValueError:
            self.attempt = 0
        plan = context.plan
        step, delay = plan.begin(self.attempt, self.runtime.clock())
        if step is Step.STOP:
            # Envoy retried on its own (a connection failure) after the plan ended.
            self.answered_locally = True
            last = plan.last
            status = last.status if last is not None and last.status else 503
            failed = last.target.key if last is not None else "upstream"
            label = last.label if last is not None else "no attempt"
            return envoy.immediate_response(
                status,
                error_body(f"{failed} failed ({label})", "upstream_error", status),
                details="vmrouter_plan_exhausted",
            )
        target = plan.slots[plan.schedule[self.attempt]]
        if delay > 0:
            await asyncio.sleep(delay)
        context.plan.mark_sent()
        body = target_body(context.body, target)
        set_headers, remove_headers = _attempt_headers(context, target)
        return envoy.request_headers_response(
            set_headers=set_headers,
            remove_headers=remove_headers,
            replace_body=body,
            dynamic_metadata={METADATA_NS: {"content_length": str(len(body))}},
        )

    def _response_headers(self, message: Any) -> envoy.ProcessingResponse:
        context = self.context
        if context is None:
            return envoy.response_headers_response()
        headers = envoy.decode_headers(message)
        try:
            status = int(headers.get(":status", "0"))
        except ValueError:
            status = 502
        plan = context.plan
        if not plan.outcome(self.attempt, status):
            return envoy.response_headers_response()
        return envoy.response_headers_response(
            set_headers=[(RETRY_HEADER, "1")], dynamic_metadata=attempt_groups(plan)
        )


class _RoutingStateLost(GatewayError):
    http_status = 503
    error_type = "service_unavailable"
    code = "routing_state_lost"


def _attempt_headers(
    context: RequestContext, target: Target
) -> tuple[list[tuple[str, str]], list[str]]:
    """Headers for one attempt, restored from the client's request before this target's overrides.

    Envoy keeps header changes from one attempt to the next, so every header any target of the
    plan touches is reset here to what the client sent (or removed) before applying this target's
    ``headers_override`` and credentials.
    """
    provider = target.model.provider
    wanted: dict[str, str | None] = {
        name: context.client_headers.get(name) for name in context.managed_headers
    }
    wanted["authorization"] = None
    wanted.update(dict.fromkeys(target.headers_remove))
    wanted.update(target.headers_set)
    if provider.auth_header is not None:
        wanted[provider.auth_header[0]] = provider.auth_header[1]
    set_headers: list[tuple[str, str]] = [
        (":path", upstream_path(target, context.upstream_suffix, context.query)),
        (":authority", provider.authority),
    ]
    remove_headers: list[str] = []
    for name, header_value in wanted.items():
        if header_value is None:
            remove_headers.append(name)
        else:
            set_headers.append((name, header_value))
    return set_headers, remove_headers
