"""The naive ext_proc of issue 7, for ``make bench`` to measure our router against.

It does the least an LLM router's ext_proc must do, and nothing of ours: request headers are
answered CONTINUE; the buffered request body is parsed with ``json.loads``, its ``model`` replaced
by one fixed upstream model name, serialised again with ``json.dumps`` and sent back as a body
mutation, with a ``content-length`` header mutation to match (the headers of a BUFFERED body are
still held by Envoy, so the new length goes out with them, and the upstream gets a plain
length-delimited body); response headers are answered CONTINUE. Envoy's filter config sends only
those three messages (request headers SEND, request body BUFFERED, response headers SEND).

Three servers run the same handler, so their difference is the gRPC machinery alone:

* ``--server aio``: ``grpc.aio`` (what the issue measured at 0.12 of the floor at c=32);
* ``--server sync``: grpcio's synchronous server, a thread per open stream (the issue: 0.155);
* ``--server h2``: our own HTTP/2 gRPC server, ``extproc.h2grpc.GrpcServer``.

Only the generated protobufs (``extproc/_gen``) and, for ``h2``, ``extproc/h2grpc.py`` are used.

    python bench/naive_extproc.py --server aio|sync|h2 --listen 127.0.0.1:50061
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's extproc package

import grpc

from extproc._gen import ext_proc_pb2 as pb
from extproc._gen import ext_proc_pb2_grpc as pb_grpc

UPSTREAM_MODEL = "naive-upstream-model"
"""What every request's ``model`` becomes (bench/run.py checks that the mock receives it)."""
METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
MAX_MESSAGE = 64 * 1024 * 1024
SYNC_THREADS = 128
"""Thread pool of the sync server: one thread per open stream, so well above c=32."""


def process(request: pb.ProcessingRequest) -> pb.ProcessingResponse:
    """The whole naive router: one answer per message Envoy sends."""
    response = pb.ProcessingResponse()
    phase = request.WhichOneof("request")
    if phase == "request_headers":
        response.request_headers.response.SetInParent()
    elif phase == "request_body":
        payload = json.loads(request.request_body.body)
        payload["model"] = UPSTREAM_MODEL
        body = json.dumps(payload).encode()
        common = response.request_body.response
        common.body_mutation.body = body
        length = common.header_mutation.set_headers.add()
        length.header.key = "content-length"
        length.header.raw_value = str(len(body)).encode()
    elif phase == "response_headers":
        response.response_headers.response.SetInParent()
    else:  # a phase the filter config does not send: let it pass unchanged
        getattr(response, phase).SetInParent()
    return response


class AioServicer(pb_grpc.ExternalProcessorServicer):
    """grpc.aio: one coroutine per stream."""

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for request in request_iterator:
            yield process(request)


class SyncServicer(pb_grpc.ExternalProcessorServicer):
    """grpcio's threaded server: one pool thread per stream."""

    def Process(
        self, request_iterator: Iterator[pb.ProcessingRequest], context: Any
    ) -> Iterator[pb.ProcessingResponse]:
        for request in request_iterator:
            yield process(request)


class H2Handler:
    """extproc.h2grpc: the receive half of one call; answers each message as it arrives."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def on_message(self, data: bytes) -> None:
        self.call.send_message(process(pb.ProcessingRequest.FromString(data)).SerializeToString())

    def on_end(self) -> None:
        self.call.finish()

    def on_cancel(self) -> None:
        pass


GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 0),
]


async def serve_async(kind: str, listen: str) -> None:
    """Serve with grpc.aio or h2grpc until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if kind == "aio":
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_ExternalProcessorServicer_to_server(AioServicer(), server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(listen)
        await server.start()
        await stop.wait()
        await server.stop(0)
        return
    from extproc.h2grpc import GrpcServer

    h2 = GrpcServer({METHOD: H2Handler}, max_message=MAX_MESSAGE)
    await h2.start(listen)
    await stop.wait()
    await h2.stop()


def serve_sync(listen: str) -> None:
    """Serve with grpcio's synchronous server until SIGTERM/SIGINT."""
    pool = futures.ThreadPoolExecutor(max_workers=SYNC_THREADS)
    server = grpc.server(pool, options=GRPC_OPTIONS, maximum_concurrent_rpcs=None)
    pb_grpc.add_ExternalProcessorServicer_to_server(SyncServicer(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(listen)
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(0).wait()


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("aio", "sync", "h2"), default="aio")
    parser.add_argument("--listen", default="127.0.0.1:50061", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    if args.server == "sync":
        serve_sync(args.listen)
    else:
        asyncio.run(serve_async(args.server, args.listen))


if __name__ == "__main__":
    main()
