"""Scriptable fake OpenAI-compatible LLM upstream.

This module owns the demo/test upstream server: an aiohttp application that answers
``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` (with or without the
``/v1`` prefix) in the OpenAI wire format, records every API request it receives, and can be
scripted over HTTP (``/_control/*``) to return errors, custom bodies, slow or broken streams,
or to stall forever. ``make run`` starts two of these as demo upstreams and the integration
tests drive them from behind a real Envoy.

Run it from the command line with::

    python -m extproc.demo.upstream --port 8001 --name alpha [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import re
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypedDict

from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "DEFAULT_STREAM_CHUNKS",
    "EMBEDDING_DIMENSIONS",
    "MAX_QUEUED_STEPS",
    "MAX_RECORDS",
    "STALL_SECONDS",
    "UPSTREAM_KEY",
    "FakeUpstream",
    "RecordedRequest",
    "Step",
    "build_app",
    "main",
    "start",
]

MAX_RECORDS: Final = 100_000
"""Maximum number of recorded requests kept; the oldest are dropped first."""

MAX_QUEUED_STEPS: Final = 100_000
"""Maximum number of scripted steps waiting in the queue."""

STALL_SECONDS: Final = 3600.0
"""How long a ``stall`` step sleeps before answering (unless interrupted)."""

DEFAULT_STREAM_CHUNKS: Final = 5
"""Number of ``tokN`` content chunks streamed when a step sets neither chunks nor content."""

EMBEDDING_DIMENSIONS: Final = 8
"""Length of every fake embedding vector."""

_POLL_SECONDS: Final = 0.05
_ABORT_GRACE_SECONDS: Final = 0.02
_CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024
_DEFAULT_MODEL: Final = "fake-model"

_STEP_KEYS: Final = frozenset(
    {
        "status",
        "body",
        "headers",
        "delay_ms",
        "stall",
        "chunks",
        "chunk_interval_ms",
        "break_after_chunks",
        "response_model",
        "content",
        "content_type",
    }
)

_Kind = Literal["chat", "completions", "embeddings"]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)


class RecordedRequest(TypedDict):
    """One API request as received by the fake upstream."""

    method: str
    path: str
    query: str
    headers: dict[str, list[str]]
    body: str
    json: Any
    received_at: float


def _get_int(raw: Mapping[str, Any], key: str, minimum: int, maximum: int | None) -> int | None:
    if key not in raw or raw[key] is None:
        return None
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"step key {key!r} must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"step key {key!r} out of range: {value}")
    return value


def _get_millis(raw: Mapping[str, Any], key: str) -> float:
    value = raw.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"step key {key!r} must be a number")
    if not 0 <= value <= STALL_SECONDS * 1000:
        raise ValueError(f"step key {key!r} out of range: {value}")
    return float(value)


def _get_str(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"step key {key!r} must be a string")


def _get_headers(raw: Mapping[str, Any]) -> dict[str, str]:
    value = raw.get("headers")
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("step key 'headers' must be an object")
    headers: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError("header names must be non-empty strings")
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ValueError(f"header {name!r} must have a string or number value")
        headers[name] = str(item)
    return headers


@dataclass(frozen=True)
class Step:
    """One scripted behaviour; every field is optional and defaults to a plain 200 answer.

    Attributes:
        status: HTTP status to answer with.
        body: Replacement body (JSON value, or a string sent verbatim); used only when
            ``has_body`` is true.
        has_body: Whether ``body`` was given (so that a JSON ``null`` body can be scripted).
        headers: Extra response headers.
        delay_ms: Sleep before sending the response headers.
        stall: Sleep for ``STALL_SECONDS`` before answering (interrupted when the client goes
            away or the server shuts down).
        chunks: Number of ``tokN`` content chunks for streams (ignored when ``content`` is set).
        chunk_interval_ms: Sleep before each streamed content chunk.
        break_after_chunks: Abort the TCP connection (RST) after this many content chunks of
            a stream; for non-streaming requests, abort before sending anything.
        response_model: ``model`` value to put in answers instead of the requested one.
        content: Assistant content; for streams each word becomes one chunk.
        content_type: Content-Type override for whatever is sent.
    """

    status: int = 200
    body: Any = None
    has_body: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_ms: float = 0.0
    stall: bool = False
    chunks: int | None = None
    chunk_interval_ms: float = 0.0
    break_after_chunks: int | None = None
    response_model: str | None = None
    content: str | None = None
    content_type: str | None = None

    @classmethod
    def from_json(cls, raw: object) -> Step:
        """Validate a JSON step object (or pass a ``Step`` through unchanged).

        Raises:
            ValueError: If the object is not a valid step (unknown keys, wrong types, ranges).
        """
        if isinstance(raw, Step):
            return raw
        if not isinstance(raw, Mapping):
            raise ValueError("a step must be a JSON object")
        unknown = sorted(str(key) for key in raw if key not in _STEP_KEYS)
        if unknown:
            raise ValueError(f"unknown step keys: {unknown}")
        stall = raw.get("stall", False)
        if not isinstance(stall, bool):
            raise ValueError("step key 'stall' must be a boolean")
        status = _get_int(raw, "status", 200, 599)
        return cls(
            status=200 if status is None else status,
            body=raw.get("body"),
            has_body="body" in raw,
            headers=_get_headers(raw),
            delay_ms=_get_millis(raw, "delay_ms"),
            stall=stall,
            chunks=_get_int(raw, "chunks", 0, 100_000),
            chunk_interval_ms=_get_millis(raw, "chunk_interval_ms"),
            break_after_chunks=_get_int(raw, "break_after_chunks", 0, None),
            response_model=_get_str(raw, "response_model"),
            content=_get_str(raw, "content"),
            content_type=_get_str(raw, "content_type"),
        )


class FakeUpstream:
    """State of one fake upstream: its name, scripted queue, default step and records.

    All mutation happens on the event loop thread; the object is not thread-safe.

    Attributes:
        name: Upstream name, sent back in ``x-upstream-name`` and default contents.
        queue: FIFO of scripted steps; each API request consumes one.
        requests: Recorded API requests, oldest first, capped at ``max_records``.
        default: Step used when the queue is empty.
    """

    def __init__(
        self,
        name: str,
        *,
        default: Step | Mapping[str, Any] | None = None,
        max_records: int = MAX_RECORDS,
    ) -> None:
        """Create an upstream called ``name``.

        Args:
            name: Upstream name.
            default: Initial persistent default step (restored by ``reset``).
            max_records: Cap on recorded requests.
        """
        self.name = name
        self.queue: deque[Step] = deque()
        self.requests: deque[RecordedRequest] = deque(maxlen=max_records)
        self._initial_default = Step() if default is None else Step.from_json(default)
        self.default = self._initial_default
        self._ids = itertools.count(1)

    def script(self, *steps: Step | Mapping[str, Any]) -> int:
        """Append steps to the queue (all or nothing) and return the new queue length.

        Raises:
            ValueError: If a step is invalid or the queue would exceed ``MAX_QUEUED_STEPS``.
        """
        parsed = [Step.from_json(step) for step in steps]
        if len(self.queue) + len(parsed) > MAX_QUEUED_STEPS:
            raise ValueError(f"script queue is limited to {MAX_QUEUED_STEPS} steps")
        self.queue.extend(parsed)
        return len(self.queue)

    def set_default(self, step: Step | Mapping[str, Any]) -> None:
        """Set the persistent step used whenever the queue is empty."""
        self.default = Step.from_json(step)

    def reset(self) -> None:
        """Clear the queue and the records and restore the initial default step."""
        self.queue.clear()
        self.requests.clear()
        self.default = self._initial_default

    def next_step(self) -> Step:
        """Consume the next queued step, or return the default one if the queue is empty."""
        return self.queue.popleft() if self.queue else self.default

    def next_id(self) -> int:
        """Return the next response sequence number (1, 2, ...)."""
        return next(self._ids)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
        """Serve this upstream; see the module-level ``start``."""
        return await start(self, host, port)


@dataclass
class _AppState:
    closing: bool = False


UPSTREAM_KEY: Final = web.AppKey("fake_upstream", FakeUpstream)
"""Application key under which ``build_app`` stores its ``FakeUpstream``."""

_STATE_KEY: Final = web.AppKey("fake_upstream_state", _AppState)


# --------------------------------------------------------------------------- helpers


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _words(value: Any) -> int:
    """Count prompt units: words of strings, one per integer token, recursively in lists."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    return 0


def _content_words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += len(part.split())
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"].split())
        return total
    return 0


def _prompt_tokens(kind: _Kind, body: Mapping[str, Any]) -> int:
    if kind == "chat":
        messages = body.get("messages")
        total = 0
        if isinstance(messages, list):
            total = sum(
                _content_words(message.get("content"))
                for message in messages
                if isinstance(message, dict)
            )
    elif kind == "completions":
        total = _words(body.get("prompt"))
    else:
        total = _words(body.get("input"))
    return max(total, 1)


def _split_words(text: str) -> list[str]:
    """Split text into word pieces whose concatenation is the original text."""
    pieces: list[str] = re.findall(r"\s*\S+", text)
    consumed = sum(len(piece) for piece in pieces)
    if pieces and consumed < len(text):
        pieces[-1] += text[consumed:]
    return pieces


def _stream_pieces(step: Step) -> list[str]:
    if step.content is not None:
        return _split_words(step.content)
    count = DEFAULT_STREAM_CHUNKS if step.chunks is None else step.chunks
    return [f"tok{i}" if i == 0 else f" tok{i}" for i in range(count)]


def _embedding_inputs(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]  # a single pre-tokenised input
        return list(value)
    return [value]


def _fake_vector(item: Any) -> list[float]:
    digest = hashlib.sha256(json.dumps(item, sort_keys=True).encode()).digest()
    return [
        round(int.from_bytes(digest[4 * i : 4 * i + 4], "big") / 0xFFFFFFFF * 2.0 - 1.0, 6)
        for i in range(EMBEDDING_DIMENSIONS)
    ]


def _response_headers(step: Step, content_type: str) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict(step.headers)
    if step.content_type is not None:
        headers["Content-Type"] = step.content_type
    elif "Content-Type" not in headers:
        headers["Content-Type"] = content_type
    return headers


def _error_response(status: int, message: str, error_type: str) -> web.Response:
    error = {"error": {"message": message, "type": error_type, "code": status}}
    return web.json_response(error, status=status)


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _pause(request: web.Request, seconds: float) -> bool:
    """Sleep ``seconds``; return False early if the client left or the server is stopping."""
    state = request.app[_STATE_KEY]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        if state.closing or _client_gone(request):
            return False
        remaining = deadline - loop.time()
        if remaining <= 0:
            return True
        await asyncio.sleep(min(remaining, _POLL_SECONDS))


def _abort(request: web.BaseRequest) -> None:
    """Close the connection abruptly so that the peer sees a TCP reset."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _record(request: web.Request, upstream: FakeUpstream) -> Any:
    received_at = time.monotonic()
    raw = await request.read()
    headers: dict[str, list[str]] = {}
    for key, value in request.headers.items():
        headers.setdefault(key.lower(), []).append(value)
    parsed = _parse_json(raw)
    upstream.requests.append(
        RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=headers,
            body=raw.decode("utf-8", errors="replace"),
            json=parsed,
            received_at=received_at,
        )
    )
    return parsed


# --------------------------------------------------------------------------- answers


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _plain_answer(
    upstream: FakeUpstream, step: Step, kind: _Kind, body: Mapping[str, Any], model: str
) -> web.Response:
    prompt = _prompt_tokens(kind, body)
    answer: dict[str, Any]
    if kind == "embeddings":
        inputs = _embedding_inputs(body.get("input"))
        answer = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": _fake_vector(item)}
                for index, item in enumerate(inputs)
            ],
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    else:
        content = f"hello from {upstream.name}" if step.content is None else step.content
        usage = _usage(prompt, len(content.split()))
        number = upstream.next_id()
        created = int(time.time())
        if kind == "chat":
            answer = {
                "id": f"chatcmpl-{number}",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        else:
            answer = {
                "id": f"cmpl-{number}",
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "text": content, "logprobs": None, "finish_reason": "stop"}
                ],
                "usage": usage,
            }
    return web.Response(
        status=step.status,
        body=_json_bytes(answer),
        headers=_response_headers(step, "application/json"),
    )


async def _stream_answer(
    request: web.Request,
    upstream: FakeUpstream,
    step: Step,
    kind: _Kind,
    body: Mapping[str, Any],
    model: str,
) -> web.StreamResponse:
    chat = kind == "chat"
    pieces = _stream_pieces(step)
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    base: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{upstream.next_id()}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }

    def frame(delta: dict[str, Any] | None, text: str, finish: str | None) -> bytes:
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["delta"] = delta if delta is not None else {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        chunk = {**base, "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return b"data: " + _json_bytes(chunk) + b"\n\n"

    headers = _response_headers(step, "text/event-stream")
    headers.setdefault("Cache-Control", "no-cache")
    response = web.StreamResponse(status=step.status, headers=headers)
    interval = step.chunk_interval_ms / 1000.0
    limit = step.break_after_chunks
    try:
        await response.prepare(request)
        await response.write(frame({"role": "assistant"} if chat else None, "", None))
        for index, piece in enumerate(pieces):
            if limit is not None and index >= limit:
                break
            if not await _pause(request, interval):
                _abort(request)
                return response
            await response.write(frame(None, piece, None))
        if limit is not None:
            # Let the peer read what was sent, then reset the connection mid-stream.
            await asyncio.sleep(_ABORT_GRACE_SECONDS)
            _abort(request)
            return response
        await response.write(frame({} if chat else None, "", "stop"))
        if include_usage:
            usage_chunk = {
                **base,
                "choices": [],
                "usage": _usage(_prompt_tokens(kind, body), len(pieces)),
            }
            await response.write(b"data: " + _json_bytes(usage_chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError:
        log.debug("client of %s went away mid-stream", upstream.name)
    return response


async def _answer(request: web.Request, kind: _Kind) -> web.StreamResponse:
    upstream = request.app[UPSTREAM_KEY]
    parsed = await _record(request, upstream)
    step = upstream.next_step()
    body: Mapping[str, Any] = parsed if isinstance(parsed, dict) else {}

    if step.stall and not await _pause(request, STALL_SECONDS):
        return _error_response(503, f"{upstream.name} stopped stalling", "upstream_error")
    if step.delay_ms and not await _pause(request, step.delay_ms / 1000.0):
        return _error_response(503, f"{upstream.name} interrupted", "upstream_error")

    streaming = kind != "embeddings" and body.get("stream") is True
    if step.break_after_chunks is not None and not streaming:
        _abort(request)
        return web.Response(status=step.status)
    if step.has_body:
        data = step.body.encode() if isinstance(step.body, str) else _json_bytes(step.body)
        return web.Response(
            status=step.status, body=data, headers=_response_headers(step, "application/json")
        )
    if not 200 <= step.status < 300:
        error = {
            "error": {
                "message": f"scripted {step.status} from {upstream.name}",
                "type": "upstream_error",
                "code": step.status,
            }
        }
        return web.Response(
            status=step.status,
            body=_json_bytes(error),
            headers=_response_headers(step, "application/json"),
        )

    requested = body.get("model")
    model = step.response_model or (requested if isinstance(requested, str) else _DEFAULT_MODEL)
    if streaming:
        return await _stream_answer(request, upstream, step, kind, body, model)
    return _plain_answer(upstream, step, kind, body, model)


def _api_handler(kind: _Kind) -> _Handler:
    async def _handle(request: web.Request) -> web.StreamResponse:
        return await _answer(request, kind)

    return _handle


# --------------------------------------------------------------------------- control plane


async def _read_control_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"control body is not valid JSON: {exc}") from exc


async def _control_script(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM_KEY]
    try:
        payload = await _read_control_json(request)
        steps = payload.get("responses") if isinstance(payload, dict) else None
        if not isinstance(steps, list):
            raise ValueError('expected {"responses": [step, ...]}')
        queued = upstream.script(*steps)
    except ValueError as exc:
        return _error_response(400, str(exc), "invalid_request_error")
    return web.json_response({"queued": queued})


async def _control_default(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM_KEY]
    try:
        upstream.set_default(await _read_control_json(request))
    except ValueError as exc:
        return _error_response(400, str(exc), "invalid_request_error")
    return web.json_response({"ok": True})


async def _control_reset(request: web.Request) -> web.StreamResponse:
    request.app[UPSTREAM_KEY].reset()
    return web.json_response({"ok": True})


async def _control_requests(request: web.Request) -> web.StreamResponse:
    return web.json_response(list(request.app[UPSTREAM_KEY].requests))


async def _healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


# --------------------------------------------------------------------------- app / runner


def build_app(upstream: FakeUpstream) -> web.Application:
    """Build the aiohttp application serving ``upstream``.

    The application stores ``upstream`` under ``UPSTREAM_KEY``. Every response carries
    ``x-upstream-name`` (unless a scripted header already sets it).
    """
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app[UPSTREAM_KEY] = upstream
    app[_STATE_KEY] = _AppState()

    async def _stamp_name(request: web.Request, response: web.StreamResponse) -> None:
        if "x-upstream-name" not in response.headers:
            response.headers["x-upstream-name"] = upstream.name

    async def _on_shutdown(app: web.Application) -> None:
        app[_STATE_KEY].closing = True

    app.on_response_prepare.append(_stamp_name)
    app.on_shutdown.append(_on_shutdown)

    kinds: tuple[tuple[str, _Kind], ...] = (
        ("/chat/completions", "chat"),
        ("/completions", "completions"),
        ("/embeddings", "embeddings"),
    )
    for suffix, kind in kinds:
        handler = _api_handler(kind)
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + suffix, handler)
    app.router.add_post("/_control/script", _control_script)
    app.router.add_post("/_control/default", _control_default)
    app.router.add_post("/_control/reset", _control_reset)
    app.router.add_get("/_control/requests", _control_requests)
    app.router.add_get("/healthz", _healthz)
    return app


async def start(
    upstream: FakeUpstream,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_timeout: float = 5.0,
) -> tuple[web.AppRunner, int]:
    """Start serving ``upstream`` on ``host:port`` (port 0 picks a free port).

    Handlers are cancelled when their client disconnects. Stop the server with
    ``await runner.cleanup()``; stalled requests and slow streams end promptly then.

    Returns:
        The running ``AppRunner`` and the port actually bound.
    """
    runner = web.AppRunner(
        build_app(upstream), handler_cancellation=True, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound_port


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.demo.upstream",
        description="Fake OpenAI-compatible LLM upstream for demos and tests.",
    )
    parser.add_argument("--port", type=int, default=8001, help="port to bind (0 = any free)")
    parser.add_argument("--name", default="upstream", help="upstream name (x-upstream-name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    return parser.parse_args(argv)


async def _serve(name: str, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        runner, bound_port = await start(FakeUpstream(name), host, port)
        try:
            shown_host = f"[{host}]" if ":" in host else host
            print(f"fake upstream {name} listening on http://{shown_host}:{bound_port}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake upstream until SIGINT/SIGTERM; return the process exit status."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(_serve(args.name, args.host, args.port))
    except OSError as exc:
        log.error(
            "fake upstream %s could not serve on %s:%s: %s", args.name, args.host, args.port, exc
        )
        return 1
    log.info("fake upstream %s stopped", args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
