"""Walking skeleton through a real Envoy: resolution, strategies, rewrites, headers, streaming."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.stack import Stack, validate_with_envoy

pytestmark = pytest.mark.envoy

MESSAGES = [{"role": "user", "content": "hello there"}]


def test_e2e_weight_split_holds(gw: Stack, client: openai.OpenAI) -> None:
    def one(_: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="test/split", messages=MESSAGES
        )
        return raw.headers["x-gateway-target"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        targets = Counter(pool.map(one, range(2000)))
    share = targets["a/m1"] / 2000
    assert 0.87 <= share <= 0.93, targets
    assert targets["a/m1"] + targets["b/m1"] == 2000
    assert len(gw.received("a")) == targets["a/m1"]
    assert len(gw.received("b")) == targets["b/m1"]


def test_e2e_priority_picks_priority_zero(gw: Stack, client: openai.OpenAI) -> None:
    for _ in range(20):
        raw = client.chat.completions.with_raw_response.create(model="test/prio", messages=MESSAGES)
        assert raw.headers["x-gateway-target"] == "a/m1"
    assert len(gw.received("a")) == 20
    assert gw.received("b") == []


def test_e2e_upstream_sees_rewritten_request(gw: Stack, client: openai.OpenAI) -> None:
    gw.set_default("b", {"status": 500})  # keep the 10% side out of the way: it falls back to a
    for _ in range(5):
        raw = client.chat.completions.with_raw_response.create(
            model="test-split",
            messages=MESSAGES,
            temperature=1.5,
            extra_body={"custom_field": {"keep": [1, 2]}},
            extra_headers={"x-internal-trace": "secret", "x-vm-filter": "spoof"},
        )
        if raw.headers["x-gateway-target"] == "a/m1":
            break
    seen = gw.received("a")
    assert seen, "a/m1 never served"
    request = seen[-1]
    body = request["json"]
    assert body["model"] == "a-model-1"
    assert body["temperature"] == 0.2  # the target's override wins over the client's 1.5
    assert body["max_tokens"] == 64
    assert body["custom_field"] == {"keep": [1, 2]}
    assert body["messages"] == MESSAGES
    headers = request["headers"]
    assert headers["x-team"] == ["core"] or headers["x-team"] == "core"
    assert "x-internal-trace" not in headers
    assert _one(headers["authorization"]) == "Bearer sk-test-a"
    assert request["path"] == "/v1/chat/completions"
    assert not any(h.startswith("x-vm-") for h in headers)
    assert int(_one(headers["content-length"])) == len(request["body"].encode())


def _one(value: object) -> str:
    return value[0] if isinstance(value, list) else str(value)


def test_e2e_provider_without_v1_prefix_gets_bare_path(gw: Stack) -> None:
    response = httpx.post(
        f"{gw.base_url}/chat/completions?trace=1",
        json={"model": "c/m1", "messages": MESSAGES},
    )
    assert response.status_code == 200
    request = gw.received("c")[-1]
    assert request["path"] == "/chat/completions"
    assert request["query"] == "trace=1"
    assert "authorization" not in request["headers"]  # the client's key never leaks upstream


def test_e2e_client_sees_gateway_headers(gw: Stack, client: openai.OpenAI) -> None:
    gw.script("a", {"response_model": "a-model-1-2026-05-01"})
    raw = client.chat.completions.with_raw_response.create(model="test/prio", messages=MESSAGES)
    assert raw.headers["x-gateway-virtual-model"] == "test/prio"
    assert raw.headers["x-gateway-target"] == "a/m1"
    assert raw.headers["x-gateway-served-model"] == "a-model-1-2026-05-01"
    assert raw.headers["x-gateway-attempts"] == "a/m1:200"
    assert "x-vm-retry" not in raw.headers
    completion = raw.parse()
    assert completion.model == "a-model-1-2026-05-01"


def test_e2e_catalog_model_called_directly(gw: Stack, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="b/m1", messages=MESSAGES)
    assert raw.headers["x-gateway-virtual-model"] == "b/m1"
    assert raw.headers["x-gateway-served-model"] == "b-model-1"
    assert gw.received("b")[-1]["json"]["model"] == "b-model-1"


def test_e2e_stream_chunks_arrive_incrementally(gw: Stack, client: openai.OpenAI) -> None:
    gw.script("a", {"chunks": 5, "chunk_interval_ms": 200})
    started = time.monotonic()
    stream = client.chat.completions.create(model="test/prio", messages=MESSAGES, stream=True)
    arrivals: list[float] = []
    text = ""
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text.split() == ["tok0", "tok1", "tok2", "tok3", "tok4"]
    # Five content chunks 200 ms apart: the first must arrive long before the last.
    assert arrivals[-1] - arrivals[0] >= 0.7
    assert arrivals[0] < arrivals[-1] - 0.5


def test_e2e_stream_headers(gw: Stack, client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="test/prio", messages=MESSAGES, stream=True
    ) as response:
        assert response.headers["x-gateway-target"] == "a/m1"
        assert response.headers["x-gateway-served-model"] == "a-model-1"
        assert response.headers["content-type"].startswith("text/event-stream")
        body = b"".join(response.iter_bytes())
    assert body.rstrip().endswith(b"data: [DONE]")


def test_e2e_embeddings(gw: Stack, client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="test/embed", input=["one", "two"])
    assert len(result.data) == 2
    assert gw.received("a")[-1]["path"] == "/v1/embeddings"
    assert gw.received("a")[-1]["json"]["model"] == "a-embed-1"


def test_e2e_unknown_model_is_openai_404(gw: Stack, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="test/nope", messages=MESSAGES)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found"
    assert "test/nope" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_e2e_wrong_operation_is_400(gw: Stack, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="test/split", input="x")
    assert "does not support embeddings" in str(info.value)


@pytest.mark.parametrize(
    ("content", "headers", "status", "needle"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        (b'{"messages": []}', {"content-type": "application/json"}, 400, "no 'model'"),
        (b'{"model": 42}', {"content-type": "application/json"}, 400, "non-empty string"),
        (b"", {"content-type": "application/json"}, 400, "empty"),
        (b"[1,2]", {"content-type": "application/json"}, 400, "JSON object"),
        (b"model=x", {"content-type": "application/x-www-form-urlencoded"}, 415, "content type"),
    ],
)
def test_e2e_bad_input_gets_clear_4xx(
    gw: Stack, content: bytes, headers: dict[str, str], status: int, needle: str
) -> None:
    response = httpx.post(f"{gw.base_url}/chat/completions", content=content, headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"]
    assert set(error) >= {"message", "type", "code"}


def test_e2e_unknown_path_is_404(gw: Stack) -> None:
    response = httpx.get(f"{gw.base_url}/files")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_e2e_spoofed_internal_headers_have_no_effect(gw: Stack) -> None:
    body = {"model": "test/prio", "messages": MESSAGES}
    spoof = {
        "x-vm-request-id": "forged",
        "x-vm-retry": "1",
        "x-envoy-max-retries": "5",
        "x-envoy-upstream-rq-per-try-timeout-ms": "1",
    }
    for _ in range(5):
        response = httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=spoof)
        assert response.status_code == 200
        assert response.headers["x-gateway-target"] == "a/m1"
    assert gw.received("b") == []
    for request in gw.received("a"):
        assert "x-vm-request-id" not in request["headers"]


def test_e2e_models_list(gw: Stack, client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert {"test/split", "test-split", "test/prio", "a/m1", "b/m1", "a/emb"} <= ids


def test_e2e_generated_envoy_config_validates(gw: Stack, tmp_path: Path) -> None:
    validate_with_envoy(gw.envoy_yaml, tmp_path)


def test_e2e_large_body_is_routed(gw: Stack, client: openai.OpenAI) -> None:
    big = "word " * 400_000  # ~2 MB, above Envoy's default 1 MiB buffer
    client.chat.completions.create(model="test/prio", messages=[{"role": "user", "content": big}])
    assert len(json.dumps(gw.received("a")[-1]["json"])) > 2_000_000
