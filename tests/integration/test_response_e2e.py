"""The response side through a real Envoy: message counts, Envoy's own replies, buffered bodies.

The router-level ext_proc filter sees each request's headers and body only; every response phase
runs on the upstream-level filter of the attempt that answers. These tests pin what that relies on:
the ext_proc message counts Envoy reports (a regression adds messages here first), the gateway
headers and OpenAI-shaped bodies of replies Envoy makes on its own (they never pass an ext_proc
filter), and response bodies the upstream filter buffers (large ones, and ones that break off).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.integration.stack import Stack, fake_providers, free_port, require_envoy, wait_until

pytestmark = pytest.mark.envoy

MESSAGES = [{"role": "user", "content": "hello there"}]


def _ext_proc_counters(stack: Stack) -> dict[str, int]:
    """Envoy's ext_proc streams and messages so far: ``router.*`` (the router-level filter,
    ``http.vmrouter.ext_proc.*``) and ``upstream.*`` (every provider cluster's filter)."""
    stats = stack.admin_json("/stats?format=json&filter=ext_proc")["stats"]
    out = {"router.streams": 0, "router.msgs": 0, "upstream.streams": 0, "upstream.msgs": 0}
    for stat in stats:
        name = stat.get("name", "")
        level = "router" if name.startswith("http.vmrouter.") else "upstream"
        if name.endswith(".ext_proc.streams_started"):
            out[f"{level}.streams"] += int(stat["value"])
        elif name.endswith(".ext_proc.stream_msgs_sent"):
            out[f"{level}.msgs"] += int(stat["value"])
    return out


def _messages_for(stack: Stack, send: Any) -> dict[str, int]:
    """The ext_proc streams and messages (Envoy to ext_proc) one client request costs."""
    before = _ext_proc_counters(stack)
    send()
    after = _ext_proc_counters(stack)
    return {key: after[key] - before[key] for key in after}


def test_response_message_counts_per_request(gw: Stack, client: openai.OpenAI) -> None:
    def plain() -> None:
        client.chat.completions.create(model="test/prio", messages=MESSAGES)

    # Request headers + body on the router stream; request headers, response headers and the
    # buffered body (usage, served model) on the one attempt's stream.
    assert _messages_for(gw, plain) == {
        "router.streams": 1,
        "router.msgs": 2,
        "upstream.streams": 1,
        "upstream.msgs": 3,
    }

    gw.script("a", {"status": 503})

    def retried() -> None:
        raw = client.chat.completions.with_raw_response.create(model="test/prio", messages=MESSAGES)
        assert raw.headers["x-gateway-attempts"] == "a/m1:503,a/m1:200"

    # The failed attempt costs its request and response headers; its body is never read.
    assert _messages_for(gw, retried) == {
        "router.streams": 1,
        "router.msgs": 2,
        "upstream.streams": 2,
        "upstream.msgs": 2 + 3,
    }

    gw.script("a", {"chunks": 3, "chunk_interval_ms": 100})

    def streamed() -> None:
        stream = client.chat.completions.create(model="test/prio", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    counts = _messages_for(gw, streamed)
    assert counts["router.msgs"] == 2
    assert counts["upstream.streams"] == 1
    # Headers, then one message per body chunk as it arrives: the role chunk and three content
    # chunks 100 ms apart at least, the closing chunks (stop, usage, [DONE]) possibly together.
    assert 2 + 4 <= counts["upstream.msgs"] <= 2 + 7


def test_response_envoy_timeout_reply_has_gateway_headers_and_openai_body(gw: Stack) -> None:
    gw.set_default("a", {"stall": True})
    gw.set_default("b", {"stall": True})
    response = httpx.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "test/slow", "messages": MESSAGES},
        timeout=20,
    )
    assert response.status_code == 504
    assert response.headers["x-gateway-virtual-model"] == "test/slow"
    assert response.headers["x-gateway-target"] == "b/m1"
    assert response.headers["x-gateway-served-model"] == "b-model-1"
    assert response.headers["x-gateway-attempts"] == "a/m1:timeout,b/m1:timeout,b/m1:timeout"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error == {
        "message": "b/m1 answered 504: upstream request timeout",
        "type": "upstream_error",
        "param": None,
        "code": 504,
    }
    # No answer reached the ext_proc: the request's end (its router stream closing) reports it.
    wait_until(lambda: _attempts(gw, "test/slow", "b/m1", "timeout") == 2, 5, "the report")
    assert _attempts(gw, "test/slow", "a/m1", "timeout") >= 1


def _attempts(stack: Stack, vm: str, target: str, outcome: str) -> float:
    """``vmrouter_attempts_total`` summed over attempt kinds, from the ext_proc's /metrics."""
    labels = (f'vmrouter_virtual_model="{vm}"', f'vmrouter_target="{target}"')
    total = 0.0
    for line in stack.metrics().splitlines():
        if not line.startswith("vmrouter_attempts_total{"):
            continue
        if all(label in line for label in labels) and f'vmrouter_outcome="{outcome}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_response_envoy_connect_failure_reply_names_the_target(gw: Stack) -> None:
    response = httpx.post(
        f"{gw.base_url}/chat/completions", json={"model": "dead/m1", "messages": MESSAGES}
    )
    assert response.status_code == 503
    assert response.headers["x-gateway-virtual-model"] == "dead/m1"
    assert response.headers["x-gateway-target"] == "dead/m1"
    assert response.headers["x-gateway-attempts"].startswith("dead/m1:connect-error")
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == 503
    assert error["message"].startswith("dead/m1 answered 503: upstream connect error")


def test_response_ext_proc_own_replies_carry_no_gateway_headers(gw: Stack) -> None:
    response = httpx.post(
        f"{gw.base_url}/chat/completions", json={"model": "test/nope", "messages": MESSAGES}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"  # not rewritten by Envoy
    assert not [name for name in response.headers if name.startswith("x-gateway-")]


def test_response_provider_cannot_forge_gateway_headers_or_force_a_retry(gw: Stack) -> None:
    gw.script("a", {"headers": {"x-gateway-target": "forged/x", "x-vm-retry": "1"}})
    response = httpx.post(
        f"{gw.base_url}/chat/completions", json={"model": "test/prio", "messages": MESSAGES}
    )
    assert response.status_code == 200
    assert response.headers["x-gateway-target"] == "a/m1"
    assert response.headers["x-gateway-attempts"] == "a/m1:200"
    assert "x-vm-retry" not in response.headers
    assert len(gw.received("a")) == 1


def test_response_large_body_is_buffered_by_the_upstream_filter(
    gw: Stack, client: openai.OpenAI
) -> None:
    content = "word " * 600_000  # a 3 MB answer: past Envoy's 1 MiB and 16 MiB gRPC watermarks
    gw.script("a", {"content": content, "response_model": "a-model-1-big"})
    raw = client.chat.completions.with_raw_response.create(model="test/prio", messages=MESSAGES)
    assert raw.headers["x-gateway-served-model"] == "a-model-1-big"
    assert raw.parse().choices[0].message.content == content
    assert gw.envoy is not None and gw.envoy.poll() is None


# --- an upstream whose answer breaks off while the upstream filter buffers it ------------------

_ANSWER = json.dumps(
    {
        "id": "raw-1",
        "object": "chat.completion",
        "model": "raw-served",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1},
    }
).encode()


class BreakingUpstream:
    """Answers 200 with a content-length, sends part of the body, then resets the connection."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self.loop
        ).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode().split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        await reader.readexactly(length)
        self.requests += 1
        head_out = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        writer.write(head_out + b"content-length: %d\r\n\r\n" % len(_ANSWER) + _ANSWER[:20])
        await writer.drain()
        await asyncio.sleep(0.2)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()  # RST: the body never completes

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


BREAKING_TEMPLATE = (
    fake_providers("b")
    + """  - name: raw
    type: openai-compatible
    base_url: http://127.0.0.1:RAW_PORT/v1
    models: [{{name: m1, model: raw-model}}]
virtual_model_groups:
  - name: test
    virtual_models:
      - name: breaking
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {{target: raw/m1, priority: 0, retry_config: {{attempts: 2}}}}
            - {{target: b/m1, priority: 1}}
"""
)


@pytest.fixture(scope="module")
def breaking() -> Iterator[tuple[Stack, BreakingUpstream]]:
    require_envoy()
    upstream = BreakingUpstream()
    try:
        template = BREAKING_TEMPLATE.replace("RAW_PORT", str(upstream.port))
        with Stack(template, ["b"]) as stack:
            yield stack, upstream
    finally:
        upstream.close()


def test_response_answer_breaking_off_before_the_client_saw_it_is_a_502(
    breaking: tuple[Stack, BreakingUpstream],
) -> None:
    stack, upstream = breaking
    response = httpx.post(
        f"{stack.base_url}/chat/completions",
        json={"model": "test/breaking", "messages": MESSAGES},
        timeout=20,
    )
    # Envoy still held the response for the upstream filter, so it retried the reset attempt;
    # the plan was over (the answer had arrived), so the ext_proc answered that retry itself.
    assert response.status_code == 502
    assert response.json()["error"]["message"] == (
        "raw/m1 answered 200, but its response broke off"
    )
    assert response.headers["x-gateway-attempts"] == "raw/m1:200"
    assert response.headers["x-gateway-target"] == "raw/m1"
    assert upstream.requests == 1  # no second request went to the provider
    assert stack.received("b") == []
    assert stack.runtime.health.failures("raw/m1") == 1
