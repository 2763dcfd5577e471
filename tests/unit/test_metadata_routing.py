"""metadata_match: both seed examples literally, gateway metadata precedence, pool validation."""

from __future__ import annotations

from collections import Counter
from random import Random

import pytest

from extproc.config import parse_config
from extproc.errors import ConfigError, NoTargetAvailable
from extproc.routing.table import (
    GATEWAY_METADATA_ENV,
    RequestFacts,
    RoutingTable,
    compile_table,
    gateway_metadata,
)
from tests.unit.support import config_problems, table_from_yaml


def gpt_4o_provider(name: str, base_url: str, kind: str = "openai-compatible") -> str:
    """One ``providers:`` entry serving a single model, ``gpt-4o``."""
    return (
        f"  - name: {name}\n"
        f"    type: {kind}\n"
        f"    base_url: {base_url}\n"
        "    models: [{name: gpt-4o}]\n"
    )


PROVIDERS = (
    "providers:\n"
    + gpt_4o_provider("azure-us", "https://us.example.azure.com/v1")
    + gpt_4o_provider("azure-eu", "https://eu.example.azure.com/v1")
    + gpt_4o_provider("openai", "https://api.openai.com/v1", kind="openai")
    + gpt_4o_provider("azure-dedicated", "https://dedicated.example.azure.com/v1")
    + gpt_4o_provider("azure-shared", "https://shared.example.azure.com/v1")
)

# The two routing_config blocks below are copied verbatim from the seed document.
SEED_REGION = """
routing_config:
  type: priority-based-routing
  load_balance_targets:
    - target: azure-us/gpt-4o
      priority: 0
      metadata_match:
        tfy_gateway_region: US
    - target: azure-eu/gpt-4o
      priority: 0
      metadata_match:
        tfy_gateway_region: EU
    - target: openai/gpt-4o
      priority: 1
"""

SEED_ENTERPRISE = """
routing_config:
  type: weight-based-routing
  load_balance_targets:
    - target: azure-dedicated/gpt-4o
      weight: 100
      metadata_match:
        tier: enterprise
    - target: openai/gpt-4o
      weight: 60
    - target: azure-shared/gpt-4o
      weight: 40
"""

FALLBACK = """
    - target: openai/gpt-4o
      priority: 1
"""
ONLY_CONDITIONED = SEED_REGION.replace(FALLBACK, "\n")
"""The region example without its unconditioned fallback: only metadata-matched targets."""

US, EU, OPENAI = "azure-us/gpt-4o", "azure-eu/gpt-4o", "openai/gpt-4o"
DEDICATED, SHARED = "azure-dedicated/gpt-4o", "azure-shared/gpt-4o"


def _indent(block: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line.strip() else line for line in block.strip().splitlines())


def config_text(*models: tuple[str, str], gateway: str = "") -> str:
    """A config with the seed providers and one virtual model per (name, routing block)."""
    parts = [gateway, PROVIDERS, "virtual_model_groups:", "  - name: seed", "    virtual_models:"]
    for name, block in models:
        parts.append(f"      - name: {name}")
        parts.append(_indent(block, 8))
    return "\n".join(parts) + "\n"


@pytest.fixture()
def table() -> RoutingTable:
    text = config_text(
        ("region", SEED_REGION), ("enterprise", SEED_ENTERPRISE), ("strict", ONLY_CONDITIONED)
    )
    return table_from_yaml(text)


def plan(table: RoutingTable, name: str, rng: Random, metadata: dict[str, str]) -> list[str]:
    decision = table.resolve(name, "chat", rng, request=RequestFacts(metadata=metadata))
    return [t.key for t in decision.plan]


# --- region example (priority-based) -----------------------------------------------------------


def test_region_example_eu_always_goes_to_azure_eu_then_openai(table: RoutingTable) -> None:
    rng = Random(11)
    for _ in range(500):
        assert plan(table, "seed/region", rng, {"tfy_gateway_region": "EU"}) == [EU, OPENAI]


def test_region_example_us_always_goes_to_azure_us_then_openai(table: RoutingTable) -> None:
    rng = Random(12)
    for _ in range(500):
        assert plan(table, "seed/region", rng, {"tfy_gateway_region": "US"}) == [US, OPENAI]


@pytest.mark.parametrize(
    "metadata",
    [{}, {"tfy_gateway_region": "APAC"}, {"tfy_gateway_region": "eu"}, {"other": "EU"}],
    ids=["no-metadata", "unknown-region", "wrong-case", "other-key"],
)
def test_region_example_without_known_region_goes_to_openai_only(
    table: RoutingTable, metadata: dict[str, str]
) -> None:
    rng = Random(13)
    for _ in range(200):
        assert plan(table, "seed/region", rng, metadata) == [OPENAI]


def test_region_example_extra_metadata_keys_do_not_prevent_a_match(table: RoutingTable) -> None:
    metadata = {"tfy_gateway_region": "EU", "tfy_gateway_zone": "eu-west-1", "team": "x"}
    assert plan(table, "seed/region", Random(1), metadata) == [EU, OPENAI]


# --- enterprise example (weight-based) ---------------------------------------------------------


def test_enterprise_example_enterprise_tier_always_goes_to_dedicated(table: RoutingTable) -> None:
    rng = Random(21)
    seconds: Counter[str] = Counter()
    for _ in range(4_000):
        keys = plan(table, "seed/enterprise", rng, {"tier": "enterprise"})
        assert keys[0] == DEDICATED
        assert sorted(keys[1:]) == sorted([OPENAI, SHARED])
        seconds[keys[1]] += 1
    # the fallbacks keep the 60/40 split of the unconditioned pool
    assert 0.57 < seconds[OPENAI] / 4_000 < 0.63


@pytest.mark.parametrize(
    "metadata",
    [{}, {"tier": "free"}, {"tier": "Enterprise"}, {"plan": "enterprise"}],
    ids=["no-metadata", "free", "wrong-case", "other-key"],
)
def test_enterprise_example_everyone_else_splits_60_40_without_dedicated(
    table: RoutingTable, metadata: dict[str, str]
) -> None:
    rng = Random(22)
    primaries: Counter[str] = Counter()
    draws = 10_000
    for _ in range(draws):
        keys = plan(table, "seed/enterprise", rng, metadata)
        assert DEDICATED not in keys
        assert sorted(keys) == sorted([OPENAI, SHARED])
        primaries[keys[0]] += 1
    assert 0.58 < primaries[OPENAI] / draws < 0.62
    assert 0.38 < primaries[SHARED] / draws < 0.42


def test_enterprise_example_config_validates_with_weights_per_pool() -> None:
    config = parse_config(config_text(("enterprise", SEED_ENTERPRISE)))
    targets = config.virtual_model_groups[0].virtual_models[0].routing_config.load_balance_targets
    assert [t.weight for t in targets] == [100, 60, 40]
    assert targets[0].metadata_match == {"tier": "enterprise"}


def test_weight_validation_metadata_pool_must_sum_to_100() -> None:
    bad = SEED_ENTERPRISE.replace("weight: 100", "weight: 50")
    assert config_problems(config_text(("enterprise", bad))) == [
        "virtual_model_groups[0].virtual_models[0].routing_config.load_balance_targets:"
        " weights of targets with metadata_match tier=enterprise sum to 50, expected 100"
    ]


def test_weight_validation_unconditioned_pool_must_sum_to_100() -> None:
    bad = SEED_ENTERPRISE.replace("weight: 40", "weight: 30")
    assert config_problems(config_text(("enterprise", bad))) == [
        "virtual_model_groups[0].virtual_models[0].routing_config.load_balance_targets:"
        " weights of targets sum to 90, expected 100"
    ]


def test_weight_validation_pools_are_keyed_by_the_whole_metadata_match() -> None:
    block = """
routing_config:
  type: weight-based-routing
  load_balance_targets:
    - {target: azure-us/gpt-4o, weight: 70, metadata_match: {region: US, tier: gold}}
    - {target: azure-eu/gpt-4o, weight: 30, metadata_match: {tier: gold, region: US}}
    - {target: azure-dedicated/gpt-4o, weight: 100, metadata_match: {region: EU}}
    - {target: openai/gpt-4o, weight: 100}
"""
    parse_config(config_text(("pools", block)))  # key order inside metadata_match is irrelevant


# --- no eligible target ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata", [{}, {"tfy_gateway_region": "APAC"}], ids=["no-metadata", "unknown-region"]
)
def test_resolve_no_matching_conditioned_target_and_no_fallback_is_503(
    table: RoutingTable, metadata: dict[str, str]
) -> None:
    with pytest.raises(NoTargetAvailable) as info:
        table.resolve("seed/strict", "chat", Random(1), request=RequestFacts(metadata=metadata))
    assert info.value.http_status == 503
    assert "seed/strict" in info.value.message
    assert "metadata" in info.value.message


def test_resolve_only_conditioned_targets_still_route_matching_requests(
    table: RoutingTable,
) -> None:
    assert plan(table, "seed/strict", Random(1), {"tfy_gateway_region": "US"}) == [US]


# --- gateway metadata --------------------------------------------------------------------------


def test_gateway_metadata_without_env_is_the_configured_mapping() -> None:
    assert gateway_metadata({"gateway_region": "EU"}, {}) == {"gateway_region": "EU"}


def test_gateway_metadata_env_adds_and_overrides_configured_keys() -> None:
    environ = {GATEWAY_METADATA_ENV: '{"gateway_region": "US", "gateway_zone": "us-east-1"}'}
    merged = gateway_metadata({"gateway_region": "EU", "team": "core"}, environ)
    assert merged == {"gateway_region": "US", "gateway_zone": "us-east-1", "team": "core"}


def test_gateway_metadata_empty_env_is_ignored() -> None:
    assert gateway_metadata({"a": "b"}, {GATEWAY_METADATA_ENV: ""}) == {"a": "b"}


def test_gateway_metadata_does_not_mutate_the_configured_mapping() -> None:
    configured = {"gateway_region": "EU"}
    gateway_metadata(configured, {GATEWAY_METADATA_ENV: '{"gateway_region": "US"}'})
    assert configured == {"gateway_region": "EU"}


@pytest.mark.parametrize(
    "raw",
    ["{not json", '["EU"]', '{"region": 1}', '{"region": null}', '"EU"', '{"a": {"b": "c"}}'],
    ids=["invalid-json", "list", "int-value", "null-value", "string", "nested"],
)
def test_gateway_metadata_env_not_an_object_of_strings_is_config_error(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        gateway_metadata({}, {GATEWAY_METADATA_ENV: raw})
    assert info.value.problems == [f"{GATEWAY_METADATA_ENV}: expected a JSON object of strings"]


def test_compile_table_gateway_metadata_from_config_and_env() -> None:
    gateway = "gateway:\n  metadata:\n    tfy_gateway_region: EU\n    tfy_gateway_zone: eu-1\n"
    config = parse_config(config_text(("region", SEED_REGION), gateway=gateway))
    table = compile_table(config, environ={})
    assert dict(table.gateway_metadata) == {"tfy_gateway_region": "EU", "tfy_gateway_zone": "eu-1"}
    table = compile_table(config, environ={GATEWAY_METADATA_ENV: '{"tfy_gateway_region": "US"}'})
    assert dict(table.gateway_metadata) == {"tfy_gateway_region": "US", "tfy_gateway_zone": "eu-1"}


def test_compile_table_bad_gateway_metadata_env_is_config_error() -> None:
    config = parse_config(config_text(("region", SEED_REGION)))
    with pytest.raises(ConfigError):
        compile_table(config, environ={GATEWAY_METADATA_ENV: "nope"})


def test_gateway_metadata_wins_over_a_client_claiming_another_region() -> None:
    # The processor merges client metadata with table.gateway_metadata, the gateway's keys last.
    gateway = "gateway:\n  metadata:\n    tfy_gateway_region: EU\n"
    table = compile_table(parse_config(config_text(("region", SEED_REGION), gateway=gateway)), {})
    metadata = {"tfy_gateway_region": "US", "team": "x"}
    metadata.update(table.gateway_metadata)
    assert metadata == {"tfy_gateway_region": "EU", "team": "x"}
    assert plan(table, "seed/region", Random(1), metadata) == [EU, OPENAI]
