"""The ext_proc gRPC server: listening, health reporting and shutdown.

This module owns the process around the servicer: a ``grpc.aio`` server on TCP or a Unix socket,
the standard gRPC health service (SERVING once the first config is loaded), message size limits
large enough for buffered LLM bodies, and a graceful stop. Config loading lives in ``config``;
stream handling in ``servicer``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc._gen import ext_proc_pb2_grpc
from extproc.processor import Runtime
from extproc.servicer import ExtProcServicer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""gRPC message limit; above Envoy's buffered body limit so large prompts pass."""


@dataclass(slots=True)
class RunningServer:
    """A started server and the pieces needed to stop it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    servicer: ExtProcServicer
    port: int
    """The bound TCP port (0 for a Unix socket)."""

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight streams finish within ``grace`` seconds, then stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def bind_target(address: str) -> str:
    """Turn ``host:port`` or ``unix:/path`` / ``/path`` into a gRPC bind target."""
    if address.startswith("/"):
        return f"unix:{address}"
    return address


async def start_server(runtime: Runtime, address: str) -> RunningServer:
    """Start serving ext_proc and gRPC health on ``address``."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    servicer = ExtProcServicer(runtime)
    ext_proc_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(bind_target(address))
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(
        "envoy.service.ext_proc.v3.ExternalProcessor", health_pb2.HealthCheckResponse.SERVING
    )
    log.info("ext_proc listening on %s", address if port == 0 else f"{address} (port {port})")
    return RunningServer(server=server, health=health_servicer, servicer=servicer, port=port)


async def wait_forever() -> None:
    """Sleep until cancelled."""
    await asyncio.Event().wait()
