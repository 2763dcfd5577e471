"""The ext_proc stream loop, on either gRPC transport, and nothing else.

This module owns the protocol mechanics: one ``Process`` call per ext_proc stream, exactly one
response per request message and in order, the choice between a router-level and an
upstream-level handler (by the ``x-vm-filter`` gRPC metadata Envoy sends), the 503 answer for a
new client request while the server drains, and the last-resort conversion of an unexpected
exception into an OpenAI-style 500 instead of a broken stream. What each phase means lives in
``processor``.

Two transports share it: :class:`ExtProcServicer` is the ``grpc.aio`` servicer, and
:meth:`ExtProcServicer.open_call` starts a :class:`ProcessCall` on our own HTTP/2 server
(``h2grpc``), the default. A ``ProcessCall`` runs each message's handler synchronously up to its
first real suspension (most messages never suspend: no task, no event-loop round trip) and only
then hands the rest of that coroutine to an asyncio task; messages that arrive meanwhile wait
their turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import Any, Protocol

from extproc import envoy
from extproc._gen import ext_proc_pb2_grpc
from extproc.envoy_config import FILTER_ROLE_HEADER, ROLE_UPSTREAM
from extproc.errors import error_body
from extproc.h2grpc import INTERNAL, Call, CallHandler
from extproc.processor import RouterStream, Runtime, UpstreamStream

log = logging.getLogger(__name__)

DRAINING_RETRY_AFTER_SECONDS = 1


def _internal_error() -> envoy.ProcessingResponse:
    return envoy.immediate_response(
        500,
        error_body("internal gateway error", "gateway_error", "internal_error"),
        details="vmrouter_internal_error",
    )


def draining_response() -> envoy.ProcessingResponse:
    """The answer to a new client request while the server drains: a retryable 503."""
    return envoy.immediate_response(
        503,
        error_body(
            "The gateway is shutting down; retry the request.", "service_unavailable", "draining"
        ),
        headers=[("retry-after", str(DRAINING_RETRY_AFTER_SECONDS))],
        details="vmrouter_draining",
    )


class StreamHandler(Protocol):
    """What answers the messages of one ext_proc stream (``processor``'s two stream kinds)."""

    answered_locally: bool

    async def handle(self, request: envoy.ProcessingRequest) -> envoy.ProcessingResponse:
        """Answer one message."""
        ...

    def close(self) -> None:
        """The stream ended (cleanly or not)."""


class RefusingStream:
    """A router stream opened during the drain: 503 first, then let our own reply through."""

    def __init__(self) -> None:
        """Nothing answered yet."""
        self.answered_locally = False

    async def handle(self, request: envoy.ProcessingRequest) -> envoy.ProcessingResponse:
        """Refuse the request; continue every later phase (Envoy sends its local reply through)."""
        if not self.answered_locally:
            self.answered_locally = True
            return draining_response()
        return envoy.continue_response(request.WhichOneof("request") or "response_headers")

    def close(self) -> None:
        """Nothing to release."""


class DrainState:
    """Whether new client requests are refused, and how many were."""

    def __init__(self) -> None:
        """Start open."""
        self.draining = False
        self.refused = 0
        """Router streams refused while draining."""


class ExtProcServicer(ext_proc_pb2_grpc.ExternalProcessorServicer):
    """Serves Envoy's ext_proc streams from both filter positions, on either transport."""

    def __init__(self, runtime: Runtime, drain: DrainState | None = None) -> None:
        """Serve with the shared runtime."""
        self.runtime = runtime
        self.drain = drain or DrainState()
        self.active_streams = 0

    def stream_for(self, role: str | None) -> StreamHandler:
        """The handler for a new stream of ``role`` (the ``x-vm-filter`` metadata)."""
        if role == ROLE_UPSTREAM:
            # Upstream-level streams carry attempts of requests already in flight: always served.
            return UpstreamStream(self.runtime)
        if self.drain.draining:
            self.drain.refused += 1
            return RefusingStream()
        return RouterStream(self.runtime)

    def open_call(self, call: Call) -> CallHandler:
        """Start one ext_proc stream on the ``h2grpc`` transport."""
        return ProcessCall(self, call, self.stream_for(call.metadata.get(FILTER_ROLE_HEADER)))

    async def Process(
        self,
        request_iterator: AsyncIterator[envoy.ProcessingRequest],
        context: Any,
    ) -> AsyncIterator[envoy.ProcessingResponse]:
        """Answer every message of one stream, in order (the ``grpc.aio`` transport)."""
        role = None
        for key, value in context.invocation_metadata() or ():
            if key == FILTER_ROLE_HEADER:
                role = value
        stream = self.stream_for(role)
        self.active_streams += 1
        try:
            async for request in request_iterator:
                try:
                    yield await stream.handle(request)
                except Exception:
                    log.exception("ext_proc stream failed")
                    stream.answered_locally = True
                    yield _internal_error()
        finally:
            self.active_streams -= 1
            stream.close()


class _Resume:
    """Continues, inside a task, a coroutine that was already stepped once by hand.

    Awaiting it is ``yield from`` spelled out: the value the coroutine yielded first (the future
    it waits on) goes to the task, and whatever the task sends or throws goes back in.
    """

    __slots__ = ("coroutine", "first")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coroutine = coroutine
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, value = self.coroutine, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:  # delivered to the coroutine
                try:
                    value = coroutine.throw(error)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    value = coroutine.send(sent)
                except StopIteration as done:
                    return done.value


async def _resumed(coroutine: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Resume(coroutine, first)


_END = None


class ProcessCall:
    """One ext_proc stream on the ``h2grpc`` transport: each message answered once, in order."""

    __slots__ = ("call", "closed", "queue", "servicer", "stream", "task")

    def __init__(self, servicer: ExtProcServicer, call: Call, stream: StreamHandler) -> None:
        """Serve ``call`` with ``stream``."""
        self.servicer = servicer
        self.call = call
        self.stream = stream
        self.queue: deque[bytes | None] = deque()
        self.task: asyncio.Task[Any] | None = None
        self.closed = False
        servicer.active_streams += 1

    def on_message(self, data: bytes) -> None:
        """Handle ``data`` now, or after the message still being handled."""
        if self.task is not None or self.queue:
            self.queue.append(data)
        else:
            self._handle(data)

    def on_end(self) -> None:
        """Envoy closed its side: end the call once every message is answered."""
        if self.task is not None or self.queue:
            self.queue.append(_END)
        else:
            self._finish()

    def on_cancel(self) -> None:
        """Envoy reset the stream (request over or cancelled): stop and release."""
        self.queue.clear()
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
        self._close()

    def _handle(self, data: bytes) -> None:
        try:
            request = envoy.ProcessingRequest.FromString(data)
        except Exception:
            log.exception("undecodable ext_proc message")
            self.call.finish(INTERNAL, "undecodable ProcessingRequest")
            self._close()
            return
        coroutine = self.stream.handle(request)
        try:
            first = coroutine.send(None)
        except StopIteration as done:
            self._reply(done.value)
            return
        except Exception:
            log.exception("ext_proc stream failed")
            self._failed()
            return
        task = asyncio.get_running_loop().create_task(_resumed(coroutine, first))
        task.add_done_callback(self._task_done)
        self.task = task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task is not self.task:
            return  # cancelled with the call
        self.task = None
        if task.cancelled():
            self.on_cancel()
            return
        error = task.exception()
        if error is not None:
            log.error("ext_proc stream failed", exc_info=error)
            self._failed()
        else:
            self._reply(task.result())
        while self.queue and self.task is None and not self.closed:
            item = self.queue.popleft()
            if item is _END:
                self._finish()
            else:
                self._handle(item)

    def _reply(self, response: envoy.ProcessingResponse) -> None:
        self.call.send_message(response.SerializeToString())

    def _failed(self) -> None:
        self.stream.answered_locally = True
        self._reply(_internal_error())

    def _finish(self) -> None:
        self.call.finish()
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.servicer.active_streams -= 1
            try:
                self.stream.close()
            except Exception:
                log.exception("closing an ext_proc stream failed")
