"""Shared helpers for the unit tests (imported by the test modules; not a test module itself).

- ``FakeClock``: a monotonic clock the test moves by hand.
- ``table_from_yaml``, ``config_problems`` and ``OPENAI_PROVIDER``: routing tables compiled from
  config YAML, and the problems config YAML is rejected with.
- ``health_tracker``, ``observe_failures``, ``observe_tpot``, ``plans``, ``primaries``: a real
  health model fed by hand, and what ``resolve`` plans with it.
- ``headers_message``, ``body_message``, ``client_headers``, ``SyncRouter``, ``start_attempt``,
  ``upstream_status``, ``upstream_body``, ``request_id_of``: real ext_proc protobuf messages
  for driving the router-level and upstream-level streams the way Envoy does (the router stream
  sees the request; each attempt's stream sees its response).

Fixtures stay in the test modules: each module compiles its own ``CONFIG`` into ``table``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Mapping
from random import Random

import pytest
from google.protobuf import json_format

from extproc._gen import ext_proc_pb2 as pb
from extproc.config import parse_config
from extproc.envoy_config import REQUEST_NS
from extproc.errors import ConfigError
from extproc.health import HealthTracker, Outcome
from extproc.processor import RouterStream, Runtime, UpstreamStream
from extproc.routing.table import RoutingTable, compile_table

# --- time --------------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand (``clock.now += 1``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- config and routing tables -----------------------------------------------------------------

OPENAI_PROVIDER = """
  - name: openai
    type: openai
    base_url: https://api.openai.com/v1
    api_key_env: TEST_OPENAI_KEY
    models:
      - {name: gpt-4o, model: gpt-4o-2024-08-06}
      - {name: embed, model: text-embedding-3-small, model_types: [embedding]}
"""
"""One ``providers:`` entry: OpenAI with a chat model and an embedding model (key from
``TEST_OPENAI_KEY``). Put it right after a ``providers:`` line."""


def table_from_yaml(text: str, environ: Mapping[str, str] | None = None) -> RoutingTable:
    """Parse and validate config YAML, then compile it into a routing table.

    Secrets are read from ``environ`` only, never from the process environment (none by default).
    """
    return compile_table(parse_config(text), environ={} if environ is None else environ)


def config_problems(text: str) -> list[str]:
    """The problems ``parse_config`` rejects config YAML ``text`` with (it must raise)."""
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.problems


# --- health ------------------------------------------------------------------------------------


def health_tracker(table: RoutingTable, clock: FakeClock) -> HealthTracker:
    """A real health tracker with ``table``'s health settings and TPOT windows, on ``clock``."""
    return HealthTracker(table.health_settings, clock=clock, windows=table.tpot_windows)


def observe_failures(health: HealthTracker, key: str, n: int = 1, status: int = 503) -> None:
    """Report ``n`` failed attempts (``status``, 503 by default) on the target ``key``."""
    for _ in range(n):
        health.observe(Outcome(target=key, status=status))


def observe_tpot(
    health: HealthTracker, key: str, tpot_s: float, n: int = 3, output_tokens: int = 10
) -> None:
    """Report ``n`` successful attempts on ``key``, each with a time per output token of
    ``tpot_s`` seconds (3 by default: the latency strategies' default ``min_samples``)."""
    for _ in range(n):
        health.observe(Outcome(target=key, status=200, tpot_s=tpot_s, output_tokens=output_tokens))


def plans(
    table: RoutingTable, health: HealthTracker, name: str, n: int, seed: int = 1
) -> list[list[str]]:
    """The target keys of ``n`` chat plans for the model ``name``, from one seeded generator."""
    rng = Random(seed)
    return [[t.key for t in table.resolve(name, "chat", rng, health).plan] for _ in range(n)]


def primaries(plan_list: list[list[str]]) -> Counter[str]:
    """How often each target comes first in ``plan_list``."""
    return Counter(plan[0] for plan in plan_list)


# --- ext_proc messages and streams -------------------------------------------------------------

CHAT_PATH = "/v1/chat/completions"


def headers_message(
    kind: str, headers: Iterable[tuple[str, str]], *, end_of_stream: bool = False
) -> pb.ProcessingRequest:
    """A ``request_headers``/``response_headers`` message; values in ``raw_value`` like Envoy."""
    request = pb.ProcessingRequest()
    message = getattr(request, kind)
    for key, value in headers:
        header = message.headers.headers.add()
        header.key = key
        header.raw_value = value.encode()
    message.end_of_stream = end_of_stream
    return request


def body_message(kind: str, body: bytes, *, end_of_stream: bool = True) -> pb.ProcessingRequest:
    """A ``request_body``/``response_body`` message."""
    request = pb.ProcessingRequest()
    message = getattr(request, kind)
    message.body = body
    message.end_of_stream = end_of_stream
    return request


def client_headers(
    path: str = CHAT_PATH,
    method: str = "POST",
    content_type: str | None = "application/json",
    extra: Iterable[tuple[str, str]] = (),
    *,
    authority: str | None = "gateway.local",
) -> list[tuple[str, str]]:
    """A client's request headers as Envoy passes them: pseudo-headers first, then the rest.

    ``content_type`` or ``authority`` None leaves that header out.
    """
    headers = [(":method", method), (":path", path)]
    if authority is not None:
        headers.append((":authority", authority))
    if content_type is not None:
        headers.append(("content-type", content_type))
    headers.extend(extra)
    return headers


_LOOP = asyncio.new_event_loop()


class SyncRouter(RouterStream):
    """A RouterStream driven synchronously: its ``handle`` is a coroutine."""

    def handle(self, request):  # type: ignore[no-untyped-def, override]
        return _LOOP.run_until_complete(RouterStream.handle(self, request))


def request_id_of(reply: pb.ProcessingResponse) -> str:
    """The request id the router stream wrote into the dynamic metadata it forwards upstream."""
    request_id = json_format.MessageToDict(reply.dynamic_metadata)[REQUEST_NS]["request_id"]
    assert isinstance(request_id, str)
    return request_id


def start_attempt(
    runtime: Runtime,
    request_id: str,
    count: int,
    extra: Iterable[tuple[str, str]] = (),
    path: str = CHAT_PATH,
) -> tuple[UpstreamStream, pb.ProcessingResponse]:
    """Open an upstream stream for Envoy's attempt ``count`` (1-based) and send its headers.

    Envoy forwards the router stream's request metadata to the upstream filter.
    """
    upstream = UpstreamStream(runtime)
    headers = [*client_headers(path, extra=extra), ("x-envoy-attempt-count", str(count))]
    message = headers_message("request_headers", headers)
    message.metadata_context.filter_metadata[REQUEST_NS].update({"request_id": request_id})
    reply = asyncio.run(upstream.handle(message))
    return upstream, reply


def upstream_status(
    upstream: UpstreamStream, status: int, *extra: tuple[str, str]
) -> pb.ProcessingResponse:
    """Send the upstream's response headers (``:status`` and ``extra``) to an upstream stream."""
    message = headers_message("response_headers", [(":status", str(status)), *extra])
    return asyncio.run(upstream.handle(message))


def upstream_body(
    upstream: UpstreamStream, body: bytes, *, end_of_stream: bool = True
) -> pb.ProcessingResponse:
    """Send a response body message (a whole buffered body, or one streamed chunk) upstream."""
    return asyncio.run(
        upstream.handle(body_message("response_body", body, end_of_stream=end_of_stream))
    )
