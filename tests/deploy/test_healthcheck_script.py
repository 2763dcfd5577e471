"""scripts/grpc_health_check.py: the image HEALTHCHECK and the ext_proc's Kubernetes probe."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.tools import ROOT, free_port

SCRIPT = ROOT / "scripts" / "grpc_health_check.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grpc_health_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("0.0.0.0:7000", "127.0.0.1:7000"),
        ("[::]:7000", "127.0.0.1:7000"),
        (":7000", "127.0.0.1:7000"),
        ("/run/vmrouter/extproc.sock", "unix:/run/vmrouter/extproc.sock"),
        ("unix:/x.sock", "unix:/x.sock"),
    ],
)
def test_health_check_targets(address: str, target: str) -> None:
    assert _module().target(address) == target


def test_health_check_reads_listen_of_the_main_process(tmp_path: Path) -> None:
    module = _module()
    cmdline = tmp_path / "cmdline"
    argv = ["/sbin/docker-init", "--", "python", "-m", "extproc", "serve", "--listen", "1.2.3.4:5"]
    cmdline.write_bytes("\0".join(argv).encode() + b"\0")
    assert module.listen_of_pid1(cmdline) == "1.2.3.4:5"
    cmdline.write_bytes(b"python\0-m\0extproc\0serve\0--listen=127.0.0.1:6\0")
    assert module.listen_of_pid1(cmdline) == "127.0.0.1:6"
    cmdline.write_bytes(b"envoy\0-c\0x\0")
    assert module.listen_of_pid1(cmdline) is None
    assert module.listen_of_pid1(tmp_path / "missing") is None


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=30
    )


def test_health_check_against_a_real_ext_proc(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "extproc.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "extproc",
            "serve",
            "--config",
            str(ROOT / "extproc" / "demo" / "gateway.yaml"),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 45  # a loaded 2-core machine starts it slowly
        while True:
            result = _check(f"127.0.0.1:{port}", "--timeout", "1")
            if result.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.2)
        server_log = (tmp_path / "extproc.log").read_text(errors="replace")
        assert result.returncode == 0, result.stdout + result.stderr + server_log
        assert result.stdout.strip() == f"127.0.0.1:{port}: SERVING"
        named = _check(
            f"127.0.0.1:{port}", "--service", "envoy.service.ext_proc.v3.ExternalProcessor"
        )
        assert named.returncode == 0, named.stderr
        unknown = _check(f"127.0.0.1:{port}", "--service", "no.such.Service")
        assert unknown.returncode == 1
        assert "NOT_FOUND" in unknown.stderr
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def test_health_check_fails_when_nothing_listens() -> None:
    result = _check(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
