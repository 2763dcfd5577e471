"""The docker tier (`make docker-test`): real images, a real Docker engine, a real pod.

1. A private dockerd starts (Debian's docker.io); the base image comes from debootstrap (cached);
   the Dockerfile's two images are built with no network from downloaded wheels.
2. compose.yaml runs Envoy, the ext_proc and the demo upstreams on free loopback ports; one chat
   completion goes through Envoy and comes back with the routing headers.
3. The dev overlay's rendered Deployment runs under `podman play kube` in a private network
   namespace (ConfigMaps, emptyDir, securityContext, exec probe, the images); one chat completion
   goes through the pod's Envoy.

Skipped unless VMROUTER_DOCKER_TIER=1 (the Makefile target sets it); skipped with the reason when
a prerequisite (root, docker.io, debootstrap, podman, PyPI) is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import engine as eng
from tests.deploy.tools import ROOT, free_port, kustomize_images, render, require_compose

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("VMROUTER_DOCKER_TIER") != "1",
        reason="docker tier: run `make docker-test` (real dockerd and podman, a few minutes)",
    ),
    pytest.mark.timeout(900),
]

DEMO_GATEWAY = ROOT / "extproc" / "demo" / "gateway.yaml"
CHAT = {"model": "prod/reliable", "messages": [{"role": "user", "content": "hi"}]}
# prod/reliable is priority-based: beta/large first, so the answer is deterministic.
EXPECTED = {
    "x-gateway-virtual-model": "prod/reliable",
    "x-gateway-target": "beta/large",
    "x-gateway-served-model": "beta-large-v3",
    "x-gateway-attempts": "beta/large:200",
}


@pytest.fixture(scope="module")
def say(request: pytest.FixtureRequest) -> eng.Log:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def log(line: str) -> None:
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[docker tier] {line}")

    return log


@pytest.fixture(scope="module")
def engine(say: eng.Log) -> Iterator[eng.Dockerd]:
    reason = eng.missing_prerequisites()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    dockerd = eng.Dockerd.start()
    say(f"dockerd up in {time.monotonic() - started:.1f}s ({dockerd.workdir})")
    try:
        yield dockerd
    finally:
        started = time.monotonic()
        dockerd.close()
        say(f"dockerd stopped in {time.monotonic() - started:.1f}s")


@pytest.fixture(scope="module")
def images(
    engine: eng.Dockerd, say: eng.Log, tmp_path_factory: pytest.TempPathFactory
) -> eng.Images:
    tags = kustomize_images()
    try:
        started = time.monotonic()
        base = eng.base_image(engine, say)
        say(f"base image {base} in {time.monotonic() - started:.1f}s")
        started = time.monotonic()
        context = eng.build_context(tmp_path_factory.mktemp("context") / "context")
        eng.download_wheels(engine, base, context / "wheels")
        say(f"build context with wheels in {time.monotonic() - started:.1f}s")
    except eng.Unavailable as exc:
        pytest.skip(str(exc))
    started = time.monotonic()
    built = eng.build_images(
        engine,
        context,
        base,
        extproc=f"vmrouter/extproc:{tags['vmrouter/extproc']}",
        envoy=f"vmrouter/envoy:{tags['vmrouter/envoy']}",
    )
    sizes = engine.docker("images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}").stdout
    say(f"images built offline in {time.monotonic() - started:.1f}s: {' | '.join(sizes.split())}")
    return built


def _chat(port: int) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), json.loads(response.read())


def _assert_routed(status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
    assert status == 200, (status, headers, body)
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, value in EXPECTED.items():
        assert lowered.get(name) == value, (name, lowered)
    assert body["model"] == "beta-large-v3"
    assert body["choices"][0]["message"]["content"]


# ---- compose ------------------------------------------------------------------------------------


def test_compose_stack_answers_a_chat_completion_through_envoy(
    engine: eng.Dockerd, images: eng.Images, tmp_path: Path, say: eng.Log
) -> None:
    compose = require_compose()
    ports = {
        name: free_port()
        for name in ("PORT", "ADMIN_PORT", "EXTPROC_PORT", "ALPHA_PORT", "BETA_PORT")
    }
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    demo = DEMO_GATEWAY.read_text()
    assert "127.0.0.1:18101/" in demo and "127.0.0.1:18102/" in demo
    demo = demo.replace("127.0.0.1:18101/", f"127.0.0.1:{ports['ALPHA_PORT']}/")
    demo = demo.replace("127.0.0.1:18102/", f"127.0.0.1:{ports['BETA_PORT']}/")
    (config_dir / "gateway.yaml").write_text(demo)
    # The containers run as uid 10001: the config must be readable by others.
    config_dir.chmod(0o755)
    tmp_path.chmod(0o755)
    (config_dir / "gateway.yaml").chmod(0o644)
    env = {
        **engine.env,
        **{f"VMROUTER_{name}": str(port) for name, port in ports.items()},
        "VMROUTER_CONFIG_DIR": str(config_dir),
        "VMROUTER_HEALTH_INTERVAL": "1s",
        "VMROUTER_EXTPROC_IMAGE": images.extproc,
        "VMROUTER_ENVOY_IMAGE": images.envoy,
        "COMPOSE_PROJECT_NAME": f"vmrouter-test-{os.getpid()}",
    }

    def compose_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return eng._run(
            [compose, "-f", str(ROOT / "compose.yaml"), *args], timeout=timeout, env=env, cwd=ROOT
        )

    started = time.monotonic()
    try:
        compose_run("up", "--detach", "--no-build")
        eng.wait_until(
            "Envoy's admin /ready",
            lambda: eng.http_ok(f"http://127.0.0.1:{ports['ADMIN_PORT']}/ready"),
            timeout=60,
        )
        extproc = compose_run("ps", "--quiet", "extproc").stdout.strip()

        def healthy() -> bool:
            state = engine.docker("inspect", "--format", "{{.State.Health.Status}}", extproc)
            return state.stdout.strip() == "healthy"

        # The image's HEALTHCHECK (gRPC health) at the 1 s pace set above.
        eng.wait_until("the ext_proc container to be healthy", healthy, timeout=60)
        say(f"compose stack ready in {time.monotonic() - started:.1f}s")
        _assert_routed(*_chat(ports["PORT"]))
        generator = compose_run("ps", "--all", "--format", "json", "envoy-config").stdout
        assert '"ExitCode":0' in generator.replace(" ", ""), generator
    except BaseException:
        logs = compose_run("logs", "--no-color", "--tail", "40")
        print(logs.stdout, logs.stderr, file=sys.stderr)
        raise
    finally:
        started = time.monotonic()
        compose_run("down", "--volumes", "--timeout", "20", timeout=180)
        say(f"compose down in {time.monotonic() - started:.1f}s")


# ---- the Kubernetes Deployment as a real pod ----------------------------------------------------


def podman_manifest(docs: list[dict[str, Any]], gateway: str, bootstrap: str) -> str:
    """The rendered Deployment and its ConfigMaps as `podman play kube` runs them.

    The changes, and why:
    * the ConfigMaps carry the demo config and its bootstrap (generated exactly as k8s/base's, by
      scripts/k8s_envoy_config.py): the example's providers are not reachable from here;
    * the pod gets the two demo upstreams as extra containers (the ext_proc image, same
      securityContext), on the pod's loopback where the demo config expects them;
    * container ports are dropped and named probe ports resolved to numbers: podman 4.3 turns
      declared ports into host port mappings, which need a bridge network this machine lacks.
    Services, the PodDisruptionBudget and the autoscaler are left out: podman has no use for them.
    """
    kept = []
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            data = doc["data"]
            if "gateway.yaml" in data:
                data["gateway.yaml"] = gateway
            if "envoy.yaml" in data:
                data["envoy.yaml"] = bootstrap
            kept.append(doc)
        elif doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            (extproc,) = [c for c in pod["containers"] if c["name"] == "extproc"]
            for container in pod["containers"]:
                named = {p["name"]: p["containerPort"] for p in container.pop("ports", [])}
                for kind in ("readinessProbe", "livenessProbe"):
                    handler = container.get(kind, {}).get("httpGet")
                    if handler and isinstance(handler["port"], str):
                        handler["port"] = named[handler["port"]]
            for name, port in (("alpha", 18101), ("beta", 18102)):
                pod["containers"].append(
                    {
                        "name": f"upstream-{name}",
                        "image": extproc["image"],
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "-m", "extproc.demo.upstream"],
                        "args": ["--host", "127.0.0.1", "--port", str(port), "--name", name],
                        "securityContext": extproc["securityContext"],
                        "resources": extproc["resources"],
                    }
                )
            kept.append(doc)
    return yaml.safe_dump_all(kept, sort_keys=False)


POD_CLIENT = """
import json, sys, urllib.error, urllib.request
url = sys.argv[1]
body = sys.argv[2].encode() if len(sys.argv) > 2 else None
request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
try:
    response = urllib.request.urlopen(request, timeout=10)
except urllib.error.HTTPError as exc:
    response = exc
except OSError as exc:
    print(json.dumps({"status": 0, "error": str(exc)}))
    sys.exit(0)
with response:
    out = {"status": response.status, "headers": dict(response.headers),
           "body": response.read().decode()}
print(json.dumps(out))
"""


def test_k8s_deployment_runs_as_a_pod_and_answers(
    engine: eng.Dockerd, images: eng.Images, tmp_path: Path, say: eng.Log
) -> None:
    try:
        podman = eng.Podman.create()
    except eng.Unavailable as exc:
        pytest.skip(str(exc))
    try:
        started = time.monotonic()
        podman.load_from(engine, images.extproc, images.envoy)
        say(f"images copied into podman in {time.monotonic() - started:.1f}s")
        bootstrap = tmp_path / "envoy.yaml"
        eng._run(
            [
                sys.executable,
                str(ROOT / "scripts" / "k8s_envoy_config.py"),
                "--gateway",
                str(DEMO_GATEWAY),
                "--output",
                str(bootstrap),
            ],
            timeout=120,
        )
        manifest = tmp_path / "pod.yaml"
        manifest.write_text(
            podman_manifest(render("overlays/dev"), DEMO_GATEWAY.read_text(), bootstrap.read_text())
        )
        started = time.monotonic()
        pod = ""
        try:
            # A private network namespace: the pod's loopback is its own, as on a cluster node.
            podman.podman("play", "kube", "--network", "none", str(manifest), timeout=180)
            (pod,) = podman.podman("pod", "ps", "--format", "{{.Name}}").stdout.split()

            def in_pod(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
                return podman.podman("exec", f"{pod}-extproc", *args, timeout=60, check=check)

            def client(url: str, body: str | None = None) -> dict[str, Any]:
                argv = ["python", "-c", POD_CLIENT, url, *([body] if body else [])]
                result: dict[str, Any] = json.loads(in_pod(*argv).stdout)
                return result

            # The ext_proc's probe, as the Deployment declares it (podman runs it as the
            # container's healthcheck).
            eng.wait_until(
                "the ext_proc's exec probe",
                lambda: (
                    podman.podman("healthcheck", "run", f"{pod}-extproc", check=False).returncode
                    == 0
                ),
                timeout=60,
            )
            # Envoy's probe: what the kubelet's httpGet on the "ready" port gets.
            eng.wait_until(
                "Envoy's readiness listener",
                lambda: client("http://127.0.0.1:9902/ready").get("body") == "LIVE\n",
                timeout=60,
            )
            # Nothing else of the admin endpoint is reachable through it.
            assert client("http://127.0.0.1:9902/stats")["status"] == 404
            assert client("http://127.0.0.1:9902/quitquitquit", "{}")["status"] == 404
            say(f"pod ready in {time.monotonic() - started:.1f}s")
            answer = client("http://127.0.0.1:10000/v1/chat/completions", json.dumps(CHAT))
            _assert_routed(answer["status"], answer["headers"], json.loads(answer["body"]))
            # The securityContext took effect.
            for container in ("envoy", "extproc"):
                name = f"{pod}-{container}"
                assert podman.podman("exec", name, "id", "-u").stdout.strip() == "10001"
                status = podman.podman("exec", name, "cat", "/proc/self/status").stdout
                assert "CapEff:\t0000000000000000" in status, status
                assert "NoNewPrivs:\t1" in status, status
                write = podman.podman("exec", name, "touch", "/probe", check=False)
                assert write.returncode != 0 and "Read-only file system" in write.stderr
            in_pod("touch", "/var/run/vmrouter/written-by-extproc")
            shared = podman.podman("exec", f"{pod}-envoy", "ls", "/var/run/vmrouter").stdout
            assert "written-by-extproc" in shared
        except BaseException:
            for container in ("envoy", "extproc") if pod else ():
                logs = podman.podman("logs", "--tail", "40", f"{pod}-{container}", check=False)
                print(container, logs.stdout, logs.stderr, file=sys.stderr)
            raise
        finally:
            podman.podman("play", "kube", "--down", str(manifest), timeout=180, check=False)
    finally:
        started = time.monotonic()
        podman.close()
        say(f"podman store removed in {time.monotonic() - started:.1f}s")
