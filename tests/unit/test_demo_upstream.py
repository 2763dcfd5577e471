"""Unit tests for the scriptable fake OpenAI upstream in ``extproc.demo.upstream``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from extproc.demo.upstream import FakeUpstream, Step, build_app, start

Client = TestClient[web.Request, web.Application]
Scenario = Callable[[Client, FakeUpstream], Awaitable[None]]

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def run(scenario: Scenario, upstream: FakeUpstream | None = None) -> FakeUpstream:
    """Run ``scenario`` against a fresh test server and return the upstream it used."""
    target = upstream if upstream is not None else FakeUpstream("alpha")

    async def main() -> None:
        async with TestClient(TestServer(build_app(target))) as client:
            await scenario(client, target)

    asyncio.run(main())
    return target


async def read_frames(
    response: aiohttp.ClientResponse, times: list[float] | None = None
) -> list[str]:
    """Collect the payloads of the ``data:`` SSE lines, noting receive times if asked."""
    frames: list[str] = []
    async for line in response.content:
        text = line.decode().rstrip("\n")
        if text.startswith("data: "):
            frames.append(text[len("data: ") :])
            if times is not None:
                times.append(time.monotonic())
    return frames


def test_default_chat_answer_shape_and_usage() -> None:
    """The default chat answer has the OpenAI shape and word-based usage counts."""

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        body = {
            "model": "gpt-test",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "say hi to me"}]},
            ],
        }
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200
        assert resp.headers["x-upstream-name"] == "alpha"
        data = await resp.json()
        assert data["id"].startswith("chatcmpl-")
        assert data["object"] == "chat.completion"
        assert isinstance(data["created"], int)
        assert data["model"] == "gpt-test"
        assert data["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello from alpha"},
                "finish_reason": "stop",
            }
        ]
        assert data["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}

        # Same endpoint without the /v1 prefix; an empty conversation still costs 1 token.
        resp = await client.post("/chat/completions", json={"model": "m", "messages": []})
        data = await resp.json()
        assert data["usage"]["prompt_tokens"] == 1
        assert data["id"] != "chatcmpl-1"

        resp = await client.post("/v1/completions", json={"model": "c", "prompt": "a b c"})
        data = await resp.json()
        assert data["object"] == "text_completion"
        assert data["choices"][0]["text"] == "hello from alpha"
        assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}

        resp = await client.get("/healthz")
        assert resp.status == 200
        assert await resp.text() == "ok"
        assert resp.headers["x-upstream-name"] == "alpha"

    run(scenario)


def test_records_headers_and_body_including_chunked() -> None:
    """Requests are recorded with headers, raw body, parsed JSON and a monotonic timestamp."""
    before = time.monotonic()

    async def chunked_body() -> AsyncIterator[bytes]:
        yield b'{"model": "m", '
        yield b'"messages": []}'

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        raw = json.dumps(CHAT)
        resp = await client.post(
            "/v1/chat/completions?trace=1",
            data=raw,
            headers=[("X-Test", "one"), ("X-Test", "two"), ("Content-Type", "application/json")],
        )
        assert resp.status == 200
        resp = await client.post("/v1/chat/completions", data=chunked_body())
        assert resp.status == 200
        resp = await client.post("/v1/embeddings", data=b"not json")
        assert resp.status == 200

        resp = await client.get("/_control/requests")
        listed = await resp.json()
        assert listed == json.loads(json.dumps(list(upstream.requests)))

    upstream = run(scenario)
    first, second, third = upstream.requests
    assert first["method"] == "POST"
    assert first["path"] == "/v1/chat/completions"
    assert first["query"] == "trace=1"
    assert first["headers"]["x-test"] == ["one", "two"]
    assert first["headers"]["content-type"] == ["application/json"]
    assert first["body"] == json.dumps(CHAT)
    assert first["json"] == CHAT
    assert before <= first["received_at"] <= second["received_at"] <= time.monotonic()

    assert second["headers"]["transfer-encoding"] == ["chunked"]
    assert "content-length" not in second["headers"]
    assert second["json"] == {"model": "m", "messages": []}

    assert third["body"] == "not json"
    assert third["json"] is None


def test_script_queue_order_then_default() -> None:
    """Scripted steps are consumed in FIFO order, then the default answer returns."""

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        steps: list[dict[str, Any]] = [
            {"status": 500},
            {"content": "second answer", "response_model": "other-model"},
            {
                "status": 201,
                "body": "raw text",
                "headers": {"x-extra": "1"},
                "content_type": "text/plain",
            },
        ]
        resp = await client.post("/_control/script", json={"responses": steps})
        assert (await resp.json()) == {"queued": 3}

        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 500

        resp = await client.post("/v1/chat/completions", json=CHAT)
        data = await resp.json()
        assert data["model"] == "other-model"
        assert data["choices"][0]["message"]["content"] == "second answer"
        assert data["usage"]["completion_tokens"] == 2

        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 201
        assert resp.headers["x-extra"] == "1"
        assert resp.headers["content-type"] == "text/plain"
        assert await resp.text() == "raw text"

        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"] == "hello from alpha"

    run(scenario)


def test_persistent_default_and_reset() -> None:
    """A persistent default applies whenever the queue is empty until reset."""

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        resp = await client.post("/_control/default", json={"status": 429})
        assert resp.status == 200
        await client.post("/_control/script", json={"responses": [{}]})

        statuses = []
        for _ in range(3):
            resp = await client.post("/v1/completions", json={"prompt": "x"})
            statuses.append(resp.status)
        assert statuses == [200, 429, 429]
        assert len(upstream.requests) == 3

        resp = await client.post("/_control/reset")
        assert resp.status == 200
        assert len(upstream.requests) == 0
        resp = await client.post("/v1/completions", json={"prompt": "x"})
        assert resp.status == 200

    run(scenario)


def test_scripted_503_gets_openai_error_body() -> None:
    """A non-2xx step without a body answers with an OpenAI-style error object."""

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        upstream.script({"status": 503})
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert resp.status == 503
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.headers["x-upstream-name"] == "beta"
        assert await resp.json() == {
            "error": {"message": "scripted 503 from beta", "type": "upstream_error", "code": 503}
        }

    run(scenario, FakeUpstream("beta"))


def test_stream_frames_with_usage_and_done() -> None:
    """A stream sends role, content chunks, stop, usage and [DONE] frames in order."""

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        frames = await read_frames(resp)

        assert frames[-1] == "[DONE]"
        chunks = [json.loads(frame) for frame in frames[:-1]]
        assert len(chunks) == 1 + 5 + 1 + 1
        ids = {chunk["id"] for chunk in chunks}
        assert len(ids) == 1
        for chunk in chunks:
            assert chunk["object"] == "chat.completion.chunk"
            assert chunk["model"] == "gpt-test"
            assert isinstance(chunk["created"], int)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
        text = "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:6])
        assert text == "tok0 tok1 tok2 tok3 tok4"
        assert chunks[6]["choices"][0]["finish_reason"] == "stop"
        assert chunks[7]["choices"] == []
        assert chunks[7]["usage"] == {
            "prompt_tokens": 1,
            "completion_tokens": 5,
            "total_tokens": 6,
        }

        # Without include_usage there is no usage chunk; scripted content sets the chunks.
        upstream.script({"content": "one two three"})
        resp = await client.post("/v1/completions", json={"prompt": "p", "stream": True})
        frames = await read_frames(resp)
        assert frames[-1] == "[DONE]"
        chunks = [json.loads(frame) for frame in frames[:-1]]
        texts = [chunk["choices"][0]["text"] for chunk in chunks]
        assert texts == ["", "one", " two", " three", ""]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    run(scenario)


def test_stream_chunks_are_spaced() -> None:
    """With 100 ms spacing the first frame arrives well before the last content chunk."""

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        upstream.script({"chunks": 3, "chunk_interval_ms": 100})
        times: list[float] = []
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        frames = await read_frames(resp, times)
        assert len(frames) == 1 + 3 + 1 + 1
        assert times == sorted(times)
        # Three 100 ms gaps separate the role frame from the last content chunk.
        assert times[3] - times[0] >= 0.15

    run(scenario)


def test_break_after_chunks_aborts_the_stream() -> None:
    """``break_after_chunks`` resets the connection without the final frame or [DONE]."""

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        upstream.script({"break_after_chunks": 2})
        frames: list[str] = []
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            while line := await resp.content.readline():
                if line.startswith(b"data: "):
                    frames.append(line.decode().strip())
        assert len(frames) <= 3
        assert all("[DONE]" not in frame and '"stop"' not in frame for frame in frames)

        # A non-streaming request with the step is dropped before any response.
        upstream.script({"break_after_chunks": 0})
        with pytest.raises(aiohttp.ClientError):
            await client.post("/v1/chat/completions", json=CHAT)

        # The server keeps serving afterwards.
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200

    run(scenario)


def test_embeddings_with_list_input() -> None:
    """Embeddings return one deterministic 8-float vector per input."""

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        body = {"model": "embed-1", "input": ["first text", "second", "first text"]}
        resp = await client.post("/v1/embeddings", json=body)
        assert resp.status == 200
        data = await resp.json()
        assert data["object"] == "list"
        assert data["model"] == "embed-1"
        assert [item["index"] for item in data["data"]] == [0, 1, 2]
        vectors = [item["embedding"] for item in data["data"]]
        assert all(item["object"] == "embedding" for item in data["data"])
        assert all(len(vector) == 8 for vector in vectors)
        assert all(isinstance(x, float) for vector in vectors for x in vector)
        assert vectors[0] == vectors[2] != vectors[1]
        assert data["usage"] == {"prompt_tokens": 5, "total_tokens": 5}

        resp = await client.post("/embeddings", json={"model": "e", "input": "solo"})
        data = await resp.json()
        assert len(data["data"]) == 1

    run(scenario)


def test_invalid_control_requests_are_rejected() -> None:
    """Malformed scripts are refused atomically with a 400."""

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        bad_payloads: list[Any] = [
            {"responses": [{"status": 200}, {"statuz": 500}]},
            {"responses": [{"status": "500"}]},
            {"responses": {}},
            [1, 2],
        ]
        for payload in bad_payloads:
            resp = await client.post("/_control/script", json=payload)
            assert resp.status == 400
            assert "error" in await resp.json()
        resp = await client.post("/_control/default", data=b"{")
        assert resp.status == 400
        assert len(upstream.queue) == 0

    run(scenario)


def test_step_validation() -> None:
    """``Step.from_json`` validates keys, types and ranges."""
    step = Step.from_json({"status": 502, "body": None, "headers": {"retry-after": 3}})
    assert step.status == 502
    assert step.has_body
    assert step.body is None
    assert dict(step.headers) == {"retry-after": "3"}
    assert Step.from_json(step) is step
    for bad in ({"stall": "yes"}, {"chunks": -1}, {"status": 99}, {"delay_ms": True}, "x"):
        with pytest.raises(ValueError):
            Step.from_json(bad)


def test_records_are_capped() -> None:
    """Only the newest ``max_records`` requests are kept."""

    async def scenario(client: Client, upstream: FakeUpstream) -> None:
        for index in range(5):
            await client.post("/v1/completions", json={"prompt": f"p{index}"})

    upstream = run(scenario, FakeUpstream("alpha", max_records=3))
    assert [record["json"]["prompt"] for record in upstream.requests] == ["p2", "p3", "p4"]


def test_start_on_port_zero_and_stall_is_cancellable() -> None:
    """``start`` binds a real port; stalled requests end with the client or the server."""

    async def main() -> None:
        upstream = FakeUpstream("gamma", default={"stall": True})
        runner, port = await start(upstream, "127.0.0.1", 0)
        assert port > 0
        base = f"http://127.0.0.1:{port}"
        stopped = False
        try:
            async with aiohttp.ClientSession() as session:
                with pytest.raises(asyncio.TimeoutError):
                    await session.post(
                        f"{base}/v1/chat/completions",
                        json=CHAT,
                        timeout=aiohttp.ClientTimeout(total=0.2),
                    )
                async with session.get(f"{base}/healthz") as resp:
                    assert resp.status == 200
                pending = asyncio.create_task(session.post(f"{base}/v1/completions", json={}))
                while len(upstream.requests) < 2:
                    await asyncio.sleep(0.01)
                started = time.monotonic()
                await runner.cleanup()
                stopped = True
                assert time.monotonic() - started < 3.0
                (outcome,) = await asyncio.gather(pending, return_exceptions=True)
                if isinstance(outcome, aiohttp.ClientResponse):
                    assert outcome.status == 503
                else:
                    assert isinstance(outcome, aiohttp.ClientError)
        finally:
            if not stopped:
                await runner.cleanup()

    asyncio.run(main())
