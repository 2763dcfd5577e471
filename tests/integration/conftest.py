"""Fixtures for integration tests: one real Envoy + ext_proc + fake upstreams per module."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.integration.stack import Stack, require_envoy

TEMPLATE = """
gateway:
  attempt_timeout_ms: 30000
  first_byte_timeout_ms: 20000
  health:
    sla_probe_ratio: 0.0
providers:
  - name: a
    type: openai-compatible
    base_url: http://127.0.0.1:{port_a}/v1
    api_key_env: VMR_TEST_KEY_A
    models:
      - {{name: m1, model: a-model-1}}
      - {{name: emb, model: a-embed-1, model_types: [embedding]}}
  - name: b
    type: openai-compatible
    base_url: http://127.0.0.1:{port_b}/v1
    api_key_env: VMR_TEST_KEY_B
    models:
      - {{name: m1, model: b-model-1}}
  - name: c
    type: openai-compatible
    base_url: http://127.0.0.1:{port_c}
    models:
      - {{name: m1, model: c-model-1}}
  - name: dead
    type: openai-compatible
    base_url: http://127.0.0.1:{port_dead}/v1
    models:
      - {{name: m1, model: dead-model-1}}
virtual_model_groups:
  - name: test
    virtual_models:
      - name: split
        slug: test-split
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - target: a/m1
              weight: 90
              override_params: {{temperature: 0.2, max_tokens: 64}}
              headers_override: {{set: {{x-team: core}}, remove: [x-internal-trace]}}
            - target: b/m1
              weight: 10
      - name: prio
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {{target: b/m1, priority: 1}}
            - {{target: a/m1, priority: 0}}
      - name: fallback
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - target: a/m1
              priority: 0
              retry_config: {{attempts: 2, delay: 150}}
              headers_override: {{set: {{x-only-a: "yes"}}, remove: [x-client-tag]}}
            - target: b/m1
              priority: 1
              override_params: {{temperature: 0.9}}
              headers_override: {{set: {{x-only-b: "yes"}}}}
      - name: guarded
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - {{target: a/m1, weight: 50, retry_config: {{attempts: 1}}}}
            - {{target: b/m1, weight: 50, fallback_candidate: false}}
            - {{target: c/m1, weight: 0}}
      - name: refused
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {{target: dead/m1, priority: 0}}
            - {{target: b/m1, priority: 1}}
      - name: slow
        routing_config:
          type: priority-based-routing
          attempt_timeout_ms: 1000
          load_balance_targets:
            - {{target: a/m1, priority: 0, retry_config: {{attempts: 1}}}}
            - {{target: b/m1, priority: 1}}
      - name: latency
        routing_config:
          type: latency-based-routing
          window_seconds: 4
          min_samples: 2
          band: 1.5
          load_balance_targets:
            - {{target: a/m1, retry_config: {{attempts: 1}}}}
            - {{target: b/m1, retry_config: {{attempts: 1}}}}
      - name: sla
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - target: a/m1
              priority: 0
              sla_cutoff: {{time_per_output_token_ms: 30, window_seconds: 3}}
            - {{target: b/m1, priority: 1}}
      - name: metrics
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {{target: a/m1, priority: 0}}
      - name: embed
        model_types: [embedding]
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {{target: a/emb, priority: 0}}
"""

KEYS = {"VMR_TEST_KEY_A": "sk-test-a", "VMR_TEST_KEY_B": "sk-test-b"}


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    require_envoy()
    with Stack(TEMPLATE, ["a", "b", "c"], env=KEYS) as s:
        yield s


@pytest.fixture()
def gw(stack: Stack) -> Iterator[Stack]:
    """The shared stack with every upstream reset before the test."""
    stack.reset()
    yield stack


@pytest.fixture()
def client(gw: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key="client-key", max_retries=0, timeout=30) as c:
        yield c
