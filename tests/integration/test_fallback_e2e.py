"""Retries and fallback within one client request, through a real Envoy."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.integration.stack import Stack, wait_until

pytestmark = pytest.mark.envoy

MESSAGES = [{"role": "user", "content": "hello there"}]


def _raw(client: openai.OpenAI, model: str, **kwargs: object):  # type: ignore[no-untyped-def]
    return client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, **kwargs
    )


def test_fallback_503_then_secondary_serves_with_its_own_rewrite(
    gw: Stack, client: openai.OpenAI
) -> None:
    gw.set_default("a", {"status": 503})
    raw = _raw(
        client,
        "test/fallback",
        extra_headers={"x-client-tag": "keep-me", "x-only-b": "client"},
    )
    assert raw.headers["x-gateway-target"] == "b/m1"
    assert raw.headers["x-gateway-attempts"] == "a/m1:503,a/m1:503,b/m1:200"
    assert len(gw.received("a")) == 2
    first_a = gw.received("a")[0]
    assert first_a["json"]["model"] == "a-model-1"
    assert "x-client-tag" not in first_a["headers"]
    b = gw.received("b")
    assert len(b) == 1
    assert b[0]["json"]["model"] == "b-model-1"
    assert b[0]["json"]["temperature"] == 0.9
    headers = b[0]["headers"]
    # b gets its own overrides, the client's headers a removed come back, a's own are gone.
    assert _one(headers["x-only-b"]) == "yes"
    assert _one(headers["x-client-tag"]) == "keep-me"
    assert "x-only-a" not in headers
    assert _one(headers["authorization"]) == "Bearer sk-test-b"
    assert int(_one(headers["content-length"])) == len(b[0]["body"].encode())


def _one(value: object) -> str:
    return value[0] if isinstance(value, list) else str(value)


def test_fallback_401_falls_back_without_retry(gw: Stack, client: openai.OpenAI) -> None:
    gw.set_default("a", {"status": 401})
    raw = _raw(client, "test/fallback")
    assert raw.headers["x-gateway-attempts"] == "a/m1:401,b/m1:200"
    assert len(gw.received("a")) == 1


def test_fallback_429_is_retried_after_the_delay(gw: Stack, client: openai.OpenAI) -> None:
    gw.set_default("a", {"status": 429})
    raw = _raw(client, "test/fallback")
    assert raw.headers["x-gateway-attempts"] == "a/m1:429,a/m1:429,b/m1:200"
    first, second = gw.received("a")
    gap = second["received_at"] - first["received_at"]
    assert gap >= 0.15  # retry_config.delay: 150 ms
    assert gap < 1.5
    # The fallback to another target does not wait.
    assert gw.received("b")[0]["received_at"] - second["received_at"] < 0.15


def test_fallback_400_is_returned_without_fallback(gw: Stack, client: openai.OpenAI) -> None:
    gw.script("a", {"status": 400, "body": {"error": {"message": "bad", "type": "x", "code": "y"}}})
    with pytest.raises(openai.BadRequestError) as info:
        _raw(client, "test/fallback")
    assert info.value.response.headers["x-gateway-attempts"] == "a/m1:400"
    assert gw.received("b") == []


def test_fallback_candidate_false_never_gets_fallback_traffic(
    gw: Stack, client: openai.OpenAI
) -> None:
    gw.set_default("a", {"status": 503})
    targets = []
    for _ in range(60):
        raw = _raw(client, "test/guarded")
        targets.append(raw.headers["x-gateway-target"])
        if raw.headers["x-gateway-attempts"].startswith("a/m1"):
            assert raw.headers["x-gateway-attempts"] == "a/m1:503,c/m1:200"
    assert {"b/m1", "c/m1"} <= set(targets)
    # Every request b received was a first attempt: b was primary, never a fallback.
    for request in gw.received("b"):
        assert _one(request["headers"]["x-envoy-attempt-count"]) == "1"


def test_fallback_connection_refused(gw: Stack, client: openai.OpenAI) -> None:
    raw = _raw(client, "test/refused")
    assert raw.headers["x-gateway-target"] == "b/m1"
    attempts = raw.headers["x-gateway-attempts"].split(",")
    assert attempts[-1] == "b/m1:200"
    assert attempts[:-1] == ["dead/m1:connect-error", "dead/m1:connect-error"]


def test_fallback_stalled_primary_times_out(gw: Stack, client: openai.OpenAI) -> None:
    gw.set_default("a", {"stall": True})
    started = time.monotonic()
    raw = _raw(client, "test/slow")
    elapsed = time.monotonic() - started
    assert raw.headers["x-gateway-attempts"] == "a/m1:timeout,b/m1:200"
    assert 0.9 <= elapsed < 10


def test_fallback_everything_fails_returns_last_error(gw: Stack, client: openai.OpenAI) -> None:
    gw.set_default("a", {"status": 503})
    gw.set_default("b", {"status": 502, "body": "<html>bad gateway</html>"})
    with pytest.raises(openai.InternalServerError) as info:
        _raw(client, "test/fallback")
    response = info.value.response
    assert response.status_code == 502
    assert response.headers["x-gateway-attempts"] == ("a/m1:503,a/m1:503,b/m1:502,b/m1:502")
    error = response.json()["error"]
    assert "b/m1 answered 502" in error["message"]
    assert "bad gateway" in error["message"]


def test_fallback_stream_primary_fails_before_first_byte(gw: Stack, client: openai.OpenAI) -> None:
    gw.set_default("a", {"status": 500})
    stream = client.chat.completions.create(model="test/fallback", messages=MESSAGES, stream=True)
    text = "".join(
        c.choices[0].delta.content or "" for c in stream if c.choices and c.choices[0].delta
    )
    assert "tok0" in text
    assert len(gw.received("b")) == 1


def test_fallback_stream_broken_midway_never_looks_complete(gw: Stack) -> None:
    gw.script("a", {"chunks": 6, "chunk_interval_ms": 20, "break_after_chunks": 2})
    body = {"model": "test/fallback", "messages": MESSAGES, "stream": True}
    received = b""
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream("POST", f"{gw.base_url}/chat/completions", json=body, timeout=10) as response,
    ):
        assert response.status_code == 200
        for part in response.iter_bytes():
            received += part
    assert b"tok0" in received
    assert b"[DONE]" not in received
    assert gw.received("b") == []  # bytes reached the client: no fallback after that
    # No message tells the ext_proc: the request's end (its router stream closing) reports it.
    wait_until(lambda: gw.runtime.health.failures("a/m1") == 1, 5, "the broken attempt's report")
