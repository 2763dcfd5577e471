"""Our HTTP/2 gRPC server (``extproc.h2grpc``) against a real gRPC client (grpcio), on loopback.

grpcio's client is strict about HTTP/2 and gRPC framing, so every call here is also a
conformance check: flow control both ways with messages far larger than the default windows,
many concurrent streams, cancellation, trailers-only errors, Unix sockets, a non-HTTP/2 peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvloop

from extproc import envoy
from extproc.h2grpc import (
    INTERNAL,
    PREFACE,
    RESOURCE_EXHAUSTED,
    Call,
    CallHandler,
    GrpcServer,
)
from extproc.servicer import ExtProcServicer, ProcessCall, RefusingStream

ECHO = "/test.Echo/Stream"
FAIL = "/test.Echo/Fail"


def _identity(data: bytes) -> bytes:
    return data


class Echo:
    """Answers every message with itself; ends the call when the client does."""

    def __init__(self, call: Call, log: list[str]) -> None:
        self.call = call
        self.log = log

    def on_message(self, data: bytes) -> None:
        self.call.send_message(data)

    def on_end(self) -> None:
        self.log.append("end")
        self.call.finish()

    def on_cancel(self) -> None:
        self.log.append("cancel")


class FailAfterOne:
    """Answers the first message, then ends the call with an error before the client does."""

    def __init__(self, call: Call) -> None:
        self.call = call

    def on_message(self, data: bytes) -> None:
        self.call.send_message(data)
        self.call.finish(INTERNAL, "kaputt: 100% «broken»")

    def on_end(self) -> None:
        pass

    def on_cancel(self) -> None:
        pass


async def serving(
    scenario: Callable[[grpc.aio.Channel, GrpcServer, list[str]], Awaitable[None]],
    *,
    max_message: int = 64 * 1024 * 1024,
    unix: Path | None = None,
) -> list[str]:
    log: list[str] = []

    def echo(call: Call) -> CallHandler:
        return Echo(call, log)

    server = GrpcServer({ECHO: echo, FAIL: FailAfterOne}, max_message=max_message)
    if unix is not None:
        await server.start(f"unix:{unix}")
        target = f"unix:{unix}"
    else:
        target = f"127.0.0.1:{await server.start('127.0.0.1:0')}"
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    try:
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            await scenario(channel, server, log)
    finally:
        await server.stop()
    return log


def stream(channel: grpc.aio.Channel, method: str = ECHO) -> Any:
    return channel.stream_stream(
        method, request_serializer=_identity, response_deserializer=_identity
    )


async def echo_all(channel: grpc.aio.Channel, messages: list[bytes]) -> list[bytes]:
    async def requests() -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    return [reply async for reply in stream(channel)(requests())]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_messages_of_every_size_come_back_in_order(loop: str) -> None:
    # 5 MB is far past the client's 64 KiB initial window and our 1 MiB frame size: both
    # directions have to honour flow control and split frames.
    messages = [b"", b"x", bytes(range(256)) * 64, b"m" * 100_000, b"big" * 1_700_000, b"end"]

    async def scenario(channel: grpc.aio.Channel, server: GrpcServer, log: list[str]) -> None:
        assert await echo_all(channel, messages) == messages

    # `serve` runs on uvloop by default: the server must behave the same on both loops.
    run = uvloop.run if loop == "uvloop" else asyncio.run
    assert run(serving(scenario)) == ["end"]


def test_many_concurrent_streams_each_get_their_own_answers() -> None:
    async def scenario(channel: grpc.aio.Channel, server: GrpcServer, log: list[str]) -> None:
        batches = [[f"{n}:{i}".encode() for i in range(20)] for n in range(60)]
        replies = await asyncio.gather(*(echo_all(channel, batch) for batch in batches))
        assert replies == batches

    assert asyncio.run(serving(scenario)) == ["end"] * 60


def test_unknown_method_is_unimplemented() -> None:
    async def scenario(channel: grpc.aio.Channel, server: GrpcServer, log: list[str]) -> None:
        call = stream(channel, "/test.Echo/Nope")(iter([]))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [reply async for reply in call]
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "/test.Echo/Nope" in (raised.value.details() or "")

    asyncio.run(serving(scenario))


def test_a_message_over_the_limit_is_resource_exhausted_and_the_connection_lives() -> None:
    async def scenario(channel: grpc.aio.Channel, server: GrpcServer, log: list[str]) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await echo_all(channel, [b"small", b"x" * 5000])
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "5000 bytes" in (raised.value.details() or "")
        assert await echo_all(channel, [b"still here"]) == [b"still here"]

    assert grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] == RESOURCE_EXHAUSTED
    log = asyncio.run(serving(scenario, max_message=1000))
    assert log == ["cancel", "end"]


def test_error_status_and_message_reach_the_client_after_the_data() -> None:
    async def scenario(channel: grpc.aio.Channel, server: GrpcServer, log: list[str]) -> None:
        call = stream(channel, FAIL)(iter([b"one", b"two"]))
        replies: list[bytes] = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for reply in call:
                replies.append(reply)  # noqa: PERF401 - keep what came before the error
        assert replies == [b"one"]
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert raised.value.details() == "kaputt: 100% «broken»"

    asyncio.run(serving(scenario))


def test_client_cancellation_reaches_the_handler() -> None:
    async def scenario(channel: grpc.aio.Channel, server: GrpcServer, log: list[str]) -> None:
        call = stream(channel)()
        await call.write(b"ping")
        assert await call.read() == b"ping"
        call.cancel()
        for _ in range(200):
            if log:
                break
            await asyncio.sleep(0.01)

    assert asyncio.run(serving(scenario)) == ["cancel"]


def test_unix_socket(tmp_path: Path) -> None:
    async def scenario(channel: grpc.aio.Channel, server: GrpcServer, log: list[str]) -> None:
        assert await echo_all(channel, [b"over a unix socket"]) == [b"over a unix socket"]

    assert asyncio.run(serving(scenario, unix=tmp_path / "grpc.sock")) == ["end"]


def test_a_peer_that_does_not_speak_http2_is_dropped() -> None:
    async def scenario(channel: grpc.aio.Channel, server: GrpcServer, log: list[str]) -> None:
        port = next(iter(server._servers)).sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        writer.close()
        assert data  # our SETTINGS, then a GOAWAY
        assert await echo_all(channel, [b"others unaffected"]) == [b"others unaffected"]

    asyncio.run(serving(scenario))


def test_the_preface_may_arrive_byte_by_byte() -> None:
    async def scenario(channel: grpc.aio.Channel, server: GrpcServer, log: list[str]) -> None:
        port = next(iter(server._servers)).sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for byte in PREFACE:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)
            writer.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # empty SETTINGS
            received = b""
            while b"\x00\x00\x00\x04\x01" not in received:  # our ACK of their SETTINGS
                chunk = await asyncio.wait_for(reader.read(4096), 5)
                assert chunk, "the server closed the connection"
                received += chunk
        finally:
            writer.close()

    asyncio.run(serving(scenario))


# --- ProcessCall: ordering and suspension, with a fake call ------------------------------------


class FakeCall:
    def __init__(self) -> None:
        self.sent: list[envoy.ProcessingResponse] = []
        self.finished: list[int] = []
        self.metadata: dict[str, str] = {}

    def send_message(self, data: bytes) -> None:
        self.sent.append(envoy.ProcessingResponse.FromString(data))

    def finish(self, code: int = 0, message: str = "") -> None:
        self.finished.append(code)


class SlowFirst:
    """Suspends on its first message only; records the order it handled messages in."""

    def __init__(self) -> None:
        self.answered_locally = False
        self.handled: list[str] = []
        self.closed = 0

    async def handle(self, request: envoy.ProcessingRequest) -> envoy.ProcessingResponse:
        kind = request.WhichOneof("request") or ""
        if not self.handled:
            await asyncio.sleep(0.01)
        if kind == "response_body":
            raise RuntimeError("boom")
        self.handled.append(kind)
        return envoy.continue_response(kind)

    def close(self) -> None:
        self.closed += 1


def _message(kind: str) -> bytes:
    request = envoy.ProcessingRequest()
    getattr(request, kind).SetInParent()
    return request.SerializeToString()


def test_process_call_answers_in_order_across_a_suspension_and_survives_a_handler_error() -> None:
    async def scenario() -> tuple[FakeCall, SlowFirst, ExtProcServicer]:
        servicer = ExtProcServicer.__new__(ExtProcServicer)
        servicer.active_streams = 0
        call, handler = FakeCall(), SlowFirst()
        process = ProcessCall(servicer, call, handler)  # type: ignore[arg-type]
        assert servicer.active_streams == 1
        for kind in ("request_headers", "request_body", "response_body", "response_headers"):
            process.on_message(_message(kind))
        process.on_end()
        assert call.sent == [] and call.finished == []  # the first message is still asleep
        for _ in range(100):
            if call.finished:
                break
            await asyncio.sleep(0.005)
        return call, handler, servicer

    call, handler, servicer = asyncio.run(scenario())
    assert handler.handled == ["request_headers", "request_body", "response_headers"]
    kinds = [reply.WhichOneof("response") for reply in call.sent]
    assert kinds == ["request_headers", "request_body", "immediate_response", "response_headers"]
    assert call.sent[2].immediate_response.status.code == 500
    assert handler.answered_locally
    assert call.finished == [0]
    assert handler.closed == 1
    assert servicer.active_streams == 0


def test_process_call_cancel_stops_a_suspended_handler_and_closes_once() -> None:
    async def scenario() -> tuple[FakeCall, SlowFirst, ExtProcServicer]:
        servicer = ExtProcServicer.__new__(ExtProcServicer)
        servicer.active_streams = 0
        call, handler = FakeCall(), SlowFirst()
        process = ProcessCall(servicer, call, handler)  # type: ignore[arg-type]
        process.on_message(_message("request_headers"))
        process.on_message(_message("request_body"))
        process.on_cancel()
        process.on_cancel()
        await asyncio.sleep(0.05)
        return call, handler, servicer

    call, handler, servicer = asyncio.run(scenario())
    assert call.sent == [] and handler.handled == []
    assert handler.closed == 1
    assert servicer.active_streams == 0


def test_refusing_stream_answers_503_then_lets_the_local_reply_through() -> None:
    stream = RefusingStream()
    first = asyncio.run(
        stream.handle(envoy.ProcessingRequest.FromString(_message("request_headers")))
    )
    assert first.immediate_response.status.code == 503
    later = asyncio.run(
        stream.handle(envoy.ProcessingRequest.FromString(_message("response_headers")))
    )
    assert later.WhichOneof("response") == "response_headers"


# --- the header block cache --------------------------------------------------------------------


def test_header_block_cache_decodes_exactly_like_a_fresh_decoder() -> None:
    import random

    import hpack

    from extproc.h2grpc import _Connection

    connection = _Connection(GrpcServer({}))
    reference = hpack.Decoder()
    encoder = hpack.Encoder()
    encoder.header_table_size = 256  # small: entries get evicted and indices shift often
    rng = random.Random(7)
    header_sets = [
        [(":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"), ("x-vm-filter", role)]
        for role in ("router", "upstream")
    ] + [[("x-request-id", f"id-{n}"), ("x-vm-filter", "router")] for n in range(6)]
    hits = 0
    for _ in range(600):
        # A real encoder: the same bytes come back for a repeated set, and sometimes for a
        # different set once indices have shifted (the case a stale cache would get wrong).
        block = encoder.encode(rng.choice(header_sets))
        hits += block in connection.header_cache
        expected = {str(k): str(v) for k, v in reference.decode(block)}
        assert connection._decode(block) == expected
    assert hits > 0  # the cache was used, and never gave a stale answer


# --- framing under arbitrary read boundaries, against another HTTP/2 implementation -------------


class _Wire:
    """A transport that only collects what the server writes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self.out = bytes(self.out), bytearray()
        return data


def _grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _feed(connection: Any, data: bytes, rng: Any) -> None:
    position = 0
    while position < len(data):
        size = rng.choice((1, 2, 5, 9, 10, 64, 1000, 20000))
        connection.data_received(data[position : position + size])
        position += size


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streams_survive_any_split_of_the_bytes_against_the_h2_library(seed: int) -> None:
    import random

    import h2.config
    import h2.connection
    import h2.events

    from extproc.h2grpc import _Connection

    rng = random.Random(seed)
    log: list[str] = []
    server = GrpcServer({ECHO: lambda call: Echo(call, log)})
    connection = _Connection(server)
    wire = _Wire()
    connection.connection_made(wire)  # type: ignore[arg-type]
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()

    expected: dict[int, bytes] = {}
    received: dict[int, bytearray] = {}
    trailers: dict[int, dict[bytes, bytes]] = {}
    pending: dict[int, bytes] = {}

    def pump() -> None:
        """Move bytes both ways, split at random, until neither side has anything to say."""
        for _ in range(500):
            outgoing = client.data_to_send()
            if outgoing:
                _feed(connection, outgoing, rng)
            incoming = wire.take()
            if not outgoing and not incoming:
                return
            position = 0
            while position < len(incoming):
                size = rng.choice((1, 7, 100, 5000, 70000))
                for event in client.receive_data(incoming[position : position + size]):
                    if isinstance(event, h2.events.DataReceived):
                        received[event.stream_id] += event.data
                        client.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers[event.stream_id] = dict(event.headers)  # type: ignore[arg-type]
                position += size
            for stream_id, rest in list(pending.items()):  # send what the windows allow now
                room = min(client.local_flow_control_window(stream_id), 16384, len(rest))
                if room:
                    client.send_data(stream_id, rest[:room], end_stream=room == len(rest))
                    pending[stream_id] = rest[room:]
                    if not pending[stream_id]:
                        del pending[stream_id]
        raise AssertionError("the conversation did not settle")

    pump()  # preface and SETTINGS both ways
    for n in range(8):
        stream_id = client.get_next_available_stream_id()
        sizes = [rng.choice((0, 1, 300, 17000, 90000)) for _ in range(rng.randint(1, 4))]
        messages = b"".join(_grpc_frame(bytes([n]) * size) for size in sizes)
        client.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", ECHO),
                (":authority", "vmrouter_extproc"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("x-vm-filter", "router" if n % 2 else "upstream"),
            ],
        )
        expected[stream_id] = messages
        received[stream_id] = bytearray()
        pending[stream_id] = messages
        pump()
    pump()
    for stream_id, messages in expected.items():
        assert bytes(received[stream_id]) == messages, f"stream {stream_id}"
        assert trailers[stream_id][b"grpc-status"] == b"0"
    assert log == ["end"] * 8
    assert not connection.streams and not wire.closed
