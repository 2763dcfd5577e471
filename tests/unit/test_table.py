"""Resolution and the two basic strategies, with seeded randomness."""

from __future__ import annotations

from collections import Counter
from random import Random

import pytest

from extproc.errors import UnknownModel, UnsupportedOperation
from tests.unit.support import OPENAI_PROVIDER, table_from_yaml

CONFIG = (
    "\nproviders:"
    + OPENAI_PROVIDER
    + """  - name: onprem
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: llama, model: meta-llama/Llama-3.1-8B-Instruct}]
  - name: spare
    type: openai-compatible
    base_url: http://spare.internal:9000
    models: [{name: llama}]
virtual_model_groups:
  - name: prod
    virtual_models:
      - name: chat
        slug: prod-chat
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - {target: openai/gpt-4o, weight: 90}
            - {target: onprem/llama, weight: 10}
      - name: reliable
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: spare/llama, priority: 1}
            - {target: onprem/llama, priority: 0}
            - {target: openai/gpt-4o, priority: 0}
      - name: guarded
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: onprem/llama, priority: 0, fallback_candidate: false}
            - {target: openai/gpt-4o, priority: 1}
            - {target: spare/llama, priority: 2, fallback_candidate: false}
"""
)


@pytest.fixture()
def table():  # type: ignore[no-untyped-def]
    return table_from_yaml(CONFIG, environ={"TEST_OPENAI_KEY": "sk-test"})


def test_resolve_by_group_name_and_slug(table) -> None:  # type: ignore[no-untyped-def]
    rng = Random(1)
    a = table.resolve("prod/chat", "chat", rng)
    b = table.resolve("prod-chat", "chat", rng)
    assert a.virtual_model is b.virtual_model
    assert a.virtual_model.name == "prod/chat"


def test_resolve_catalog_model_directly(table) -> None:  # type: ignore[no-untyped-def]
    decision = table.resolve("onprem/llama", "chat", Random(1))
    assert [t.key for t in decision.plan] == ["onprem/llama"]
    assert decision.primary.retry.attempts == 1
    assert decision.primary.model.upstream_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert not decision.virtual_model.is_virtual


def test_resolve_unknown_model_is_404(table) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownModel) as info:
        table.resolve("gpt-5", "chat", Random(1))
    assert info.value.http_status == 404
    assert "gpt-5" in info.value.message


def test_resolve_wrong_operation_is_400(table) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedOperation) as info:
        table.resolve("prod/chat", "embedding", Random(1))
    assert info.value.http_status == 400
    assert "does not support embeddings" in info.value.message
    with pytest.raises(UnsupportedOperation):
        table.resolve("openai/embed", "chat", Random(1))


def test_weighted_split_follows_weights(table) -> None:  # type: ignore[no-untyped-def]
    rng = Random(42)
    counts = Counter(table.resolve("prod/chat", "chat", rng).primary.key for _ in range(20_000))
    share = counts["openai/gpt-4o"] / 20_000
    assert 0.88 < share < 0.92


def test_weighted_plan_contains_every_target_once(table) -> None:  # type: ignore[no-untyped-def]
    rng = Random(3)
    for _ in range(200):
        plan = [t.key for t in table.resolve("prod/chat", "chat", rng).plan]
        assert sorted(plan) == ["onprem/llama", "openai/gpt-4o"]


def test_priority_picks_lowest_and_shares_ties(table) -> None:  # type: ignore[no-untyped-def]
    rng = Random(7)
    firsts = Counter()
    for _ in range(4_000):
        plan = [t.key for t in table.resolve("prod/reliable", "chat", rng).plan]
        assert plan[2] == "spare/llama"
        firsts[plan[0]] += 1
    assert set(firsts) == {"onprem/llama", "openai/gpt-4o"}
    assert abs(firsts["onprem/llama"] - 2_000) < 200


def test_plan_excludes_non_fallback_candidates_after_primary(table) -> None:  # type: ignore[no-untyped-def]
    plan = [t.key for t in table.resolve("prod/guarded", "chat", Random(1)).plan]
    assert plan == ["onprem/llama", "openai/gpt-4o"]


def test_provider_compilation(table) -> None:  # type: ignore[no-untyped-def]
    openai = table.providers["openai"]
    assert (openai.scheme, openai.host, openai.port, openai.authority) == (
        "https",
        "api.openai.com",
        443,
        "api.openai.com",
    )
    assert openai.path_prefix == "/v1"
    assert openai.auth_header == ("authorization", "Bearer sk-test")
    assert "sk-test" not in repr(openai)
    onprem = table.providers["onprem"]
    assert onprem.authority == "127.0.0.1:8001"
    assert onprem.auth_header is None
    assert table.providers["spare"].path_prefix == ""


def test_names_lists_virtual_slugs_and_catalog(table) -> None:  # type: ignore[no-untyped-def]
    names = table.names()
    assert {"prod/chat", "prod-chat", "prod/reliable", "openai/gpt-4o", "openai/embed"} <= set(
        names
    )
