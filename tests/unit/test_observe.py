"""Attempt reporting: TPOT, health outcomes and GenAI metrics for requests driven end to end."""

from __future__ import annotations

import asyncio
import json
from random import Random
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.envoy_config import REQUEST_NS
from extproc.metrics_http import PROMETHEUS_CONTENT_TYPE, start_metrics_server
from extproc.observe import attempt_kind, time_per_output_token
from extproc.processor import RouterStream, Runtime, UpstreamStream
from extproc.telemetry import Telemetry
from tests.unit.support import (
    FakeClock,
    SyncRouter,
    body_message,
    client_headers,
    headers_message,
    start_attempt,
    table_from_yaml,
    upstream_body,
    upstream_status,
)

CONFIG = """
providers:
  - name: alpha
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: m, model: upstream-m}]
  - name: beta
    type: openai-compatible
    base_url: http://127.0.0.1:8002/v1
    models: [{name: m, model: upstream-b}]
virtual_model_groups:
  - name: prod
    virtual_models:
      - name: chat
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: alpha/m, priority: 0, retry_config: {attempts: 1}}
            - {target: beta/m, priority: 1, retry_config: {attempts: 1}}
"""

ALPHA, BETA = "alpha/m", "beta/m"
VM = "prod/chat"
WINDOW = 60.0


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock(100.0)


@pytest.fixture()
def runtime(clock: FakeClock) -> Runtime:
    table = table_from_yaml(CONFIG)
    rt = Runtime(table, rng=Random(1), clock=clock, telemetry=Telemetry(prometheus=True))
    rt.health.register_windows([WINDOW])
    return rt


# --- flow helpers (message builders in tests.unit.support) -------------------------------------


def start(runtime: Runtime, body: dict[str, Any]) -> tuple[RouterStream, str]:
    """Run the router stream's request phase; return the stream and the request id."""
    router = SyncRouter(runtime)
    router.handle(headers_message("request_headers", client_headers()))
    reply = router.handle(body_message("request_body", json.dumps(body).encode()))
    request_id = reply.dynamic_metadata.fields[REQUEST_NS].struct_value.fields["request_id"]
    return router, request_id.string_value


def attempt(runtime: Runtime, request_id: str, count: int) -> UpstreamStream:
    """Open the upstream stream of attempt ``count``; its headers must go upstream."""
    upstream, reply = start_attempt(runtime, request_id, count)
    assert reply.WhichOneof("response") == "request_headers"
    return upstream


# --- reading the Prometheus text ---------------------------------------------------------------


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of every sample called ``name`` whose labels include ``labels``."""
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def value(text: str, name: str, **labels: str) -> float:
    """The value of the one sample called ``name`` with ``labels``."""
    found = samples(text, name, **labels)
    assert len(found) == 1, f"{name} {labels}: {found}"
    return found[0]


def prometheus(runtime: Runtime) -> str:
    return runtime.telemetry.render_prometheus().decode()


CHAT_REQUEST = {"model": VM, "messages": [{"role": "user", "content": "hi"}]}
ANSWER = json.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "model": "served-x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
    }
).encode()


# --- time per output token ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "ttft", "tokens", "expected"),
    [
        (2.0, 0.5, 4, 0.5),  # stream: (2.0 - 0.5) / 3
        (2.0, 0.5, 1, 1.5),  # stream, one token: divided by max(0, 1)
        (2.0, 0.5, 2, 1.5),
        (1.0, 1.5, 3, 0.0),  # first token after the end (clock skew): never negative
        (2.0, None, 4, 0.5),  # non-stream: 2.0 / 4
        (2.0, None, 1, 2.0),
        (0.9, None, 3, 0.3),
    ],
)
def test_time_per_output_token(
    duration: float, ttft: float | None, tokens: int, expected: float
) -> None:
    assert time_per_output_token(duration, ttft, tokens) == pytest.approx(expected)


@pytest.mark.parametrize("tokens", [0, None, -3])
@pytest.mark.parametrize("ttft", [0.5, None])
def test_time_per_output_token_without_tokens_is_none(
    tokens: int | None, ttft: float | None
) -> None:
    assert time_per_output_token(2.0, ttft, tokens) is None


# --- a successful non-streamed request ---------------------------------------------------------


def run_success(runtime: Runtime, clock: FakeClock) -> RouterStream:
    router, request_id = start(runtime, CHAT_REQUEST)
    clock.now += 0.1  # sent at 100.1
    upstream = attempt(runtime, request_id, 1)
    clock.now += 0.4  # headers at 100.5
    upstream_status(upstream, 200)
    clock.now += 1.5  # body ends at 102.0: 1.9 s after the attempt was sent
    upstream_body(upstream, ANSWER)
    router.close()
    return router


def test_observe_success_records_tpot_sample_for_target(runtime: Runtime, clock: FakeClock) -> None:
    run_success(runtime, clock)
    mean, count = runtime.health.tpot(ALPHA, WINDOW)
    assert count == 1
    assert mean == pytest.approx(1.9 / 5)
    assert runtime.health.tpot(BETA, WINDOW) == (None, 0)
    assert runtime.health.failures(ALPHA) == 0
    assert runtime.requests == {}


def test_observe_success_tpot_lands_in_configured_windows(clock: FakeClock) -> None:
    config = CONFIG.replace("priority-based-routing", "latency-based-routing").replace(
        "          load_balance_targets:",
        "          window_seconds: 30\n          load_balance_targets:",
    )
    table = table_from_yaml(config)
    assert table.tpot_windows == frozenset({30.0})
    runtime = Runtime(table, rng=Random(1), clock=clock, telemetry=Telemetry(prometheus=True))
    _, request_id = start(runtime, CHAT_REQUEST)
    target = runtime.requests[request_id].decision.primary.key
    clock.now += 0.5
    upstream = attempt(runtime, request_id, 1)
    upstream_status(upstream, 200)
    clock.now += 2.0
    upstream_body(upstream, ANSWER)
    assert runtime.health.tpot(target, 30.0) == (pytest.approx(2.0 / 5), 1)


def test_observe_success_token_usage_metrics(runtime: Runtime, clock: FakeClock) -> None:
    run_success(runtime, clock)
    text = prometheus(runtime)
    common = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "alpha",
        "gen_ai_request_model": "upstream-m",
        "gen_ai_response_model": "served-x",
        "vmrouter_virtual_model": VM,
    }
    output = {**common, "gen_ai_token_type": "output"}
    inputs = {**common, "gen_ai_token_type": "input"}
    assert value(text, "gen_ai_client_token_usage_sum", **output) == 5
    assert value(text, "gen_ai_client_token_usage_count", **output) == 1
    assert value(text, "gen_ai_client_token_usage_sum", **inputs) == 7
    assert value(text, "gen_ai_client_token_usage_count", **inputs) == 1


def test_observe_success_duration_and_tpot_metrics(runtime: Runtime, clock: FakeClock) -> None:
    run_success(runtime, clock)
    text = prometheus(runtime)
    name = "gen_ai_server_request_duration_seconds"
    assert value(text, f"{name}_count", gen_ai_response_model="served-x") == 1
    assert value(text, f"{name}_sum", gen_ai_response_model="served-x") == pytest.approx(1.9)
    assert samples(text, f"{name}_count") == [1]
    tpot = "gen_ai_server_time_per_output_token_seconds"
    assert value(text, f"{tpot}_count", gen_ai_response_model="served-x") == 1
    assert value(text, f"{tpot}_sum") == pytest.approx(1.9 / 5)
    # A buffered response has no visible first token.
    assert samples(text, "gen_ai_server_time_to_first_token_seconds_count") == []


def test_observe_success_attempt_and_decision_counters(runtime: Runtime, clock: FakeClock) -> None:
    run_success(runtime, clock)
    text = prometheus(runtime)
    assert (
        value(
            text,
            "vmrouter_attempts_total",
            vmrouter_outcome="200",
            vmrouter_attempt_kind="primary",
            vmrouter_target=ALPHA,
            vmrouter_virtual_model=VM,
        )
        == 1
    )
    assert samples(text, "vmrouter_attempts_total") == [1]
    assert (
        value(
            text,
            "vmrouter_routing_decisions_total",
            vmrouter_virtual_model=VM,
            vmrouter_target=ALPHA,
        )
        == 1
    )


def test_observe_success_target_health_gauges(runtime: Runtime, clock: FakeClock) -> None:
    run_success(runtime, clock)
    text = prometheus(runtime)
    assert value(text, "vmrouter_target_healthy", vmrouter_target=ALPHA) == 1
    assert value(text, "vmrouter_target_consecutive_failures", vmrouter_target=ALPHA) == 0
    assert samples(text, "vmrouter_target_healthy", vmrouter_target=BETA) == []


def test_observe_two_requests_accumulate(runtime: Runtime, clock: FakeClock) -> None:
    run_success(runtime, clock)
    run_success(runtime, clock)
    text = prometheus(runtime)
    assert value(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == 10
    assert value(text, "vmrouter_routing_decisions_total", vmrouter_target=ALPHA) == 2
    assert runtime.health.tpot(ALPHA, WINDOW) == (pytest.approx(1.9 / 5), 2)


# --- a streamed request ------------------------------------------------------------------------


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def delta(content: str | None = None, role: str | None = None) -> bytes:
    d = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return sse(
        {
            "object": "chat.completion.chunk",
            "model": "served-x",
            "choices": [{"index": 0, "delta": d}],
        }
    )


STREAM_USAGE = sse(
    {
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5},
    }
)


def body_of(reply: Any) -> bytes | None:
    common = reply.response_body.response
    return common.body_mutation.body if common.HasField("body_mutation") else None


def test_observe_stream_ttft_tpot_and_stripped_usage(runtime: Runtime, clock: FakeClock) -> None:
    _, request_id = start(runtime, {**CHAT_REQUEST, "stream": True})
    clock.now += 0.1  # sent at 100.1
    upstream = attempt(runtime, request_id, 1)
    clock.now += 0.2
    upstream_status(upstream, 200)
    clock.now += 0.2
    first = upstream_body(upstream, delta("", role="assistant"), end_of_stream=False)
    assert body_of(first) is None
    clock.now += 0.1  # first token at 100.6: TTFT 0.5 s
    upstream_body(upstream, delta("Hel"), end_of_stream=False)
    clock.now += 1.0  # ends at 101.6: duration 1.5 s
    rest = delta("lo") + STREAM_USAGE + sse("[DONE]")
    last = upstream_body(upstream, rest)
    assert body_of(last) == delta("lo") + sse("[DONE]")  # the usage chunk we asked for is removed
    expected_tpot = (1.5 - 0.5) / (5 - 1)
    assert runtime.health.tpot(ALPHA, WINDOW) == (pytest.approx(expected_tpot), 1)
    text = prometheus(runtime)
    assert value(text, "gen_ai_server_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value(text, "gen_ai_server_time_per_output_token_seconds_sum") == pytest.approx(
        expected_tpot
    )
    assert value(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == 5
    assert value(text, "gen_ai_server_request_duration_seconds_sum") == pytest.approx(1.5)


# --- failed attempts ---------------------------------------------------------------------------


def test_observe_failed_attempt_then_fallback(runtime: Runtime, clock: FakeClock) -> None:
    router, request_id = start(runtime, CHAT_REQUEST)
    clock.now += 0.1
    first = attempt(runtime, request_id, 1)
    clock.now += 0.3
    upstream_status(first, 503)
    # A failure is reported as soon as it is settled, before the request ends.
    assert runtime.health.failures(ALPHA) == 1
    clock.now += 0.1
    second = attempt(runtime, request_id, 2)
    clock.now += 0.2
    upstream_status(second, 200)
    clock.now += 1.0
    upstream_body(second, ANSWER)
    router.close()
    assert runtime.health.failures(ALPHA) == 1
    assert runtime.health.failures(BETA) == 0
    assert runtime.health.available(ALPHA)  # one failure is not enough for a cooldown
    assert runtime.health.tpot(ALPHA, WINDOW) == (None, 0)
    assert runtime.health.tpot(BETA, WINDOW) == (pytest.approx(1.2 / 5), 1)
    text = prometheus(runtime)
    attempts = "vmrouter_attempts_total"
    assert (
        value(
            text,
            attempts,
            vmrouter_outcome="503",
            vmrouter_attempt_kind="primary",
            vmrouter_target=ALPHA,
        )
        == 1
    )
    assert (
        value(
            text,
            attempts,
            vmrouter_outcome="200",
            vmrouter_attempt_kind="fallback",
            vmrouter_target=BETA,
        )
        == 1
    )
    assert sorted(samples(text, attempts)) == [1, 1]
    assert value(text, "vmrouter_routing_decisions_total", vmrouter_target=ALPHA) == 1
    assert value(text, "vmrouter_target_consecutive_failures", vmrouter_target=ALPHA) == 1
    assert value(text, "vmrouter_target_healthy", vmrouter_target=ALPHA) == 1
    duration = "gen_ai_server_request_duration_seconds"
    assert value(text, f"{duration}_sum", error_type="503") == pytest.approx(0.3)
    assert value(text, f"{duration}_count", gen_ai_response_model="served-x") == 1
    assert (
        value(
            text,
            "gen_ai_client_token_usage_sum",
            gen_ai_token_type="output",
            gen_ai_provider_name="beta",
        )
        == 5
    )


def test_observe_failures_put_target_into_cooldown_and_gauge_shows_it(
    runtime: Runtime, clock: FakeClock
) -> None:
    for _ in range(3):
        router, request_id = start(runtime, CHAT_REQUEST)
        upstream_status(attempt(runtime, request_id, 1), 503)
        second = attempt(runtime, request_id, 2)
        upstream_status(second, 200)
        upstream_body(second, ANSWER)
        router.close()
    assert not runtime.health.available(ALPHA)
    text = prometheus(runtime)
    assert value(text, "vmrouter_target_healthy", vmrouter_target=ALPHA) == 0
    assert value(text, "vmrouter_target_healthy", vmrouter_target=BETA) == 1
    assert value(text, "vmrouter_target_consecutive_failures", vmrouter_target=ALPHA) == 3
    # The next request goes to the fallback target first; the cooling one stays last resort.
    router, request_id = start(runtime, CHAT_REQUEST)
    assert [t.key for t in runtime.requests[request_id].decision.plan] == [BETA, ALPHA]
    router.close()


def test_observe_429_retry_after_cools_the_target(runtime: Runtime, clock: FakeClock) -> None:
    router, request_id = start(runtime, CHAT_REQUEST)
    upstream_status(attempt(runtime, request_id, 1), 429, ("retry-after", "7"))
    assert runtime.health.failures(ALPHA) == 1
    assert runtime.health.cooldown_remaining(ALPHA) == pytest.approx(7.0)
    second = attempt(runtime, request_id, 2)
    upstream_status(second, 200)
    upstream_body(second, ANSWER)
    router.close()
    text = prometheus(runtime)
    assert (
        value(
            text, "vmrouter_attempts_total", vmrouter_outcome="429", vmrouter_attempt_kind="primary"
        )
        == 1
    )
    clock.now += 7.0
    assert runtime.health.available(ALPHA)


def test_observe_broken_response_counts_as_failure(runtime: Runtime, clock: FakeClock) -> None:
    router, request_id = start(runtime, CHAT_REQUEST)
    upstream_status(attempt(runtime, request_id, 1), 200)
    router.close()  # the router stream ended before the body did
    assert runtime.health.failures(ALPHA) == 1
    assert runtime.health.tpot(ALPHA, WINDOW) == (None, 0)


def test_attempt_kind_names_primary_retry_and_fallback(runtime: Runtime) -> None:
    router, request_id = start(runtime, CHAT_REQUEST)
    upstream_status(attempt(runtime, request_id, 1), 503)
    upstream_status(attempt(runtime, request_id, 2), 200)
    records = runtime.requests[request_id].plan.records
    assert [attempt_kind(records, i) for i in range(len(records))] == ["primary", "fallback"]
    router.close()


# --- the metrics endpoint ----------------------------------------------------------------------


def test_metrics_server_serves_prometheus_text_and_healthz(
    runtime: Runtime, clock: FakeClock
) -> None:
    run_success(runtime, clock)

    async def fetch() -> tuple[int, str, str, int, str]:
        runner, port = await start_metrics_server(runtime.telemetry, "127.0.0.1", 0)
        try:
            assert port > 0
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{port}"
                async with session.get(f"{base}/metrics") as response:
                    metrics = (
                        response.status,
                        response.headers["content-type"],
                        await response.text(),
                    )
                async with session.get(f"{base}/healthz") as response:
                    health = (response.status, await response.text())
        finally:
            await runner.cleanup()
        return (*metrics, *health)

    status, content_type, text, health_status, health_text = asyncio.run(fetch())
    assert status == 200
    assert content_type == PROMETHEUS_CONTENT_TYPE
    assert content_type.startswith("text/plain; version=0.0.4")
    assert value(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == 5
    assert value(text, "vmrouter_target_healthy", vmrouter_target=ALPHA) == 1
    assert (health_status, health_text) == (200, "ok")


def test_recorder_traces_a_request_span_with_one_child_per_attempt(clock: FakeClock) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(prometheus=False, tracer_provider=provider)
    rt = Runtime(table_from_yaml(CONFIG), rng=Random(1), clock=clock, telemetry=telemetry)
    router, request_id = start(rt, {"model": VM, "messages": []})
    first = attempt(rt, request_id, 1)
    upstream_status(first, 503)
    second = attempt(rt, request_id, 2)
    upstream_status(second, 200)
    upstream_body(second, b'{"model": "upstream-b"}')
    router.close()
    spans = exporter.get_finished_spans()
    request = next(s for s in spans if s.name == "vmrouter.request")
    attempts = [s for s in spans if s.name == "vmrouter.attempt"]
    assert request.attributes is not None
    assert request.attributes["vmrouter.virtual_model"] == VM
    assert request.attributes["vmrouter.attempts"] == f"{ALPHA}:503,{BETA}:200"
    assert [a.attributes["vmrouter.target"] for a in attempts if a.attributes] == [ALPHA, BETA]
    assert [a.attributes["vmrouter.attempt.kind"] for a in attempts if a.attributes] == [
        "primary",
        "fallback",
    ]
    for child in attempts:
        assert child.parent is not None
        assert child.parent.span_id == request.context.span_id
    provider.shutdown()
