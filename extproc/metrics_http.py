"""The ext_proc's small HTTP listener: Prometheus metrics, liveness, live explanations.

This module owns one HTTP server (aiohttp, on the same event loop as the gRPC server) that
answers ``GET /metrics`` with the Prometheus text rendering of ``Telemetry``, ``GET /healthz``
with ``ok``, and, when given the runtime, ``GET /explain?model=...`` with the decision a request
would get now (real health and sticky sessions). Instruments live in ``telemetry``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web

from extproc.errors import GatewayError
from extproc.telemetry import Telemetry

if TYPE_CHECKING:
    from extproc.processor import Runtime

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build_metrics_app(telemetry: Telemetry, runtime: Runtime | None = None) -> web.Application:
    """The application: ``/metrics``, ``/healthz`` and, given a runtime, ``/explain``."""

    async def metrics(_: web.Request) -> web.Response:
        body = telemetry.render_prometheus()
        return web.Response(body=body, headers={"content-type": PROMETHEUS_CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def explain(request: web.Request) -> web.Response:
        from extproc.explain_cli import OPERATIONS
        from extproc.explain_cli import explain as build

        assert runtime is not None
        query = request.query
        op = OPERATIONS.get(query.get("operation", "chat"))
        if op is None or not query.get("model"):
            return web.Response(
                status=400, text="give model= and operation=chat|completion|embedding\n"
            )
        try:
            headers = json.loads(query.get("headers") or "{}")
            if not isinstance(headers, dict):
                raise ValueError("headers must be a JSON object")
            explanation = await build(
                runtime.table,
                query["model"],
                operation=op,
                metadata_json=query.get("metadata") or None,
                headers={str(k): str(v) for k, v in headers.items()},
                message=query.get("message", ""),
                health=runtime.health,
                sticky=runtime.sticky,
            )
        except GatewayError as exc:
            return web.Response(
                status=exc.http_status, text=f"error {exc.http_status}: {exc.message}\n"
            )
        except ValueError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        return web.Response(text="live explanation\n" + explanation.render() + "\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    if runtime is not None:
        app.router.add_get("/explain", explain)
    return app


async def start_metrics_server(
    telemetry: Telemetry,
    host: str = "127.0.0.1",
    port: int = 9464,
    runtime: Runtime | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve the endpoint; return the runner (``await runner.cleanup()`` stops it) and the port."""
    runner = web.AppRunner(build_metrics_app(telemetry, runtime), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses
    bound = int(addresses[0][1]) if addresses else port
    return runner, bound
