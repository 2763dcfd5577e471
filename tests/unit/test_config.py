"""Config validation: each rule reports one clear message with its path."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from extproc.config import parse_config, validate_config
from extproc.errors import ConfigError

ISSUE_EXAMPLE = """
providers:
  - name: openai
    type: openai
    base_url: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY
    models:
      - name: gpt-4o
        model: gpt-4o-2024-08-06
        model_types: [chat]
  - name: onprem
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: llama, model: meta-llama/Llama-3.1-8B-Instruct}]
virtual_model_groups:
  - name: prod
    virtual_models:
      - name: chat
        slug: prod-chat
        model_types: [chat]
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - target: openai/gpt-4o
              weight: 90
              override_params: {temperature: 0.2}
              headers_override: {set: {x-team: core}, remove: [x-internal-trace]}
            - target: onprem/llama
              weight: 10
"""


def base() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(ISSUE_EXAMPLE))


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return info.value.problems


TARGETS = "virtual_model_groups[0].virtual_models[0].routing_config.load_balance_targets"


def test_config_issue_example_loads() -> None:
    config = parse_config(ISSUE_EXAMPLE)
    vm = config.virtual_model_groups[0].virtual_models[0]
    assert vm.slug == "prod-chat"
    target = vm.routing_config.load_balance_targets[0]
    assert target.retry_config.attempts == 2
    assert target.retry_config.delay == 100
    assert target.retry_config.on_status_codes == [429, 500, 502, 503]
    assert target.fallback_status_codes == [401, 403, 404, 429, 500, 502, 503]
    assert target.fallback_candidate is True
    assert config.providers[1].models[0].model_types == ["chat"]


def test_config_unknown_target_names_path_and_model() -> None:
    raw = base()
    targets = raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"][
        "load_balance_targets"
    ]
    targets.append({"target": "azure/gpt5", "weight": 0})
    assert problems(raw) == [f"{TARGETS}[2].target: unknown model 'azure/gpt5'"]


def test_config_target_that_is_a_virtual_model() -> None:
    raw = base()
    group = raw["virtual_model_groups"][0]
    group["virtual_models"].append(
        {
            "name": "nested",
            "routing_config": {
                "type": "priority-based-routing",
                "load_balance_targets": [{"target": "prod/chat", "priority": 0}],
            },
        }
    )
    assert problems(raw) == [
        "virtual_model_groups[0].virtual_models[1].routing_config.load_balance_targets[0].target:"
        " 'prod/chat' is a virtual model; targets must be catalog models"
    ]


def test_config_slug_as_target_is_rejected() -> None:
    raw = base()
    raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"]["load_balance_targets"][
        1
    ]["target"] = "prod-chat"
    assert problems(raw) == [
        f"{TARGETS}[1].target: 'prod-chat' is a virtual model; targets must be catalog models"
    ]


def test_config_weights_must_sum_to_100() -> None:
    raw = base()
    targets = raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"][
        "load_balance_targets"
    ]
    targets[1]["weight"] = 20
    assert problems(raw) == [f"{TARGETS}: weights of targets sum to 110, expected 100"]


def test_config_weights_are_per_metadata_pool() -> None:
    raw = base()
    raw["providers"][1]["models"].append({"name": "dedicated"})
    targets = raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"][
        "load_balance_targets"
    ]
    targets.append({"target": "onprem/dedicated", "weight": 100, "metadata_match": {"tier": "ent"}})
    validate_config(raw)  # the seed's enterprise example: 100 in its own pool beside 90/10


def test_config_duplicate_slug_and_names() -> None:
    raw = base()
    group = raw["virtual_model_groups"][0]
    group["virtual_models"].append(copy.deepcopy(group["virtual_models"][0]))
    assert problems(raw) == [
        "virtual_model_groups[0].virtual_models[1].name: duplicate virtual model 'prod/chat'",
        "virtual_model_groups[0].virtual_models[1].slug: duplicate slug 'prod-chat'"
        " (already used by prod/chat)",
    ]


def test_config_duplicate_slug_across_groups() -> None:
    raw = base()
    other = copy.deepcopy(raw["virtual_model_groups"][0])
    other["name"] = "staging"
    raw["virtual_model_groups"].append(other)
    assert problems(raw) == [
        "virtual_model_groups[1].virtual_models[0].slug: duplicate slug 'prod-chat'"
        " (already used by prod/chat)"
    ]


@pytest.mark.parametrize("name", ["ab", "1prod", "prod_team", "x" * 65, "pro d"])
def test_config_bad_group_names(name: str) -> None:
    raw = base()
    raw["virtual_model_groups"][0]["name"] = name
    found = problems(raw)
    assert found[0].startswith(f"virtual_model_groups[0].name: invalid group name {name!r}")


def test_config_negative_priority() -> None:
    raw = base()
    routing = raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"]
    routing["type"] = "priority-based-routing"
    routing["load_balance_targets"][0]["priority"] = -1
    routing["load_balance_targets"][1]["priority"] = 1
    assert problems(raw) == [f"{TARGETS}[0].priority: Input should be greater than or equal to 0"]


def test_config_priority_required_for_priority_routing() -> None:
    raw = base()
    raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"]["type"] = (
        "priority-based-routing"
    )
    assert problems(raw) == [
        f"{TARGETS}[0].priority: required for priority-based-routing",
        f"{TARGETS}[1].priority: required for priority-based-routing",
    ]


def test_config_model_types_mismatch() -> None:
    raw = base()
    raw["virtual_model_groups"][0]["virtual_models"][0]["model_types"] = ["chat", "embedding"]
    found = problems(raw)
    assert found == [
        f"{TARGETS}[0].target: model 'openai/gpt-4o' does not serve embedding"
        " (its model_types: chat)",
        f"{TARGETS}[1].target: model 'onprem/llama' does not serve embedding"
        " (its model_types: chat)",
    ]


def test_config_unknown_field_and_bad_routing_type() -> None:
    raw = base()
    raw["providers"][0]["colour"] = "blue"
    raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"]["type"] = "fastest"
    found = problems(raw)
    assert "providers[0].colour: unknown field" in found
    assert any(
        p.startswith(
            "virtual_model_groups[0].virtual_models[0].routing_config: unknown routing type"
        )
        for p in found
    )


def test_config_seed_fields_are_accepted() -> None:
    raw = base()
    routing = raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"]
    routing["type"] = "priority-based-routing"
    routing["sticky_routing"] = {
        "ttl_seconds": 3600,
        "session_identifiers": [{"key": "x-user-id", "source": "headers"}],
    }
    routing["load_balance_targets"] = [
        {
            "target": "openai/gpt-4o",
            "priority": 0,
            "sla_cutoff": {"time_per_output_token_ms": 50},
            "retry_config": {"attempts": 3, "delay": 200, "on_status_codes": ["429", "500", "503"]},
            "fallback_status_codes": ["429", "500", "502", "503"],
            "fallback_candidate": True,
            "metadata_match": {"tier": "enterprise"},
        },
        {"target": "onprem/llama", "priority": 1, "fallback_candidate": False},
    ]
    config = validate_config(raw)
    first = config.virtual_model_groups[0].virtual_models[0].routing_config.load_balance_targets[0]
    assert first.retry_config.on_status_codes == [429, 500, 503]


def test_config_bad_status_code_and_base_url() -> None:
    raw = base()
    raw["providers"][1]["base_url"] = "ftp://nowhere"
    raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"]["load_balance_targets"][
        0
    ]["fallback_status_codes"] = ["42"]
    found = problems(raw)
    assert found == [
        f"{TARGETS}[0].fallback_status_codes[0]: Input should be greater than or equal to 100"
    ]
    raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"]["load_balance_targets"][
        0
    ]["fallback_status_codes"] = [503]
    assert problems(raw) == [
        "providers[1].base_url: expected an http:// or https:// URL with a host, got 'ftp://nowhere'"
    ]


def test_config_not_yaml_and_not_mapping() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("providers: [")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config("- a\n- b\n")


def test_config_model_override_param_rejected() -> None:
    raw = base()
    raw["virtual_model_groups"][0]["virtual_models"][0]["routing_config"]["load_balance_targets"][
        0
    ]["override_params"] = {"model": "x"}
    assert problems(raw) == [
        f"{TARGETS}[0].override_params: 'model' cannot be overridden;"
        " set the catalog model's 'model'"
    ]
