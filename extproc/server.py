"""The ext_proc gRPC server: listening, health reporting, config reload and graceful shutdown.

This module owns the process around the servicer: the gRPC server on TCP or a Unix socket (our
own HTTP/2 server, ``h2grpc``, by default; ``grpc.aio`` with ``--transport grpcio``), the standard
gRPC health service (SERVING once the first config is loaded; the ``h2`` transport serves its
``Check`` method), message size limits large enough for buffered LLM bodies, the config watch
(``reload``) and Envoy's cluster file (``cds``) wired to it, and the drain on SIGTERM:

1. the health service reports NOT_SERVING at once (readiness probes take the pod out);
2. new client requests are refused: a new router-level stream is answered with an OpenAI-style 503
   (``code: draining``, ``retry-after``), which clients and SDKs retry elsewhere; upstream-level
   streams are still accepted, because they carry the attempts (retries, fallbacks) of requests
   already in flight;
3. the process waits until no stream is open, at most the drain bound, then stops the server
   (cancelling whatever is left) and exits 0. A second signal cuts the wait short.

Config loading lives in ``config``; stream handling in ``servicer``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc._gen import ext_proc_pb2_grpc
from extproc.cds import ClusterPublisher
from extproc.envoy_config import EnvoySettings
from extproc.h2grpc import INTERNAL, NOT_FOUND, Call, CallHandler, GrpcServer
from extproc.memory import freeze_loaded
from extproc.metrics_http import start_metrics_server
from extproc.processor import Runtime
from extproc.reload import ConfigReloader, ReloadResult, load_config_file
from extproc.servicer import ExtProcServicer
from extproc.telemetry import otlp_telemetry

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""gRPC message limit; above Envoy's buffered body limit so large prompts pass."""
PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
DEFAULT_DRAIN_SECONDS = 20.0
"""Default bound for in-flight streams to finish after SIGTERM (below Kubernetes' 30 s grace)."""
_IDLE_POLL_SECONDS = 0.05


class _Transport(Protocol):
    """What the drain needs from a transport."""

    async def not_serving(self) -> None:
        """Report NOT_SERVING on the health service."""

    async def stop(self) -> None:
        """Stop listening and cut whatever is still open."""


class _H2Transport:
    """Our own HTTP/2 gRPC server (``h2grpc``): ext_proc and grpc.health.v1 Check."""

    def __init__(self, server: GrpcServer, health: HealthStatus) -> None:
        self.server = server
        self.health = health

    async def not_serving(self) -> None:
        self.health.set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self) -> None:
        await self.server.stop()


class _AioTransport:
    """grpcio's asyncio server with the standard health servicer."""

    def __init__(self, server: grpc.aio.Server, health: health.aio.HealthServicer) -> None:
        self.server = server
        self.health = health

    async def not_serving(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self) -> None:
        await self.server.stop(0)


class HealthStatus:
    """The grpc.health.v1 statuses served by the ``h2grpc`` transport (Check only)."""

    def __init__(self) -> None:
        """Both names SERVING (the server starts once the first config is loaded)."""
        self.statuses = {
            "": health_pb2.HealthCheckResponse.SERVING,
            EXTPROC_SERVICE: health_pb2.HealthCheckResponse.SERVING,
        }

    def set_all(self, status: int) -> None:
        """Report ``status`` for every service name."""
        for name in self.statuses:
            self.statuses[name] = status

    def open_call(self, call: Call) -> CallHandler:
        """Answer one Check call."""
        return _HealthCheck(call, self.statuses)


class _HealthCheck:
    """A unary Check: one request message, one answer, then the status."""

    def __init__(self, call: Call, statuses: Mapping[str, int]) -> None:
        self.call = call
        self.statuses = statuses

    def on_message(self, data: bytes) -> None:
        service = health_pb2.HealthCheckRequest.FromString(data).service
        status = self.statuses.get(service)
        if status is None:
            self.call.finish(NOT_FOUND, f"unknown service {service!r}")
            return
        reply = health_pb2.HealthCheckResponse(status=status)
        self.call.send_message(reply.SerializeToString())
        self.call.finish()

    def on_end(self) -> None:
        self.call.finish(INTERNAL, "no request message")

    def on_cancel(self) -> None:
        pass


@dataclass(slots=True)
class RunningServer:
    """A started server and the pieces needed to drain and stop it."""

    transport: _Transport
    servicer: ExtProcServicer
    port: int
    """The bound TCP port (0 for a Unix socket)."""
    kind: str = "h2"
    """Which transport serves: ``h2`` (our HTTP/2 server) or ``grpcio`` (grpc.aio)."""

    @property
    def draining(self) -> bool:
        """Whether the drain has started."""
        return self.servicer.drain.draining

    @property
    def active_streams(self) -> int:
        """ext_proc streams open right now (router and upstream)."""
        return self.servicer.active_streams

    async def begin_drain(self) -> None:
        """Report NOT_SERVING and refuse new requests; streams in flight go on."""
        if self.servicer.drain.draining:
            return
        self.servicer.drain.draining = True
        await self.transport.not_serving()
        log.info(
            "draining: health NOT_SERVING, new requests refused, %d streams in flight",
            self.active_streams,
        )

    async def wait_idle(
        self,
        timeout: float,
        *,
        hurry: asyncio.Event | None = None,
        also_idle: Callable[[], Awaitable[bool]] | None = None,
    ) -> bool:
        """Wait until no stream is open (and ``also_idle`` agrees); False on timeout or hurry."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            if self.active_streams == 0 and (also_idle is None or await also_idle()):
                return True
            if loop.time() >= deadline or (hurry is not None and hurry.is_set()):
                return False
            await asyncio.sleep(_IDLE_POLL_SECONDS)

    async def drain(self, timeout: float, *, hurry: asyncio.Event | None = None) -> int:
        """Drain within ``timeout`` seconds, then stop; return how many streams were cut."""
        await self.begin_drain()
        idle = await self.wait_idle(timeout, hurry=hurry)
        cut = self.active_streams
        if not idle:
            log.warning("drain bound reached: cancelling %d streams still open", cut)
        await self.transport.stop()
        refused = self.servicer.drain.refused
        log.info("ext_proc stopped (%d requests refused while draining)", refused)
        return cut

    async def stop(self, grace: float = 5.0) -> None:
        """Drain for at most ``grace`` seconds, then stop."""
        await self.drain(grace)


def bind_target(address: str) -> str:
    """Turn ``host:port`` or ``unix:/path`` / ``/path`` into a gRPC bind target."""
    if address.startswith("/"):
        return f"unix:{address}"
    return address


TRANSPORTS = ("h2", "grpcio")
"""``h2``: our HTTP/2 gRPC server (``h2grpc``), the default; ``grpcio``: grpc.aio."""


async def start_server(runtime: Runtime, address: str, transport: str = "h2") -> RunningServer:
    """Start serving ext_proc and gRPC health on ``address`` with ``transport``."""
    servicer = ExtProcServicer(runtime)
    if transport == "h2":
        status = HealthStatus()
        h2 = GrpcServer(
            {PROCESS_METHOD: servicer.open_call, HEALTH_CHECK_METHOD: status.open_call},
            max_message=MAX_MESSAGE_BYTES,
        )
        port = await h2.start(address)
        running = RunningServer(_H2Transport(h2, status), servicer, port, kind="h2")
    elif transport == "grpcio":
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        ext_proc_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port(bind_target(address))
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(EXTPROC_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        running = RunningServer(_AioTransport(server, health_servicer), servicer, port, "grpcio")
    else:
        raise ValueError(f"unknown transport {transport!r}: expected one of {TRANSPORTS}")
    where = address if port == 0 else f"{address} (port {port})"
    log.info("ext_proc listening on %s (%s transport)", where, transport)
    return running


class ShutdownSignals:
    """SIGTERM/SIGINT: the first asks for a drain, a second one hurries it; SIGHUP reloads."""

    def __init__(self, on_hangup: Callable[[], None] | None = None) -> None:
        """Install the handlers on the running loop."""
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._signals = [signal.SIGTERM, signal.SIGINT]
        for sig in self._signals:
            self._loop.add_signal_handler(sig, self._on_stop, sig)
        if on_hangup is not None:
            self._signals.append(signal.SIGHUP)
            self._loop.add_signal_handler(signal.SIGHUP, on_hangup)

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.requested.is_set():
            log.warning("%s again: stopping without waiting for streams in flight", sig.name)
            self.hurry.set()
        else:
            log.info("%s: draining", sig.name)
            self.requested.set()

    def remove(self) -> None:
        """Restore the default handlers."""
        for sig in self._signals:
            self._loop.remove_signal_handler(sig)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What ``python -m extproc serve`` runs."""

    config: Path
    listen: str = "127.0.0.1:50051"
    xds_dir: Path | None = None
    """Write Envoy's provider clusters here (file-based CDS) and keep them in sync on reload."""
    envoy_admin: str | None = None
    """``host:port`` of Envoy's admin API, to confirm new clusters before routing to them."""
    reload_interval: float = 1.0
    """Seconds between config file polls; 0 reloads on SIGHUP only."""
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    environ: Mapping[str, str] | None = None
    metrics_listen: str | None = "127.0.0.1:9464"
    """``host:port`` of the HTTP listener for /metrics, /healthz and /explain (None: off)."""
    transport: str = "h2"
    """The gRPC server: ``h2`` (ours, the default) or ``grpcio`` (grpc.aio)."""


async def start_observability(runtime: Runtime, listen: str | None) -> web.AppRunner | None:
    """Serve /metrics, /healthz and /explain for ``runtime`` on ``listen`` (``host:port``)."""
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    runner, bound = await start_metrics_server(
        runtime.telemetry, host or "127.0.0.1", int(port), runtime=runtime
    )
    log.info("metrics, health and explain on http://%s:%s", host or "127.0.0.1", bound)
    return runner


def count_reloads(runtime: Runtime) -> Callable[[ReloadResult], None]:
    """A reload listener that counts reloads by result in ``vmrouter.config.reloads``."""

    def counted(result: ReloadResult) -> None:
        outcome = "success" if result.ok else "failure"
        runtime.telemetry.reloads.add(1, {"vmrouter.result": outcome})

    return counted


async def serve(options: ServeOptions) -> int:
    """Serve until SIGTERM/SIGINT, then drain; return the exit code (0 after a drain)."""
    loaded = load_config_file(options.config, options.environ)
    freeze_loaded()  # the first config lives on: keep it out of every later collection
    runtime = Runtime(loaded.table, telemetry=otlp_telemetry())
    await runtime.start_shared_state()
    metrics = await start_observability(runtime, options.metrics_listen)
    publisher: ClusterPublisher | None = None
    if options.xds_dir is not None:
        publisher = ClusterPublisher(
            options.xds_dir,
            EnvoySettings(xds_dir=str(options.xds_dir)),
            envoy_admin=options.envoy_admin,
        )
        # Envoy may start (or restart) at any time: the file must hold the served clusters.
        change = publisher.write(loaded.table)
        log.info(
            "Envoy clusters %s %s (version %s)",
            "written to" if change.written else "already current in",
            publisher.path,
            publisher.version,
        )
    reloader = ConfigReloader(
        options.config,
        runtime,
        loaded=loaded,
        publisher=publisher,
        interval=options.reload_interval,
        environ=options.environ,
        on_reload=count_reloads(runtime),
    )
    server = await start_server(runtime, options.listen, options.transport)
    signals = ShutdownSignals(on_hangup=reloader.trigger)
    watch = reloader.start()
    try:
        await signals.requested.wait()
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await server.drain(options.drain_seconds, hurry=signals.hurry)
        await runtime.close()
        if metrics is not None:
            await metrics.cleanup()
        runtime.telemetry.shutdown()
        signals.remove()
    return 0


async def wait_forever() -> None:
    """Sleep until cancelled."""
    await asyncio.Event().wait()
