"""config_text.load returns exactly what PyYAML's safe loader returns (or raises what it raises)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import config_text
from extproc.config import parse_config

ROOT = Path(__file__).resolve().parents[2]

SNIPPETS = [
    "",
    "# only a comment\n",
    "---\n",
    "---\n...\n",
    "a: 1\n",
    "a: [1, 2, {b: c}]\n",
    "- 1\n- two\n- 3.5\n- null\n- ~\n- true\n- no\n- On\n- off\n- YES\n",
    "ints: [0, -0, +7, 0x1F, 0o17, 017, 0b101, 1_000, 190:20:30, 12e3, '12']\n",
    "floats: [1.5, -0.0, .5, 1.5e+3, 1.5e3, 1e3, 6.8523015e+5, .inf, -.Inf, .NaN, 1_0.5]\n",
    "floats: [190:20:30.15, 1., +1.0]\n",
    "dates: [2001-12-14, 2001-12-14t21:59:43.10-05:00, 2001-12-14 21:59:43.10, 2002-12-14]\n",
    "bin: !!binary aGVsbG8=\n",
    'tagged: [!!str 123, !!int "42", !!float "1", !!bool "yes", !!null "", ! 12, !!str]\n',
    "quoted: ['yes', \"no\", '1.5', \"null\", '', \"\", 'it''s', \"tab\\there\"]\n",
    "multi: |\n  line one\n  line two\nfolded: >\n  a\n  b\n\n  c\n",
    "empty_values: {a: , b: ~, c: ''}\nlist:\n- \n- x\n",
    "keys: {1: a, 1.5: b, true: c, null: d, ~: e, 2001-01-01: f, '1': g}\n",
    "dup: {a: 1, b: 2, a: 3}\n",
    "anchors:\n  base: &b {x: 1, y: [1, 2]}\n  again: *b\n  s: &s hello\n  t: *s\n",
    "merge:\n  base: &b {x: 1}\n  child:\n    <<: *b\n    y: 2\n",
    "value_key: {=: 1}\n",
    "set: !!set {a, b}\n",
    "omap: !!omap [{a: 1}, {b: 2}]\n",
    "pairs: !!pairs [{a: 1}, {a: 2}]\n",
    "custom: !thing 3\n",
    "recursive: &r [*r]\n",
    "? [complex, key]\n: value\n",
    "? {a: 1}\n: value\n",
    "doc: 1\n---\ndoc: 2\n",
    "bad: [unclosed\n",
    "bad: {a: 1\n",
    "key: value\n  wrong: indent\n",
    "undefined: *nope\n",
    "twice: [&a 1, &a 2]\n",
    "bad_int: !!int abc\n",
    "bad_binary: !!binary '#!'\n",
    "\ttab: start\n",
    'unicode: [é, 日本, \'😀\', "\\u00e9", "\\x41"]\n',
    "%YAML 1.1\n---\na: 1\n",
    "text: \u0085\n",
    '{"a": 1, "b": [true, false, null], "c": {"d": "e"}}',
    '{"n": [1e3, 1.5e3, 1.5e+3, 1E+2, -0.0, 10, -0, 1.25, 3.0e-2]}',
    '{"c": [NaN, Infinity, -Infinity]}',
    '{"s": "x\\/y\\n\\t\\u00e9\\"q\\""}',
    '{"s": "\\ud83d\\ude00"}',
    '\t{"a": 1}',
    '{"a": 1}\n\t\n',
    '{\n\t"a": 1\n}\n',
    '{"a": "\x7f"}',
    '{"a": "\u2028"}',
    '{"a": 1,}',
    '{"a": 1} trailing',
    '{"' + "k" * 1100 + '": 1}',
    '{"' + "k" * 900 + '": 1}',
    '{"a":{"b":[1,2,{"c":null}]}}',
    "{a: 1, 'b': [x, y]}",
    '{"dup": 1, "dup": 2}',
]


def strict(value: Any) -> Any:
    """A comparable form that tells 1, 1.0 and True apart, and nan from nan."""
    if isinstance(value, dict):
        return ("dict", [(strict(k), strict(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [strict(v) for v in value])
    if isinstance(value, set):
        return ("set", sorted(map(repr, value)))
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def outcome(load: Any, text: str) -> Any:
    try:
        return ("ok", strict(load(text)))
    except Exception as exc:  # the exact error counts too
        return ("error", type(exc).__name__, str(exc))


def reference(text: str) -> Any:
    return yaml.load(text, Loader=config_text.SAFE_LOADER)


@pytest.mark.parametrize("text", SNIPPETS)
def test_load_matches_the_reference_loader(text: str) -> None:
    assert outcome(config_text.load, text) == outcome(reference, text)


def test_aliases_share_one_object_like_the_reference() -> None:
    text = "base: &b {x: [1]}\nagain: *b\n"
    data = config_text.load(text)
    assert data["again"] is data["base"]


def repository_yaml() -> list[Path]:
    found = sorted(
        p
        for pattern in ("extproc/**/*.yaml", "bench/*.yaml", "k8s/**/*.yaml", "envoy/**/*.yaml")
        for p in ROOT.glob(pattern)
    )
    return [p for p in found if p.stat().st_size < 2_000_000]


@pytest.mark.parametrize("path", repository_yaml(), ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_yaml_files_load_the_same(path: Path) -> None:
    text = path.read_text()
    assert outcome(config_text.load, text) == outcome(reference, text)


def generated_config() -> dict[str, Any]:
    return {
        "gateway": {"metadata": {"region": "EU"}, "health": {"failure_rate": 0.25}},
        "providers": [
            {
                "name": f"p{p}",
                "type": "openai-compatible",
                "base_url": f"http://127.0.0.1:{9000 + p}/v1",
                "models": [
                    {"name": f"m{m}", "price": {"input": 0.5 * m, "output": 1.0}} for m in range(3)
                ],
            }
            for p in range(4)
        ],
        "virtual_model_groups": [
            {
                "name": "group-a",
                "virtual_models": [
                    {
                        "name": f"vm{v}",
                        "routing_config": {
                            "type": "weight-based-routing",
                            "load_balance_targets": [
                                {
                                    "target": "p0/m0",
                                    "weight": 70,
                                    "override_params": {"temperature": 0.2, "stop": ["x"]},
                                },
                                {"target": "p1/m1", "weight": 30, "fallback_candidate": False},
                            ],
                        },
                    }
                    for v in range(5)
                ],
            }
        ],
    }


@pytest.mark.parametrize("style", ["block", "flow", "json", "json-compact"])
def test_generated_config_loads_the_same_in_every_style(style: str) -> None:
    data = generated_config()
    text = {
        "block": yaml.safe_dump(data, sort_keys=False),
        "flow": yaml.safe_dump(data, sort_keys=False, default_flow_style=True),
        "json": json.dumps(data, indent=2),
        "json-compact": json.dumps(data, separators=(",", ":")),
    }[style]
    assert outcome(config_text.load, text) == outcome(reference, text)
    assert strict(config_text.load(text)) == strict(data)


def test_parse_config_accepts_json_with_the_same_meaning() -> None:
    data = generated_config()
    from_yaml = parse_config(yaml.safe_dump(data))
    from_json = parse_config(json.dumps(data))
    assert from_json == from_yaml


def test_equal_scalars_come_out_as_one_shared_string() -> None:
    data = config_text.load("a: [same-text, same-text, 'same-text']\n")
    first, second, third = data["a"]
    assert first is second is third


def test_ordinary_configs_take_the_fast_paths() -> None:
    data = generated_config()
    for text in (
        yaml.safe_dump(data, sort_keys=False),
        yaml.safe_dump(data, sort_keys=False, default_flow_style=True),
    ):
        assert strict(config_text._events(text)) == strict(data)
    assert strict(config_text._json(json.dumps(data))) == strict(data)
    assert config_text._json(yaml.safe_dump(data)) is config_text._NOT_HANDLED
