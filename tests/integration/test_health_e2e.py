"""The health model through a real Envoy: latency routing, SLA cutoff, Prometheus metrics."""

from __future__ import annotations

import re
import time

import openai
import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.envoy

MESSAGES = [{"role": "user", "content": "one two three"}]
SLOW = {"chunks": 5, "chunk_interval_ms": 60}


def _stream_target(client: openai.OpenAI, model: str) -> str:
    with client.chat.completions.with_streaming_response.create(
        model=model, messages=MESSAGES, stream=True
    ) as response:
        target = response.headers["x-gateway-target"]
        for _ in response.iter_lines():
            pass
    return target


def test_health_latency_routing_moves_traffic_to_the_fast_target(
    gw: Stack, client: openai.OpenAI
) -> None:
    gw.set_default("a", SLOW)
    targets = [_stream_target(client, "test/latency") for _ in range(16)]
    # Both get measured first (min_samples: 2), then the fast one takes everything.
    assert targets[:8].count("a/m1") >= 2
    assert targets[-8:] == ["b/m1"] * 8
    # a speeds up; once its slow samples age out of the 4 s window it is explored again.
    gw.set_default("a", {})
    time.sleep(4.5)
    later = [_stream_target(client, "test/latency") for _ in range(12)]
    assert later.count("a/m1") >= 2


def test_health_sla_cutoff_trips_and_recovers(gw: Stack, client: openai.OpenAI) -> None:
    gw.set_default("a", SLOW)  # ~60 ms per output token, cutoff 30 ms
    assert _stream_target(client, "test/sla") == "a/m1"
    after_trip = [_stream_target(client, "test/sla") for _ in range(6)]
    assert after_trip == ["b/m1"] * 6
    gw.set_default("a", {})
    time.sleep(3.5)  # the slow samples leave the 3 s SLA window
    assert _stream_target(client, "test/sla") == "a/m1"


def test_health_usage_chunk_is_stripped_unless_requested(gw: Stack, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="test/prio", messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    upstream_body = gw.received("a")[-1]["json"]
    assert upstream_body["stream_options"] == {"include_usage": True}
    asked = client.chat.completions.create(
        model="test/prio", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    last = list(asked)[-1]
    assert last.usage is not None
    assert last.usage.completion_tokens == 5


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


def test_health_prometheus_endpoint_reports_a_known_request(
    gw: Stack, client: openai.OpenAI
) -> None:
    gw.script("a", {"response_model": "a-model-1-0501", "content": "four words right here"})
    client.chat.completions.create(model="test/metrics", messages=MESSAGES)
    text = gw.metrics()
    vm = {"vmrouter_virtual_model": "test/metrics"}
    assert _sample(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", **vm) == 4
    assert _sample(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="input", **vm) == 3
    assert (
        _sample(
            text,
            "gen_ai_server_request_duration_seconds_count",
            gen_ai_response_model="a-model-1-0501",
            gen_ai_request_model="a-model-1",
            gen_ai_provider_name="a",
            gen_ai_operation_name="chat",
            **vm,
        )
        == 1
    )
    tpot = _sample(text, "gen_ai_server_time_per_output_token_seconds_sum", **vm)
    duration = _sample(text, "gen_ai_server_request_duration_seconds_sum", **vm)
    assert tpot == pytest.approx(duration / 4)
    assert (
        _sample(
            text,
            "vmrouter_attempts_total",
            vmrouter_outcome="200",
            vmrouter_attempt_kind="primary",
            vmrouter_target="a/m1",
            **vm,
        )
        == 1
    )
    assert _sample(text, "vmrouter_routing_decisions_total", vmrouter_target="a/m1", **vm) == 1
    assert _sample(text, "vmrouter_target_healthy", vmrouter_target="a/m1") == 1
    assert re.search(r"^# TYPE gen_ai_server_time_to_first_token_seconds histogram", text, re.M)
