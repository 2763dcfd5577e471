"""Request-aware routing through real Envoys: metadata_match, sticky sessions, shared Redis."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.stack import Stack, free_port, require_envoy

pytestmark = pytest.mark.envoy

TEMPLATE = """
gateway:
  metadata: {{gateway_zone: zone-1}}
state: {state}
providers:
  - name: azure-us
    type: openai-compatible
    base_url: "http://127.0.0.1:{port_us}/v1"
    models: [{{name: gpt-4o}}]
  - name: azure-eu
    type: openai-compatible
    base_url: "http://127.0.0.1:{port_eu}/v1"
    models: [{{name: gpt-4o}}]
  - name: openai
    type: openai-compatible
    base_url: "http://127.0.0.1:{port_oa}/v1"
    models: [{{name: gpt-4o}}]
  - name: azure-dedicated
    type: openai-compatible
    base_url: "http://127.0.0.1:{port_ded}/v1"
    models: [{{name: gpt-4o}}]
  - name: azure-shared
    type: openai-compatible
    base_url: "http://127.0.0.1:{port_sh}/v1"
    models: [{{name: gpt-4o}}]
virtual_model_groups:
  - name: seed
    virtual_models:
      - name: regional
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - target: azure-us/gpt-4o
              priority: 0
              metadata_match: {{tfy_gateway_region: US}}
            - target: azure-eu/gpt-4o
              priority: 0
              metadata_match: {{tfy_gateway_region: EU}}
            - target: openai/gpt-4o
              priority: 1
      - name: tiers
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - target: azure-dedicated/gpt-4o
              weight: 100
              metadata_match: {{tier: enterprise}}
            - target: openai/gpt-4o
              weight: 60
            - target: azure-shared/gpt-4o
              weight: 40
      - name: zoned
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - target: azure-us/gpt-4o
              priority: 0
              metadata_match: {{gateway_zone: zone-9}}
            - {{target: openai/gpt-4o, priority: 1}}
      - name: sticky
        routing_config:
          type: weight-based-routing
          sticky_routing:
            ttl_seconds: 3600
            session_identifiers:
              - {{key: x-user-id, source: headers}}
              - {{key: conversation, source: metadata}}
          load_balance_targets:
            - {{target: openai/gpt-4o, weight: 34, retry_config: {{attempts: 1}}}}
            - {{target: azure-shared/gpt-4o, weight: 33, retry_config: {{attempts: 1}}}}
            - {{target: azure-us/gpt-4o, weight: 33, retry_config: {{attempts: 1}}}}
"""

NAMES = ["us", "eu", "oa", "ded", "sh"]
BODY = {"model": "seed/regional", "messages": [{"role": "user", "content": "hi"}]}


def _post(stack: Stack, model: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {**BODY, "model": model}
    return httpx.post(f"{stack.base_url}/chat/completions", json=body, headers=headers, timeout=20)


def _meta(**values: str) -> dict[str, str]:
    return {"x-gateway-metadata": json.dumps(values)}


@pytest.fixture(scope="module")
def seed_stack() -> Iterator[Stack]:
    require_envoy()
    with Stack(TEMPLATE.replace("{state}", "{{backend: memory}}"), NAMES) as stack:
        yield stack


def test_request_aware_region_example(seed_stack: Stack) -> None:
    seed_stack.reset()
    for region, target in (("EU", "azure-eu/gpt-4o"), ("US", "azure-us/gpt-4o")):
        for _ in range(5):
            response = _post(seed_stack, "seed/regional", _meta(tfy_gateway_region=region))
            assert response.status_code == 200
            assert response.headers["x-gateway-target"] == target
    for headers in (None, _meta(tfy_gateway_region="APAC")):
        response = _post(seed_stack, "seed/regional", headers)
        assert response.headers["x-gateway-target"] == "openai/gpt-4o"
    # The regional deployment fails: the global one serves as the fallback.
    seed_stack.set_default("eu", {"status": 503})
    response = _post(seed_stack, "seed/regional", _meta(tfy_gateway_region="EU"))
    assert response.headers["x-gateway-attempts"] == (
        "azure-eu/gpt-4o:503,azure-eu/gpt-4o:503,openai/gpt-4o:200"
    )


def test_request_aware_enterprise_example(seed_stack: Stack) -> None:
    seed_stack.reset()
    for _ in range(20):
        response = _post(seed_stack, "seed/tiers", _meta(tier="enterprise"))
        assert response.headers["x-gateway-target"] == "azure-dedicated/gpt-4o"
    counts = Counter(
        _post(seed_stack, "seed/tiers", _meta(tier="free")).headers["x-gateway-target"]
        for _ in range(300)
    )
    assert set(counts) == {"openai/gpt-4o", "azure-shared/gpt-4o"}
    assert 0.5 <= counts["openai/gpt-4o"] / 300 <= 0.7


def test_request_aware_invalid_metadata_is_400(seed_stack: Stack) -> None:
    response = _post(seed_stack, "seed/regional", {"x-gateway-metadata": "{not json"})
    assert response.status_code == 400
    assert "x-gateway-metadata" in response.json()["error"]["message"]
    response = _post(seed_stack, "seed/regional", {"x-gateway-metadata": '{"a": 1}'})
    assert response.status_code == 400


def test_request_aware_gateway_metadata_wins(seed_stack: Stack) -> None:
    seed_stack.reset()
    # The gateway says zone-1: a client claiming zone-9 does not reach the zone-9 deployment.
    response = _post(
        seed_stack, "seed/zoned", {**_meta(gateway_zone="zone-9"), "x-gateway-explain": "1"}
    )
    assert response.headers["x-gateway-target"] == "openai/gpt-4o"
    assert "gateway_zone=zone-9 does not match" in response.headers["x-gateway-explain"]
    # Neither gateway header reaches a provider.
    for request in seed_stack.received("oa"):
        assert "x-gateway-metadata" not in request["headers"]
        assert "x-gateway-explain" not in request["headers"]


def test_request_aware_explain_header(seed_stack: Stack) -> None:
    seed_stack.reset()
    response = _post(
        seed_stack, "seed/regional", {**_meta(tfy_gateway_region="EU"), "x-gateway-explain": "1"}
    )
    explain = response.headers["x-gateway-explain"]
    assert "strategy=priority-based-routing" in explain
    assert "azure-us/gpt-4o(metadata_match tfy_gateway_region=US does not match)" in explain
    assert explain.endswith("plan=azure-eu/gpt-4o,openai/gpt-4o")


def _sticky(stack: Stack, user: str, conversation: str = "c1") -> str:
    response = _post(stack, "seed/sticky", {"x-user-id": user, **_meta(conversation=conversation)})
    assert response.status_code == 200, response.text
    return response.headers["x-gateway-target"]


def test_request_aware_sticky_holds_and_moves_on_failure(seed_stack: Stack) -> None:
    seed_stack.reset()
    first = _sticky(seed_stack, "alice")
    assert {_sticky(seed_stack, "alice") for _ in range(100)} == {first}
    # Other sessions still spread.
    assert len({_sticky(seed_stack, f"user-{i}") for i in range(30)}) > 1
    # The sticky target fails: the request falls back and the session re-sticks.
    upstream = {"openai/gpt-4o": "oa", "azure-shared/gpt-4o": "sh", "azure-us/gpt-4o": "us"}
    seed_stack.set_default(upstream[first], {"status": 503})
    moved = _sticky(seed_stack, "alice")
    assert moved != first
    seed_stack.set_default(upstream[first], {})
    assert {_sticky(seed_stack, "alice") for _ in range(20)} == {moved}


# --- two replicas sharing one real Redis --------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found: apt-get install redis-server (CI installs it)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    import socket

    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


@pytest.fixture(scope="module")
def replicas(redis_server: tuple[str, subprocess.Popen[bytes]]) -> Iterator[tuple[Stack, Stack]]:
    redis_url = redis_server[0]
    require_envoy()
    state = f"{{{{backend: redis, url: '{redis_url}', key_prefix: 'it{os.getpid()}:'}}}}"
    template = TEMPLATE.replace("{state}", state)
    with Stack(template, NAMES) as one, Stack(template, NAMES) as two:
        yield one, two


def test_request_aware_replicas_share_sticky_assignments(replicas: tuple[Stack, Stack]) -> None:
    one, two = replicas
    for i in range(10):
        user = f"shared-{i}"
        target = _sticky(one, user)
        time.sleep(0.05)  # the assignment is written in the background
        assert _sticky(two, user) == target
        assert _sticky(one, user) == target


def test_request_aware_replicas_share_health(replicas: tuple[Stack, Stack]) -> None:
    one, two = replicas
    one.set_default("ded", {"status": 503})
    two.set_default("ded", {"status": 503})
    for _ in range(3):
        _post(one, "azure-dedicated/gpt-4o")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and two.runtime.health.available("azure-dedicated/gpt-4o"):
        time.sleep(0.05)
    assert not two.runtime.health.available("azure-dedicated/gpt-4o")


def test_request_aware_redis_outage_degrades_to_local_state(
    replicas: tuple[Stack, Stack], redis_server: tuple[str, subprocess.Popen[bytes]]
) -> None:
    one, _ = replicas
    process = redis_server[1]
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    targets = {_sticky(one, "outage-user") for _ in range(10)}
    assert len(targets) == 1  # still sticky, from local state
    for _ in range(10):
        assert _post(one, "seed/tiers").status_code == 200


def test_request_aware_live_explain_endpoint(seed_stack: Stack) -> None:
    url = f"http://127.0.0.1:{seed_stack.metrics_port}/explain?model=seed/tiers&metadata=" + (
        urllib.request.quote('{"tier": "enterprise"}')
    )
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    assert "primary:       azure-dedicated/gpt-4o" in text
    assert "pools:" in text
