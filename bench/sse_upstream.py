"""A tiny OpenAI-style streaming upstream for the time-to-first-chunk benchmark.

Why not an Envoy ``direct_response``: a direct response is one body sent at once, so it cannot show
whether the gateway passes the first chunk on before the rest exists. This server answers every
request (any path) with ``text/event-stream``: the first chunk at once, then ``--chunks`` content
chunks ``--interval-ms`` apart, a usage chunk and ``data: [DONE]``. It is a raw asyncio protocol
(HTTP/1.1, keep-alive, chunked), so its own cost per request is small; it runs on the client core.

Only the streaming measurement goes here (mock Envoy routes requests carrying ``x-bench-stream`` to
it); the throughput runs never touch it. Requests carrying ``x-bench-echo`` (the sanity check of
bench/run.py) get a plain JSON chat completion instead, whose ``bench_echo`` tells what arrived:
the request's ``model``, its framing (``content-length`` or chunked) and its body size, so a setup
that rewrites the body shows whether the rewrite reached the upstream intact.

    python bench/sse_upstream.py --port 18998 [--chunks 10 --interval-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

MODEL = "bench-stream-model"


def _event(payload: dict[str, object] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    raw = f"data: {data}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(raw), raw)


def _chunk(index: int, content: str | None, finish: str | None = None) -> dict[str, object]:
    delta: dict[str, str] = {}
    if index == 0:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _dechunk(data: bytes) -> bytes:
    """The payload of a complete chunked body."""
    out = b""
    while True:
        line_end = data.index(b"\r\n")
        size = int(data[:line_end].split(b";")[0], 16)
        if size == 0:
            return out
        out += data[line_end + 2 : line_end + 2 + size]
        data = data[line_end + 4 + size :]


HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)


class StreamProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered one after the other."""

    def __init__(self, chunks: int, interval: float) -> None:
        self.chunks = chunks
        self.interval = interval
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._maybe_answer()

    def _maybe_answer(self) -> None:
        if self.busy:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1")
        length = 0
        chunked = False
        echo = False
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip() or 0)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "x-bench-echo":
                echo = True
        if chunked:  # skip to the terminating chunk
            stop = self.buffer.find(b"\r\n0\r\n\r\n", end)
            if stop < 0:
                return
            total = stop + 7
        else:
            total = end + 4 + length
        if len(self.buffer) < total:
            return
        body = self.buffer[end + 4 : total]
        self.buffer = self.buffer[total:]
        if echo:
            self._echo(_dechunk(body) if chunked else body, length, chunked)
            self._maybe_answer()
            return
        self.busy = True
        asyncio.get_running_loop().create_task(self._answer())

    def _echo(self, body: bytes, length: int, chunked: bool) -> None:
        """Answer with a chat completion that tells what reached us."""
        try:
            model = json.loads(body).get("model")
        except ValueError:
            model = None
        reply = json.dumps(
            {
                "id": "chatcmpl-bench-echo",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model or "unparsable",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "echo"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                "bench_echo": {
                    "model": model,
                    "framing": "chunked" if chunked else "content-length",
                    "content_length": None if chunked else length,
                    "body_bytes": len(body),
                },
            }
        ).encode()
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(reply), reply)
        )

    async def _answer(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(HEAD + _event(_chunk(0, "")))
        for i in range(1, self.chunks + 1):
            await asyncio.sleep(self.interval)
            if transport.is_closing():
                return
            transport.write(_event(_chunk(i, f"tok{i} ")))
        usage = {
            **_chunk(self.chunks + 1, None, "stop"),
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": self.chunks,
                "total_tokens": 12 + self.chunks,
            },
        }
        usage["choices"] = []
        transport.write(_event(usage) + _event("[DONE]") + b"0\r\n\r\n")
        self.busy = False
        self._maybe_answer()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--interval-ms", type=float, default=2.0)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: StreamProtocol(args.chunks, args.interval_ms / 1000.0), "127.0.0.1", args.port
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
