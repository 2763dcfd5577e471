"""Category-based routing: validation with paths, rule matching, per-category strategies."""

from __future__ import annotations

from collections import Counter
from random import Random
from typing import Any

import pytest

from extproc.config import parse_config
from extproc.request import last_user_text
from extproc.routing.table import RequestFacts, RoutingDecision, RoutingTable
from tests.unit.support import config_problems, table_from_yaml

PROVIDERS = """
providers:
  - name: p
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: a}, {name: b}, {name: c}, {name: d}, {name: e}, {name: f}]
"""


def category_config(categories: str) -> str:
    """A config with one category-based model, ``cat/router``, over the ``categories:`` entries."""
    return (
        PROVIDERS
        + """
virtual_model_groups:
  - name: cat
    virtual_models:
      - name: router
        routing_config:
          type: category-based-routing
          categories:
"""
        + categories
    )


def priority_category(name: str, target: str, condition: str = "") -> str:
    """One ``categories:`` entry sending everything to ``target``, with an optional condition
    line such as ``keywords: [python]``."""
    condition_line = f"              {condition}\n" if condition else ""
    return (
        f"            - name: {name}\n"
        + condition_line
        + "              routing_config:\n"
        + "                type: priority-based-routing\n"
        + f"                load_balance_targets: [{{target: {target}, priority: 0}}]\n"
    )


DEFAULT = priority_category("default", "p/a")

CONFIG = category_config(
    """
            - name: code
              keywords: [Python, debug, stack-trace]
              routing_config:
                type: priority-based-routing
                load_balance_targets:
                  - {target: p/a, priority: 0}
                  - {target: p/b, priority: 1}
            - name: sql
              patterns: ['\\bSELECT\\b.+\\bFROM\\b', '(?i)^explain ']
              routing_config:
                type: round-robin-routing
                load_balance_targets: [{target: p/c}, {target: p/d}]
            - name: vip-legal
              keywords: [contract, lawsuit]
              metadata: {tier: vip}
              routing_config:
                type: priority-based-routing
                load_balance_targets: [{target: p/e, priority: 0}]
            - name: vip
              metadata: {tier: vip}
              routing_config:
                type: priority-based-routing
                load_balance_targets: [{target: p/f, priority: 0}]
            - name: default
              routing_config:
                type: weight-based-routing
                load_balance_targets:
                  - {target: p/a, weight: 70}
                  - {target: p/c, weight: 30}
"""
)

A, B, C, D, E, F = "p/a", "p/b", "p/c", "p/d", "p/e", "p/f"
ROUTER = "cat/router"
V_PATH = "virtual_model_groups[0].virtual_models[0].routing_config"


def decide(
    table: RoutingTable,
    text: str,
    metadata: dict[str, str] | None = None,
    rng: Random | None = None,
) -> RoutingDecision:
    facts = RequestFacts(metadata=metadata or {}, text=text)
    return table.resolve(ROUTER, "chat", rng or Random(1), request=facts)


# --- validation --------------------------------------------------------------------------------


def test_category_validation_example_config_is_valid() -> None:
    config = parse_config(CONFIG)
    routing = config.virtual_model_groups[0].virtual_models[0].routing_config
    assert [c.name for c in routing.categories] == ["code", "sql", "vip-legal", "vip", "default"]


def test_category_validation_short_alias_is_accepted() -> None:
    parse_config(category_config(DEFAULT).replace("category-based-routing", "category-based"))


def test_category_validation_default_is_required() -> None:
    text = category_config(priority_category("code", "p/a", "keywords: [python]"))
    assert config_problems(text) == [
        f"{V_PATH}.categories: exactly one category must be named 'default'"
    ]


def test_category_validation_two_defaults_are_rejected() -> None:
    found = config_problems(category_config(DEFAULT + DEFAULT))
    assert f"{V_PATH}.categories[1].name: duplicate category 'default'" in found
    assert f"{V_PATH}.categories: exactly one category must be named 'default'" in found


@pytest.mark.parametrize(
    "condition",
    ["keywords: [x]", "patterns: ['x']", "metadata: {tier: vip}"],
)
def test_category_validation_default_takes_no_conditions(condition: str) -> None:
    text = category_config(priority_category("default", "p/a", condition))
    assert config_problems(text) == [
        f"{V_PATH}.categories[0]: the default category takes no keywords, patterns or metadata"
    ]


def test_category_validation_non_default_needs_a_condition() -> None:
    text = category_config(priority_category("code", "p/b") + DEFAULT)
    assert config_problems(text) == [
        f"{V_PATH}.categories[0]: a category needs keywords, patterns or metadata"
        " (or name it default)"
    ]


def test_category_validation_bad_regex_is_reported_with_its_path() -> None:
    text = category_config(
        priority_category("code", "p/b", "patterns: ['ok', 'broken(']") + DEFAULT
    )
    found = config_problems(text)
    assert len(found) == 1
    assert found[0].startswith(f"{V_PATH}.categories[0].patterns[1]: invalid regular expression: ")
    assert "missing ), unterminated subpattern" in found[0]


def test_category_validation_nested_unknown_target_has_full_path() -> None:
    text = category_config(
        DEFAULT
        + """
            - name: code
              keywords: [python]
              routing_config:
                type: weight-based-routing
                load_balance_targets:
                  - {target: nowhere/model, weight: 60}
                  - {target: p/b, weight: 40}
"""
    )
    assert config_problems(text) == [
        f"{V_PATH}.categories[1].routing_config.load_balance_targets[0].target:"
        " unknown model 'nowhere/model'"
    ]


def test_category_validation_nested_weight_sum_has_full_path() -> None:
    text = category_config(
        DEFAULT
        + """
            - name: code
              keywords: [python]
              routing_config:
                type: weight-based-routing
                load_balance_targets:
                  - {target: p/a, weight: 60}
                  - {target: p/b}
"""
    )
    assert config_problems(text) == [
        f"{V_PATH}.categories[1].routing_config.load_balance_targets[1].weight:"
        " required for weight-based-routing",
        f"{V_PATH}.categories[1].routing_config.load_balance_targets:"
        " weights of targets sum to 60, expected 100",
    ]


def test_category_validation_nested_schema_error_has_full_path() -> None:
    # A schema (pydantic) error inside a category must carry the same path the user wrote:
    # no routing type tag such as ".category-based-routing" in the middle.
    text = category_config(
        DEFAULT
        + """
            - name: code
              keywords: [python]
              routing_config:
                type: weight-based-routing
                load_balance_targets:
                  - {weight: 100}
"""
    )
    assert config_problems(text) == [
        f"{V_PATH}.categories[1].routing_config.load_balance_targets[0].target: Field required"
    ]


def test_category_validation_categories_cannot_nest() -> None:
    text = category_config(
        DEFAULT
        + """
            - name: code
              keywords: [python]
              routing_config:
                type: category-based-routing
                categories: []
"""
    )
    found = config_problems(text)
    assert len(found) == 1
    # the path the user wrote, and a message naming the types allowed inside a category
    assert found[0].startswith(f"{V_PATH}.categories[1].routing_config: unknown routing type")
    assert "round-robin-routing" in found[0]
    assert "lowest-price-routing" in found[0]


# --- matching ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "How do I sort a list in PYTHON?",
        "python",
        "Please debug this.",
        "I got a (stack-trace), help",
        "Debug: it fails",
    ],
)
def test_category_keyword_matches_case_insensitive_whole_word(
    table: RoutingTable, text: str
) -> None:
    decision = decide(table, text)
    assert decision.category == "code"
    assert decision.plan[0].key == A


@pytest.mark.parametrize(
    "text",
    ["I love pythons", "the debugger says no", "debugging", "stack trace", "", "py thon"],
)
def test_category_keyword_partial_word_does_not_match(table: RoutingTable, text: str) -> None:
    assert decide(table, text).category == "default"


@pytest.mark.parametrize(
    "text",
    ["SELECT id FROM users", "please run: SELECT * FROM t", "EXPLAIN analyze", "explain this"],
)
def test_category_pattern_match(table: RoutingTable, text: str) -> None:
    decision = decide(table, text)
    assert decision.category == "sql"
    assert {t.key for t in decision.plan} == {C, D}


@pytest.mark.parametrize("text", ["select id from users", "SELECT only", "please explain this"])
def test_category_pattern_is_case_sensitive_unless_flagged(table: RoutingTable, text: str) -> None:
    assert decide(table, text).category == "default"


def test_category_metadata_and_keywords_are_both_required(table: RoutingTable) -> None:
    vip = {"tier": "vip"}
    assert decide(table, "review this contract", vip).category == "vip-legal"
    assert decide(table, "review this contract", vip).plan[0].key == E
    # keyword without the metadata: not vip-legal, and not vip either
    assert decide(table, "review this contract", {"tier": "free"}).category == "default"
    assert decide(table, "review this contract").category == "default"
    # metadata without the keyword: the metadata-only category
    assert decide(table, "hello there", vip).category == "vip"
    assert decide(table, "hello there", vip).plan[0].key == F


def test_category_first_matching_category_wins(table: RoutingTable) -> None:
    # matches code (keyword), sql (pattern), vip-legal and vip: the first listed wins
    text = "debug SELECT x FROM contract"
    assert decide(table, text, {"tier": "vip"}).category == "code"
    assert decide(table, "SELECT x FROM contract", {"tier": "vip"}).category == "sql"


def test_category_default_is_last_even_if_listed_first() -> None:
    text = category_config(DEFAULT + priority_category("code", "p/b", "keywords: [python]"))
    table = table_from_yaml(text)
    vm = table.lookup("cat/router")
    assert vm is not None
    assert [r.category for r in vm.routes] == ["code", "default"]
    assert decide(table, "python please").category == "code"
    assert decide(table, "python please").plan[0].key == "p/b"
    assert decide(table, "ruby please").category == "default"


def test_category_default_when_nothing_matches(table: RoutingTable) -> None:
    decision = decide(table, "tell me a joke")
    assert decision.category == "default"
    assert {t.key for t in decision.plan} == {A, C}


def test_category_each_uses_its_own_strategy_and_targets(table: RoutingTable) -> None:
    vm = table.lookup(ROUTER)
    assert vm is not None
    assert [(r.category, r.strategy.name, [t.key for t in r.targets]) for r in vm.routes] == [
        ("code", "priority-based-routing", [A, B]),
        ("sql", "round-robin-routing", [C, D]),
        ("vip-legal", "priority-based-routing", [E]),
        ("vip", "priority-based-routing", [F]),
        ("default", "weight-based-routing", [A, C]),
    ]
    assert vm.routing_type == "category-based-routing"
    assert vm.targets == tuple({id(t): t for r in vm.routes for t in r.targets}.values())
    # code: priority order, always the same
    rng = Random(2)
    for _ in range(50):
        assert [t.key for t in decide(table, "debug", rng=rng).plan] == [A, B]
    # sql: round robin over its own targets
    firsts = [decide(table, "SELECT 1 FROM t", rng=rng).plan[0].key for _ in range(4)]
    assert firsts == [C, D, C, D]
    # default: 70/30 by weight
    counts = Counter(decide(table, "hi", rng=rng).plan[0].key for _ in range(5_000))
    assert 0.67 < counts[A] / 5_000 < 0.73


def test_category_decision_category_is_none_for_plain_models() -> None:
    text = (
        PROVIDERS
        + """
virtual_model_groups:
  - name: cat
    virtual_models:
      - name: plain
        routing_config:
          type: priority-based-routing
          load_balance_targets: [{target: p/a, priority: 0}]
"""
    )
    table = table_from_yaml(text)
    facts = RequestFacts(text="debug python")
    assert table.resolve("cat/plain", "chat", Random(1), request=facts).category is None


def test_category_explain_records_category_and_reason(table: RoutingTable) -> None:
    from extproc.routing.explain import Explanation

    explanation = Explanation()
    facts = RequestFacts(text="Please DEBUG this")
    table.resolve(ROUTER, "chat", Random(1), request=facts, explain=explanation)
    assert explanation.category == "code"
    assert explanation.category_reason == "keyword 'debug'"
    assert explanation.strategy == "priority-based-routing"
    explanation = Explanation()
    facts = RequestFacts(text="SELECT a FROM b")
    table.resolve(ROUTER, "chat", Random(1), request=facts, explain=explanation)
    assert explanation.category_reason == "pattern '\\\\bSELECT\\\\b.+\\\\bFROM\\\\b'"
    explanation = Explanation()
    facts = RequestFacts(metadata={"tier": "vip"}, text="hi")
    table.resolve(ROUTER, "chat", Random(1), request=facts, explain=explanation)
    assert (explanation.category, explanation.category_reason) == ("vip", "metadata tier=vip")
    explanation = Explanation()
    table.resolve(ROUTER, "chat", Random(1), request=RequestFacts(), explain=explanation)
    assert (explanation.category, explanation.category_reason) == ("default", "default")


# --- last_user_text ----------------------------------------------------------------------------


def test_last_user_text_string_content_of_last_user_message() -> None:
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "you are a bot"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "another answer"},
        ]
    }
    assert last_user_text(body) == "second question"


def test_last_user_text_list_of_parts_content() -> None:
    body: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": "older"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    {"type": "text", "text": "this picture"},
                ],
            },
        ]
    }
    assert last_user_text(body) == "look at\nthis picture"


def test_last_user_text_no_user_message_is_empty() -> None:
    assert last_user_text({"messages": [{"role": "system", "content": "x"}]}) == ""
    assert last_user_text({"messages": []}) == ""
    assert last_user_text({"messages": [{"role": "user", "content": None}]}) == ""
    assert last_user_text({"messages": ["junk", {"role": "user"}]}) == ""


def test_last_user_text_messages_win_over_prompt() -> None:
    body: dict[str, Any] = {"messages": [{"role": "assistant", "content": "x"}], "prompt": "p"}
    assert last_user_text(body) == ""


def test_last_user_text_completions_prompt() -> None:
    assert last_user_text({"model": "m", "prompt": "complete this"}) == "complete this"
    assert last_user_text({"model": "m", "prompt": ["one", "two"]}) == "one\ntwo"


def test_last_user_text_embeddings_input() -> None:
    assert last_user_text({"model": "m", "input": "embed me"}) == "embed me"
    assert last_user_text({"model": "m", "input": ["a", "b"]}) == "a\nb"
    assert last_user_text({"model": "m", "input": [1, 2, 3]}) == ""


def test_last_user_text_nothing_to_read_is_empty() -> None:
    assert last_user_text({"model": "m"}) == ""


def test_last_user_text_feeds_category_rules(table: RoutingTable) -> None:
    body: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": "debug my python"},
            {"role": "assistant", "content": "sure"},
            {"role": "user", "content": [{"type": "text", "text": "SELECT a FROM b"}]},
        ]
    }
    assert decide(table, last_user_text(body)).category == "sql"
