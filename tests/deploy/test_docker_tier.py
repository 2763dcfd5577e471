"""The docker tier (`make docker-test`): real images, a real Docker engine, a real pod.

1. A private dockerd starts (Debian's docker.io); the base image comes from debootstrap (cached);
   the Dockerfile's two images are built with no network from downloaded wheels.
2. compose.yaml runs Envoy, the ext_proc and the demo upstreams on free loopback ports; one chat
   completion goes through Envoy and comes back with the routing headers. Then a new provider and
   a virtual model routed to it are written into the mounted config directory, and a request to
   the new model succeeds through the same Envoy process (file-based CDS, no restart).
3. The dev overlay's rendered Deployment runs under `podman play kube` in a private network
   namespace (ConfigMaps, the initContainer's CDS file, securityContext, exec probe, the images);
   one chat completion goes through the pod's Envoy. The gateway ConfigMap's volume is updated as
   the kubelet does (a `..data` symlink swap) with a new provider, served with no Envoy restart.
   Last, the pod is stopped as the kubelet stops it: SIGTERM to the ext_proc and Envoy's preStop
   hook at the same time, SIGTERM to Envoy once the hook returns; a streamed request in flight
   finishes whole.

Skipped unless VMROUTER_DOCKER_TIER=1 (the Makefile target sets it); skipped with the reason when
a prerequisite (root, docker.io, debootstrap, podman, PyPI) is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import parse_config
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
RUN_DIR = "/var/run/vmrouter"
CHAT = {"model": "prod/reliable", "messages": [{"role": "user", "content": "hi"}]}
# prod/reliable is priority-based: beta/large first, so the answer is deterministic.
EXPECTED = {
    "x-gateway-virtual-model": "prod/reliable",
    "x-gateway-target": "beta/large",
    "x-gateway-served-model": "beta-large-v3",
    "x-gateway-attempts": "beta/large:200",
}
# What a live config change adds: a provider (so a new Envoy cluster) and a virtual model on it.
NEW_MODEL = "prod/fresh"
NEW_EXPECTED = {
    "x-gateway-virtual-model": NEW_MODEL,
    "x-gateway-target": "gamma/xl",
    "x-gateway-served-model": "gamma-xl-1",
    "x-gateway-attempts": "gamma/xl:200",
    "x-upstream-name": "gamma",
}


def with_new_provider(gateway: str, port: int) -> str:
    """``gateway`` plus provider gamma (an upstream on ``port``) and NEW_MODEL routed to it."""
    config = yaml.safe_load(gateway)
    assert "gamma" not in {p["name"] for p in config["providers"]}
    config["providers"].append(
        {
            "name": "gamma",
            "type": "openai-compatible",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "models": [{"name": "xl", "model": "gamma-xl-1"}],
        }
    )
    group, name = NEW_MODEL.split("/")
    (models,) = [g["virtual_models"] for g in config["virtual_model_groups"] if g["name"] == group]
    models.append(
        {
            "name": name,
            "model_types": ["chat"],
            "routing_config": {
                "type": "priority-based-routing",
                "load_balance_targets": [{"target": "gamma/xl", "priority": 0}],
            },
        }
    )
    text = yaml.safe_dump(config, sort_keys=False)
    parse_config(text)  # valid, or the reload would be rejected and the test would only time out
    return text


def wait_for_new_model(ask: Callable[[], tuple[int, dict[str, str], Any]], timeout: float) -> None:
    """Ask for NEW_MODEL until it answers; before that only "model not found" is acceptable.

    Anything else (e.g. a 503 because Envoy lacks the cluster) would mean the ext_proc routed to
    a cluster before Envoy had it.
    """
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        status, headers, body = ask()
        seen.append(status)
        if status == 200:
            break
        assert status == 404, (status, headers, body)
        assert time.monotonic() < deadline, f"{NEW_MODEL} not served after {timeout:.0f}s: {seen}"
        time.sleep(0.2)
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, value in NEW_EXPECTED.items():
        assert lowered.get(name) == value, (name, lowered)
    assert body["model"] == "gamma-xl-1"


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


def _chat(port: int, model: str = CHAT["model"]) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps({**CHAT, "model": model}).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as exc:
        response = exc
    with response:
        return response.status, dict(response.headers), json.loads(response.read())


def _started(inspect: Callable[..., subprocess.CompletedProcess[str]], container: str) -> str:
    """Start time, PID and restart count of a container: unchanged means not restarted."""
    fmt = "{{.State.StartedAt}} pid={{.State.Pid}} restarts={{.RestartCount}}"
    return inspect("inspect", "--format", fmt, container).stdout.strip()


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

    gamma = f"vmrouter-test-gamma-{os.getpid()}"
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

        # Live: a new provider (a new Envoy cluster) and a virtual model on it, written into the
        # bind-mounted config directory as an editor or a deploy tool would (rename over).
        envoy = compose_run("ps", "--quiet", "envoy").stdout.strip()
        before = _started(engine.docker, envoy)
        gamma_port = free_port()
        engine.docker(
            "run",
            "--detach",
            "--rm",
            "--pull=never",
            "--network=host",
            "--read-only",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges:true",
            "--no-healthcheck",
            "--name",
            gamma,
            "--entrypoint",
            "python",
            images.extproc,
            "-m",
            "extproc.demo.upstream",
            "--host=127.0.0.1",
            f"--port={gamma_port}",
            "--name=gamma",
        )
        eng.wait_until(
            "the gamma upstream",
            lambda: eng.http_ok(f"http://127.0.0.1:{gamma_port}/healthz"),
            timeout=30,
        )
        staged = config_dir / ".gateway.yaml.new"
        staged.write_text(with_new_provider(demo, gamma_port))
        staged.chmod(0o644)
        started = time.monotonic()
        os.replace(staged, config_dir / "gateway.yaml")
        wait_for_new_model(lambda: _chat(ports["PORT"], NEW_MODEL), timeout=30)
        say(f"compose: new provider served {time.monotonic() - started:.1f}s after the edit")
        assert _started(engine.docker, envoy) == before, "Envoy was restarted"
        admin = f"http://127.0.0.1:{ports['ADMIN_PORT']}"
        with urllib.request.urlopen(f"{admin}/clusters", timeout=5) as response:
            assert "\nprovider_gamma::" in response.read().decode()
        _assert_routed(*_chat(ports["PORT"]))  # the old routes are untouched
    except BaseException:
        logs = compose_run("logs", "--no-color", "--tail", "40")
        print(logs.stdout, logs.stderr, file=sys.stderr)
        raise
    finally:
        engine.docker("rm", "--force", gamma, check=False)
        started = time.monotonic()
        compose_run("down", "--volumes", "--timeout", "20", timeout=180)
        say(f"compose down in {time.monotonic() - started:.1f}s")


# ---- the Kubernetes Deployment as a real pod ----------------------------------------------------


@dataclass
class PodPlan:
    """What `podman play kube` runs, and the initContainer the test runs itself before it."""

    manifest: str
    pod: dict[str, Any]
    """The Deployment's pod spec as rendered (initContainers included)."""
    config_maps: dict[str, dict[str, str]]
    """ConfigMap name -> data, as the pod gets them."""


def podman_manifest(
    docs: list[dict[str, Any]], gateway: str, bootstrap: str, run_volume: str
) -> PodPlan:
    """The rendered Deployment and its ConfigMaps as `podman play kube` runs them.

    The changes, and why:
    * the ConfigMaps carry the demo config and its bootstrap (generated exactly as k8s/base's, by
      scripts/k8s_envoy_config.py): the example's providers are not reachable from here;
    * the pod gets the two demo upstreams as extra containers (the ext_proc image, same
      securityContext), on the pod's loopback where the demo config expects them;
    * container ports are dropped and named probe ports resolved to numbers: podman 4.3 turns
      declared ports into host port mappings, which need a bridge network this machine lacks;
    * the initContainer is taken out: the test runs it as declared (image, args, user, mounts,
      securityContext) with `podman run` into the podman volume ``run_volume`` before the pod
      starts, and the pod mounts that volume in place of the emptyDir. podman 4.3's own init
      containers wait 20 s on conmon and then often fail ("failed to remove once init
      container"); the order they give (the initContainer ends before the containers start) is
      what Kubernetes guarantees anyway;
    * restartPolicy OnFailure instead of Always: the kubelet never restarts the containers of a
      pod it is terminating, whereas podman would restart the ext_proc once it has drained and
      exited 0 (a crash still restarts it).
    Services, the PodDisruptionBudget and the autoscaler are left out: podman has no use for them.
    """
    kept = []
    config_maps: dict[str, dict[str, str]] = {}
    original: dict[str, Any] = {}
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            data = doc["data"]
            if "gateway.yaml" in data:
                data["gateway.yaml"] = gateway
            if "envoy.yaml" in data:
                data["envoy.yaml"] = bootstrap
            config_maps[doc["metadata"]["name"]] = dict(data)
            kept.append(doc)
        elif doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            original = yaml.safe_load(yaml.safe_dump(pod))
            pod["restartPolicy"] = "OnFailure"
            (init,) = pod.pop("initContainers")
            (shared,) = [m["name"] for m in init["volumeMounts"] if m["mountPath"] == RUN_DIR]
            for volume in pod["volumes"]:
                if volume["name"] == shared:
                    assert "emptyDir" in volume
                    del volume["emptyDir"]
                    volume["persistentVolumeClaim"] = {"claimName": run_volume}
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
    return PodPlan(yaml.safe_dump_all(kept, sort_keys=False), original, config_maps)


def run_init_container(podman: eng.Podman, plan: PodPlan, run_volume: str, workdir: Path) -> None:
    """Run the pod's initContainer as declared, its emptyDir being the podman volume."""
    (init,) = plan.pod["initContainers"]
    volumes = {v["name"]: v for v in plan.pod["volumes"]}
    context, security = plan.pod["securityContext"], init["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    argv = [
        "run",
        "--rm",
        "--pull=never",
        "--network=none",
        f"--user={context['runAsUser']}:{context['runAsGroup']}",
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--no-healthcheck",
    ]
    for mount in init["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            source = workdir / mount["name"]
            source.mkdir(mode=0o755)
            for key, text in plan.config_maps[volume["configMap"]["name"]].items():
                (source / key).write_text(text)
                (source / key).chmod(0o644)
            where = str(source)
        else:
            assert "emptyDir" in volume, volume
            where = run_volume
        argv += [
            "--volume",
            f"{where}:{mount['mountPath']}{':ro' if mount.get('readOnly') else ''}",
        ]
    # Kubernetes' `args` without `command`: the image's ENTRYPOINT with these arguments.
    assert "command" not in init
    podman.podman(*argv, init["image"], *init["args"], timeout=120)


def kubelet_update(directory: Path, files: dict[str, str]) -> None:
    """Update a ConfigMap volume as the kubelet's atomic writer does.

    The files go into a new timestamped directory, a `..data` symlink is renamed over to point at
    it, and every key is a symlink through `..data` (the first update turns podman's plain files
    into that layout, each with one rename).
    """
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir(mode=0o755)
    for key, text in files.items():
        (stamp / key).write_text(text)
        (stamp / key).chmod(0o644)
    swap = directory / "..data_tmp"
    swap.symlink_to(stamp.name)
    os.replace(swap, directory / "..data")
    for key in files:
        if not (directory / key).is_symlink():
            link = directory / f"..{key}.tmp"
            link.symlink_to(f"..data/{key}")
            os.replace(link, directory / key)


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
        demo = DEMO_GATEWAY.read_text()
        run_volume = "vmrouter-run"
        plan = podman_manifest(render("overlays/dev"), demo, bootstrap.read_text(), run_volume)
        manifest = tmp_path / "pod.yaml"
        manifest.write_text(plan.manifest)
        started = time.monotonic()
        pod = ""
        try:
            # The initContainer: the first CDS file, without which Envoy does not start.
            podman.podman("volume", "create", run_volume)
            run_init_container(podman, plan, run_volume, tmp_path)
            run_dir = Path(
                podman.podman(
                    "volume", "inspect", "--format", "{{.Mountpoint}}", run_volume
                ).stdout.strip()
            )
            assert "provider_beta" in (run_dir / "cds.yaml").read_text()
            say(f"initContainer wrote cds.yaml in {time.monotonic() - started:.1f}s")
            # A private network namespace: the pod's loopback is its own, as on a cluster node.
            podman.podman("play", "kube", "--network", "none", str(manifest), timeout=180)
            (pod,) = podman.podman("pod", "ps", "--format", "{{.Name}}").stdout.split()

            def in_pod(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
                return podman.podman("exec", f"{pod}-extproc", *args, timeout=60, check=check)

            def client(url: str, body: str | None = None, where: str = "extproc") -> dict[str, Any]:
                argv = ["python", "-c", POD_CLIENT, url, *([body] if body else [])]
                answer = podman.podman("exec", f"{pod}-{where}", *argv, timeout=60)
                result: dict[str, Any] = json.loads(answer.stdout)
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
            envoy_write = podman.podman(
                "exec", f"{pod}-envoy", "touch", "/var/run/vmrouter/x", check=False
            )
            assert envoy_write.returncode != 0, "Envoy mounts the shared directory read-only"

            # Live: `kubectl apply` of a gateway ConfigMap with a new provider, as the kubelet
            # lands it in the volume; a third upstream joins the pod for it.
            before = _started(podman.podman, f"{pod}-envoy")
            podman.podman(
                "run",
                "--detach",
                "--pull=never",
                "--pod",
                pod,
                "--name",
                f"{pod}-upstream-gamma",
                "--user=10001:10001",
                "--read-only",
                "--cap-drop=ALL",
                "--security-opt=no-new-privileges",
                "--no-healthcheck",
                "--entrypoint",
                "python",
                images.extproc,
                "-m",
                "extproc.demo.upstream",
                "--host=127.0.0.1",
                "--port=18103",
                "--name=gamma",
            )
            eng.wait_until(
                "the gamma upstream",
                lambda: client("http://127.0.0.1:18103/healthz").get("status") == 200,
                timeout=30,
            )
            volumes = podman.podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
            (gateway_volume,) = [v for v in volumes if v in ("vmrouter-gateway", "gateway-config")]
            mountpoint = podman.podman(
                "volume", "inspect", "--format", "{{.Mountpoint}}", gateway_volume
            ).stdout.strip()
            started = time.monotonic()
            kubelet_update(Path(mountpoint), {"gateway.yaml": with_new_provider(demo, 18103)})

            def ask_new_model() -> tuple[int, dict[str, str], Any]:
                body = json.dumps({**CHAT, "model": NEW_MODEL})
                answer = client("http://127.0.0.1:10000/v1/chat/completions", body)
                return answer["status"], answer["headers"], json.loads(answer["body"])

            wait_for_new_model(ask_new_model, timeout=30)
            say(f"pod: new provider served {time.monotonic() - started:.1f}s after the update")
            assert _started(podman.podman, f"{pod}-envoy") == before, "Envoy was restarted"
            assert "provider_gamma" in (run_dir / "cds.yaml").read_text()
            clusters = client("http://127.0.0.1:9901/clusters")["body"]
            assert "\nprovider_gamma::" in clusters

            # Shutdown, as the kubelet does it (podman runs no preStop hook): SIGTERM to the
            # ext_proc and Envoy's preStop hook at once, SIGTERM to Envoy when the hook returns.
            # A streamed answer (8 chunks over 7.2 s, longer than the hook's minimum wait) is in
            # flight meanwhile; the client runs in an upstream's container, which stays up.
            (envoy,) = [c for c in plan.pod["containers"] if c["name"] == "envoy"]
            hook = envoy["lifecycle"]["preStop"]["exec"]["command"]
            low = float(hook[hook.index("--min-seconds") + 1])
            high = float(hook[hook.index("--max-seconds") + 1])
            script = {"responses": [{"chunks": 8, "chunk_interval_ms": 900}]}
            client("http://127.0.0.1:18102/_control/script", json.dumps(script))
            streamed: dict[str, Any] = {}

            def stream() -> None:
                body = json.dumps({**CHAT, "stream": True})
                url = "http://127.0.0.1:10000/v1/chat/completions"
                streamed.update(client(url, body, where="upstream-alpha"))

            reader = threading.Thread(target=stream, daemon=True)
            reader.start()
            active = "http://127.0.0.1:9901/stats?filter=^http.vmrouter.downstream_rq_active$"
            eng.wait_until(
                "the streamed request in Envoy",
                lambda: client(active, where="upstream-alpha")["body"].strip().endswith(": 1"),
                timeout=10,
                every=0.05,
            )
            started = time.monotonic()
            podman.podman("kill", "--signal", "TERM", f"{pod}-extproc")
            drained = podman.podman("exec", f"{pod}-envoy", *hook, timeout=high + 10)
            took = time.monotonic() - started
            reader.join(timeout=30)
            assert streamed.get("status") == 200, streamed
            chunks = re.findall(r'"content":\s*" ?tok\d+"', streamed["body"])
            assert len(chunks) == 8 and "data: [DONE]" in streamed["body"], streamed["body"]
            assert "no request in flight" in drained.stdout, drained.stdout
            # The hook waited past its minimum for the stream to end, not a moment longer than
            # its bound.
            assert low + 1.5 <= took < high, took
            state = "{{.State.Status}} {{.State.ExitCode}}"

            def exited(container: str) -> list[str]:
                return podman.podman("inspect", "--format", state, container).stdout.split()

            # The ext_proc ends its last stream with the answer, then exits 0 (it may still be
            # closing when Envoy's gauge reaches 0).
            eng.wait_until(
                "the ext_proc to exit", lambda: exited(f"{pod}-extproc")[0] == "exited", timeout=10
            )
            assert exited(f"{pod}-extproc") == ["exited", "0"]
            ready = client("http://127.0.0.1:9901/ready", where="upstream-alpha")
            assert (ready["status"], ready["body"]) == (503, "DRAINING\n")
            podman.podman("kill", "--signal", "TERM", f"{pod}-envoy")
            eng.wait_until(
                "Envoy to exit on SIGTERM",
                lambda: exited(f"{pod}-envoy")[0] == "exited",
                timeout=10,
            )
            say(
                f"pod shutdown: the ext_proc drained and exited 0, Envoy's preStop hook returned "
                f"after {took:.1f}s (bounds {low:g}-{high:g}s), the streamed answer finished whole"
            )
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
