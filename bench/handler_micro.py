#!/usr/bin/env python3
"""Micro-benchmark of the ext_proc's handler path: the five messages of one request, in process.

What ``make bench`` cannot separate: how much of the ext_proc's CPU per request is our handler
code (decode, route, build replies, record) rather than the transport and the kernel. Each
request here is what Envoy sends for a plain chat completion routed by ``bench/gateway.yaml``
(router-level request headers and buffered body; upstream-level request headers, response
headers and buffered response body), as serialized ``ProcessingRequest`` bytes fed to
``servicer.ProcessCall`` exactly as the HTTP/2 transport does, replies serialized; no sockets.
Telemetry is on (the Prometheus reader ``serve`` uses).

    .venv/bin/python bench/handler_micro.py [--requests 3000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc import envoy  # noqa: E402
from extproc.envoy_config import REQUEST_NS  # noqa: E402
from extproc.processor import Runtime  # noqa: E402
from extproc.reload import load_config_file  # noqa: E402
from extproc.servicer import ExtProcServicer  # noqa: E402
from extproc.telemetry import otlp_telemetry  # noqa: E402

CLIENT_HEADERS = [
    (":authority", "127.0.0.1:10000"),
    (":path", "/v1/chat/completions"),
    (":method", "POST"),
    (":scheme", "http"),
    ("content-type", "application/json"),
    ("content-length", "0"),
    ("user-agent", "OpenAI/Python 1.55.0"),
    ("accept", "application/json"),
    ("authorization", "Bearer sk-client"),
    ("x-forwarded-proto", "http"),
    ("x-request-id", "5b1a8f53-0d27-4b3e-9d39-2f1f3c1b6a7e"),
]
BODY = {
    "model": "prod-chat",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello in five words, please."},
    ],
    "temperature": 0.7,
}
RESPONSE = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1763700000,
    "model": "bench-mock-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there, nice to meet."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28},
}
RESPONSE_HEADERS = [
    (":status", "200"),
    ("content-type", "application/json"),
    ("content-length", str(len(json.dumps(RESPONSE)))),
    ("date", "Sat, 21 Nov 2026 08:00:00 GMT"),
    ("server", "envoy"),
    ("x-envoy-upstream-service-time", "1"),
]


def headers_message(kind: str, headers: list[tuple[str, str]]) -> envoy.ProcessingRequest:
    request = envoy.ProcessingRequest()
    message = getattr(request, kind)
    for key, value in headers:
        header = message.headers.headers.add()
        header.key = key
        header.raw_value = value.encode()
    return request


def body_message(kind: str, body: bytes) -> bytes:
    request = envoy.ProcessingRequest()
    getattr(request, kind).body = body
    getattr(request, kind).end_of_stream = True
    return request.SerializeToString()


class Capture:
    """The send half of a call: keeps the last reply."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata = metadata
        self.replies: list[bytes] = []

    def send_message(self, data: bytes) -> None:
        self.replies.append(data)

    def finish(self, code: int = 0, message: str = "") -> None:
        pass


class Request:
    """The five messages of one request, serialized once."""

    def __init__(self) -> None:
        body = json.dumps(BODY).encode()
        headers = [(k, str(len(body)) if k == "content-length" else v) for k, v in CLIENT_HEADERS]
        self.router_headers = headers_message("request_headers", headers).SerializeToString()
        self.router_body = body_message("request_body", body)
        self.upstream_headers = [
            *headers,
            ("x-envoy-attempt-count", "1"),
            ("x-envoy-expected-rq-timeout-ms", "60000"),
        ]
        self.response_headers = headers_message(
            "response_headers", RESPONSE_HEADERS
        ).SerializeToString()
        self.response_body = body_message("response_body", json.dumps(RESPONSE).encode())

    def upstream(self, request_id: str) -> bytes:
        message = headers_message("request_headers", self.upstream_headers)
        message.metadata_context.filter_metadata[REQUEST_NS].update({"request_id": request_id})
        return message.SerializeToString()


def one_request(
    servicer: ExtProcServicer, messages: Request, timings: dict[str, list[float]]
) -> None:
    clock = time.perf_counter
    router_call = Capture({"x-vm-filter": "router"})
    started = clock()
    router = servicer.open_call(router_call)  # type: ignore[arg-type]
    router.on_message(messages.router_headers)
    router.on_message(messages.router_body)
    routed = clock()
    reply = envoy.ProcessingResponse.FromString(router_call.replies[-1])
    request_id = reply.dynamic_metadata.fields[REQUEST_NS].struct_value.fields["request_id"]
    upstream_message = messages.upstream(request_id.string_value)  # what Envoy forwards
    resumed = clock()
    upstream_call = Capture({"x-vm-filter": "upstream"})
    upstream = servicer.open_call(upstream_call)  # type: ignore[arg-type]
    upstream.on_message(upstream_message)
    upstream.on_message(messages.response_headers)
    upstream.on_message(messages.response_body)
    upstream.on_end()
    router.on_end()
    finished = clock()
    assert len(router_call.replies) == 2 and len(upstream_call.replies) == 3, "a reply is missing"
    timings["router (request headers + body)"].append(routed - started)
    timings["upstream (request headers, response headers + body)"].append(finished - resumed)
    timings["whole request"].append(routed - started + finished - resumed)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("BENCH_OPENAI_API_KEY", "sk-bench-openai")
    os.environ.setdefault("BENCH_AZURE_API_KEY", "sk-bench-azure")
    loaded = load_config_file(ROOT / "bench" / "gateway.yaml")
    runtime = Runtime(loaded.table, telemetry=otlp_telemetry())
    servicer = ExtProcServicer(runtime)
    messages = Request()
    timings: dict[str, list[float]] = {
        "router (request headers + body)": [],
        "upstream (request headers, response headers + body)": [],
        "whole request": [],
    }
    for _ in range(min(500, args.requests)):  # warm-up: caches, health windows
        one_request(servicer, messages, timings)
    for values in timings.values():
        values.clear()
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    for _ in range(args.requests):
        one_request(servicer, messages, timings)
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    runtime.telemetry.shutdown()
    return {
        name: {
            "median_us": round(statistics.median(values) * 1e6, 1),
            "p90_us": round(statistics.quantiles(values, n=10)[-1] * 1e6, 1),
        }
        for name, values in timings.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--profile", action="store_true", help="cProfile the timed requests")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(f"\nhandler path, {args.requests} requests (bench/gateway.yaml, telemetry on):\n")
    print("| part | median (us) | p90 (us) |\n|---|---:|---:|")
    for name, row in results.items():
        print(f"| {name} | {row['median_us']:,.1f} | {row['p90_us']:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
