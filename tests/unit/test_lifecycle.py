"""Graceful drain of the real gRPC server, driven by a grpc.aio client on loopback (no Envoy)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc._gen import ext_proc_pb2 as pb
from extproc.envoy_config import REQUEST_NS
from extproc.processor import Runtime
from extproc.server import (
    PROCESS_METHOD,
    RunningServer,
    ServeOptions,
    ShutdownSignals,
    serve,
    start_server,
)
from tests.integration.stack import free_port
from tests.unit.support import body_message, client_headers, headers_message, table_from_yaml

CONFIG = """
providers:
  - name: a
    type: openai-compatible
    base_url: http://127.0.0.1:18001/v1
    models: [{name: m1}]
virtual_model_groups:
  - name: prod
    virtual_models:
      - name: chat
        routing_config:
          type: priority-based-routing
          load_balance_targets: [{target: a/m1, priority: 0}]
"""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def request_headers() -> pb.ProcessingRequest:
    return headers_message("request_headers", client_headers(authority=None))


def request_body() -> pb.ProcessingRequest:
    return body_message("request_body", json.dumps({"model": "prod/chat", "messages": []}).encode())


def response_headers(status: int) -> pb.ProcessingRequest:
    return headers_message("response_headers", [(":status", str(status))])


class Client:
    """Opens ext_proc streams and health checks against a running server."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.process = channel.stream_stream(
            PROCESS_METHOD,
            request_serializer=pb.ProcessingRequest.SerializeToString,
            response_deserializer=pb.ProcessingResponse.FromString,
        )
        self.health = health_pb2_grpc.HealthStub(channel)

    def stream(self, role: str) -> Any:
        return self.process(metadata=(("x-vm-filter", role),))

    async def status(self, service: str = "") -> int:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)


TRANSPORTS = pytest.mark.parametrize("transport", ["h2", "grpcio"])


async def started(transport: str) -> RunningServer:
    runtime = Runtime(table_from_yaml(CONFIG))
    server = await start_server(runtime, "127.0.0.1:0", transport)
    assert server.kind == transport
    return server


@TRANSPORTS
def test_drain_refuses_new_requests_and_lets_in_flight_ones_finish(transport: str) -> None:
    async def scenario() -> None:
        server = await started(transport)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            client = Client(channel)
            assert await client.status() == SERVING
            assert await client.status("envoy.service.ext_proc.v3.ExternalProcessor") == SERVING

            in_flight = client.stream("router")
            await in_flight.write(request_headers())
            assert (await in_flight.read()).WhichOneof("response") == "request_headers"
            await in_flight.write(request_body())
            planned = await in_flight.read()
            request_id = (
                planned.dynamic_metadata.fields[REQUEST_NS]
                .struct_value.fields["request_id"]
                .string_value
            )
            assert server.active_streams == 1

            drain = asyncio.create_task(server.drain(10))
            for _ in range(100):
                if server.draining:
                    break
                await asyncio.sleep(0.01)
            assert await client.status() == NOT_SERVING
            assert await client.status("envoy.service.ext_proc.v3.ExternalProcessor") == NOT_SERVING

            # A new client request gets a retryable 503 in OpenAI's error shape...
            refused = client.stream("router")
            await refused.write(request_headers())
            answer = (await refused.read()).immediate_response
            assert answer.status.code == 503
            assert json.loads(answer.body)["error"]["code"] == "draining"
            assert answer.details == "vmrouter_draining"
            # ...and Envoy's pass of that local reply through the response path continues.
            await refused.write(response_headers(503))
            assert (await refused.read()).WhichOneof("response") == "response_headers"
            await refused.done_writing()

            # An attempt of the request in flight (a new upstream-level stream) is still served.
            attempt = client.stream("upstream")
            message = request_headers()
            message.metadata_context.filter_metadata[REQUEST_NS].update({"request_id": request_id})
            await attempt.write(message)
            reply = await attempt.read()
            assert reply.WhichOneof("response") == "request_headers"
            assert reply.request_headers.response.status == pb.CommonResponse.CONTINUE_AND_REPLACE
            await attempt.write(response_headers(200))
            await attempt.read()
            await attempt.done_writing()

            await asyncio.sleep(0.1)
            assert not drain.done()  # the router stream is still open

            await in_flight.write(response_headers(200))
            assert (await in_flight.read()).WhichOneof("response") == "response_headers"
            await in_flight.done_writing()
            assert await asyncio.wait_for(drain, 5) == 0
            assert server.servicer.drain.refused == 1

    asyncio.run(scenario())


@TRANSPORTS
def test_drain_is_bounded_and_cuts_streams_left_open(transport: str) -> None:
    async def scenario() -> tuple[int, float, grpc.StatusCode]:
        server = await started(transport)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stuck = Client(channel).stream("router")
            await stuck.write(request_headers())
            await stuck.read()
            loop = asyncio.get_running_loop()
            began = loop.time()
            cut = await server.drain(0.3)
            took = loop.time() - began
            try:
                await stuck.read()
            except grpc.aio.AioRpcError as exc:
                return cut, took, exc.code()
            return cut, took, grpc.StatusCode.OK

    cut, took, code = asyncio.run(scenario())
    assert cut == 1
    assert 0.3 <= took < 2
    assert code != grpc.StatusCode.OK


@TRANSPORTS
def test_drain_second_signal_hurries(transport: str) -> None:
    async def scenario() -> tuple[int, float]:
        server = await started(transport)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stuck = Client(channel).stream("router")
            await stuck.write(request_headers())
            await stuck.read()
            hurry = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, hurry.set)
            began = loop.time()
            cut = await server.drain(30, hurry=hurry)
            return cut, loop.time() - began

    cut, took = asyncio.run(scenario())
    assert cut == 1 and took < 2


def test_shutdown_signals_drain_then_hurry_and_hangup_reloads() -> None:
    async def scenario() -> tuple[bool, bool, bool, int]:
        hangups: list[int] = []
        signals = ShutdownSignals(on_hangup=lambda: hangups.append(1))
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(signals.requested.wait(), 2)
            first_hurry = signals.hurry.is_set()
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(signals.hurry.wait(), 2)
            return signals.requested.is_set(), first_hurry, signals.hurry.is_set(), len(hangups)
        finally:
            signals.remove()

    requested, first_hurry, hurried, hangups = asyncio.run(scenario())
    assert requested and not first_hurry and hurried
    assert hangups == 1


def test_serve_writes_clusters_serves_and_exits_zero_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    port = free_port()
    options = ServeOptions(
        config=config,
        listen=f"127.0.0.1:{port}",
        xds_dir=tmp_path / "xds",
        reload_interval=0.05,
        drain_seconds=2,
        environ={},
    )

    async def scenario() -> tuple[int, int]:
        task = asyncio.create_task(serve(options))
        status = -1
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = Client(channel)
            for _ in range(200):
                try:
                    status = await client.status()
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)
        return status, await asyncio.wait_for(task, 5)

    status, code = asyncio.run(scenario())
    assert status == SERVING and code == 0
    assert "provider_a" in (tmp_path / "xds" / "cds.yaml").read_text()
