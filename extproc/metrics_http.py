"""The Prometheus scrape endpoint of the ext_proc process.

This module owns one small HTTP server (aiohttp, on the same event loop as the gRPC server) that
answers ``GET /metrics`` with the Prometheus text rendering of ``Telemetry`` and ``GET /healthz``
with ``ok``. Instruments and names live in ``telemetry``.
"""

from __future__ import annotations

from aiohttp import web

from extproc.telemetry import Telemetry

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build_metrics_app(telemetry: Telemetry) -> web.Application:
    """The aiohttp application serving ``/metrics`` and ``/healthz``."""

    async def metrics(_: web.Request) -> web.Response:
        body = telemetry.render_prometheus()
        return web.Response(body=body, headers={"content-type": PROMETHEUS_CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def start_metrics_server(
    telemetry: Telemetry, host: str = "127.0.0.1", port: int = 9464
) -> tuple[web.AppRunner, int]:
    """Serve the endpoint; return the runner (``await runner.cleanup()`` stops it) and the port."""
    runner = web.AppRunner(build_metrics_app(telemetry), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses
    bound = int(addresses[0][1]) if addresses else port
    return runner, bound
