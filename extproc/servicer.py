"""The gRPC ``Process`` stream loop, and nothing else.

This module owns the protocol mechanics: one ``Process`` call per ext_proc stream, exactly one
response per request message, the choice between a router-level and an upstream-level handler (by
the ``x-vm-filter`` gRPC metadata Envoy sends), and the last-resort conversion of an unexpected
exception into an OpenAI-style 500 instead of a broken stream. What each phase means lives in
``processor``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from extproc import envoy
from extproc._gen import ext_proc_pb2_grpc
from extproc.envoy_config import FILTER_ROLE_HEADER, ROLE_UPSTREAM
from extproc.errors import error_body
from extproc.processor import RouterStream, Runtime, UpstreamStream

log = logging.getLogger(__name__)


def _internal_error() -> envoy.ProcessingResponse:
    return envoy.immediate_response(
        500,
        error_body("internal gateway error", "gateway_error", "internal_error"),
        details="vmrouter_internal_error",
    )


class ExtProcServicer(ext_proc_pb2_grpc.ExternalProcessorServicer):
    """Serves Envoy's ext_proc streams from both filter positions."""

    def __init__(self, runtime: Runtime) -> None:
        """Serve with the shared runtime."""
        self.runtime = runtime
        self.active_streams = 0

    async def Process(
        self,
        request_iterator: AsyncIterator[envoy.ProcessingRequest],
        context: Any,
    ) -> AsyncIterator[envoy.ProcessingResponse]:
        """Answer every message of one stream, in order."""
        role = None
        for key, value in context.invocation_metadata() or ():
            if key == FILTER_ROLE_HEADER:
                role = value
        self.active_streams += 1
        try:
            if role == ROLE_UPSTREAM:
                upstream = UpstreamStream(self.runtime)
                async for request in request_iterator:
                    try:
                        yield await upstream.handle(request)
                    except Exception:
                        log.exception("upstream stream failed")
                        upstream.answered_locally = True
                        yield _internal_error()
            else:
                router = RouterStream(self.runtime)
                try:
                    async for request in request_iterator:
                        try:
                            yield await router.handle(request)
                        except Exception:
                            log.exception("router stream failed")
                            router.answered_locally = True
                            yield _internal_error()
                finally:
                    router.close()
        finally:
            self.active_streams -= 1
