"""Graceful lifecycle of the real processes: ``python -m extproc serve`` and ``run`` on SIGTERM.

The ext_proc runs as a child process (as in a pod), behind a real Envoy that gets its bootstrap
and initial clusters from ``python -m extproc envoy-config --xds-dir DIR --write-cds`` (what a
Kubernetes initContainer runs). Every process is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.__main__ import main as cli
from tests.integration.stack import (
    FakeUpstreams,
    fake_providers,
    free_port,
    require_envoy,
    spawn_extproc,
    start_envoy,
    stop_process,
    tail,
    wait_envoy_ready,
    wait_until,
)

pytestmark = pytest.mark.envoy

MESSAGES = [{"role": "user", "content": "hello there"}]
DRAIN_SECONDS = 8.0

CONFIG = (
    fake_providers("a", "b")
    + """virtual_model_groups:
  - name: test
    virtual_models:
      - name: slowfb
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {{target: a/m1, priority: 0, retry_config: {{attempts: 1}}}}
            - {{target: b/m1, priority: 1}}
      - name: quick
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {{target: b/m1, priority: 0}}
"""
)


ONLY_B = (
    fake_providers("b")
    + """virtual_model_groups:
  - name: test
    virtual_models:
      - name: quick
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {{target: b/m1, priority: 0}}
"""
)


@pytest.fixture()
def workdir() -> Iterator[Path]:
    require_envoy()
    path = Path(tempfile.mkdtemp(prefix="vmrouter-life-"))
    yield path
    for log in sorted(path.glob("*.log")):
        sys.stderr.write(f"--- {log.name}\n{tail(log, 3000)}\n")
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture()
def upstreams() -> Iterator[FakeUpstreams]:
    with FakeUpstreams(["a", "b"]) as u:
        yield u


def health_status(port: int) -> str:
    """The ext_proc's overall gRPC health, or the gRPC error code name if it does not answer."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_serve_sigterm_drains_in_flight_request_then_exits_zero(
    workdir: Path, upstreams: FakeUpstreams
) -> None:
    config = workdir / "gateway.yaml"
    config.write_text(CONFIG.format(**upstreams.ports))
    xds = workdir / "xds"
    extproc_port, port, admin_port = free_port(), free_port(), free_port()
    bootstrap = workdir / "bootstrap.yaml"
    # What an initContainer does: the bootstrap plus the initial clusters in the shared dir.
    code = cli(
        [
            "envoy-config",
            "--config",
            str(config),
            "--listen-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--extproc",
            f"127.0.0.1:{extproc_port}",
            "--xds-dir",
            str(xds),
            "--write-cds",
            "-o",
            str(bootstrap),
        ]
    )
    assert code == 0 and (xds / "cds.yaml").exists()
    extproc = spawn_extproc(
        [
            "serve",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{extproc_port}",
            "--xds-dir",
            str(xds),
            "--envoy-admin",
            f"127.0.0.1:{admin_port}",
            "--drain-seconds",
            str(DRAIN_SECONDS),
        ],
        workdir / "extproc.log",
    )
    envoy = None
    try:
        wait_until(lambda: health_status(extproc_port) == "SERVING", 20, "the ext_proc")
        envoy = start_envoy(bootstrap.read_text(), workdir, 30000 + os.getpid() % 20000)
        wait_envoy_ready(envoy, admin_port, workdir / "envoy.log")
        base = f"http://127.0.0.1:{port}/v1"

        # The in-flight request: a answers 503 after a while (after SIGTERM), so the fallback
        # attempt to b (a new upstream-level stream) starts during the drain; b streams slowly.
        upstreams.script("a", {"status": 503, "delay_ms": 1200})
        upstreams.set_default("b", {"chunks": 6, "chunk_interval_ms": 150})
        outcome: dict[str, Any] = {}

        def in_flight() -> None:
            c = openai.OpenAI(base_url=base, api_key="k", max_retries=0, timeout=30)
            with (
                c,
                c.chat.completions.with_streaming_response.create(
                    model="test/slowfb", messages=MESSAGES, stream=True
                ) as response,
            ):
                outcome["attempts"] = response.headers.get("x-gateway-attempts")
                outcome["body"] = b"".join(response.iter_bytes())
            outcome["done"] = time.monotonic()

        thread = threading.Thread(target=in_flight)
        thread.start()
        wait_until(lambda: len(upstreams.received("a")) == 1, 10, "the request to reach a")

        signalled = time.monotonic()
        extproc.send_signal(signal.SIGTERM)
        wait_until(lambda: health_status(extproc_port) == "NOT_SERVING", 2, "NOT_SERVING")

        # A new request during the drain is refused with a retryable OpenAI-style 503.
        refused = httpx.post(
            f"{base}/chat/completions",
            json={"model": "test/quick", "messages": MESSAGES},
            timeout=10,
        )
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "draining"
        assert refused.headers["retry-after"] == "1"
        assert upstreams.received("b") == []

        thread.join(20)
        assert not thread.is_alive()
        assert outcome["attempts"] == "a/m1:503,b/m1:200"
        body = outcome["body"].decode()
        assert body.rstrip().endswith("data: [DONE]")
        assert all(f"tok{i}" in body for i in range(6))

        assert extproc.wait(DRAIN_SECONDS + 5) == 0
        exited = time.monotonic()
        assert exited - signalled < DRAIN_SECONDS  # finished by itself, well within the bound
        assert exited >= outcome["done"] - 0.5  # ...and not before the request it served
        assert health_status(extproc_port) == "UNAVAILABLE"
    finally:
        stop_process(extproc)
        stop_process(envoy)


def test_run_reloads_live_and_drains_on_sigterm(workdir: Path, upstreams: FakeUpstreams) -> None:
    config = workdir / "gateway.yaml"
    config.write_text(ONLY_B.format(**upstreams.ports))
    port, admin_port, extproc_port = free_port(), free_port(), free_port()
    run = spawn_extproc(
        [
            "run",
            "--config",
            str(config),
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--extproc-port",
            str(extproc_port),
            "--drain-seconds",
            "5",
        ],
        workdir / "run.log",
    )
    try:
        base = f"http://127.0.0.1:{port}/v1"

        def answers(model: str) -> int:
            try:
                r = httpx.post(
                    f"{base}/chat/completions",
                    json={"model": model, "messages": MESSAGES},
                    timeout=5,
                )
            except httpx.HTTPError:
                return 0
            return r.status_code

        wait_until(lambda: answers("test/quick") == 200, 30, "the stack")
        assert answers("test/slowfb") == 404
        # A new provider (a) and a model on it, with no restart.
        config.write_text(CONFIG.format(**upstreams.ports))
        wait_until(lambda: answers("test/slowfb") == 200, 10, "the reload")
        assert [r["json"]["model"] for r in upstreams.received("a")] == ["a-model-1"]
        run.send_signal(signal.SIGTERM)
        assert run.wait(15) == 0
    finally:
        stop_process(run)
        # Should the launcher have died without stopping its Envoy, stop that by its PID too.
        for line in tail(workdir / "run.log", 100_000).splitlines():
            if "envoy started (pid " in line:
                pid = int(line.rsplit("pid ", 1)[1].rstrip(")"))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
