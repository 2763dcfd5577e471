"""Config text to plain Python data: exactly what ``yaml.safe_load`` returns, faster and smaller.

This module owns turning the config file's text into dicts, lists and scalars, before any schema
validation. The reference is PyYAML's safe loader (libyaml's ``CSafeLoader`` when available):
``load`` returns what it returns, or raises what it raises, for every input. Two faster paths
serve the common cases, and anything they do not handle goes to the reference loader:

* **JSON** (JSON is YAML's flow style): a text that is one JSON object goes through ``json.loads``
  (~50x faster), with hooks that give every number and constant the value YAML 1.1 gives the same
  plain scalar (``1e3`` or ``1.5e3`` stay strings in YAML, ``NaN`` is a string). Texts where YAML
  and JSON could still disagree are left to YAML: characters YAML rejects or folds (non-printable
  ones, NEL, LS, PS), surrogate escapes, keys too long for a YAML implicit key, tabs outside the
  object.
* **YAML events**: libyaml's parser events are built into Python objects directly, instead of
  composing a node tree (two objects and two marks per scalar, the peak memory of a big load) and
  constructing from it. Plain scalars are resolved by PyYAML's own resolver and constructed by
  PyYAML's own constructors, once per distinct text (equal strings come out as one shared object,
  which also shrinks what validation and compilation copy). Explicit tags other than the
  standard scalar, ``!!map`` and ``!!seq`` ones, merge keys (``<<``), recursive aliases,
  non-scalar keys and multiple documents go to the reference loader.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

log = logging.getLogger(__name__)

SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""The reference: libyaml's C loader when PyYAML was built with it (~3x the pure-Python one)."""

_CParser: Any
try:
    from yaml._yaml import CParser as _CParser
except ImportError:  # PyYAML without libyaml: only the JSON path and the reference loader
    _CParser = None


def load(text: str) -> Any:
    """The data in a YAML (or JSON) document, as ``yaml.load(text, SAFE_LOADER)`` returns it."""
    data = _json(text)
    if data is not _NOT_HANDLED:
        return data
    if _CParser is not None:
        data = _events(text)
        if data is not _NOT_HANDLED:
            return data
    return yaml.load(text, Loader=SAFE_LOADER)


class _NotHandled:
    """The fast path cannot promise the reference result for this text."""


_NOT_HANDLED: Any = _NotHandled()


class _Fallback(Exception):
    """Raised inside a fast path to hand the text to the reference loader."""


# --- JSON ----------------------------------------------------------------------------------------

_NOT_YAML_SAFE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
    r"|\\u[dD][89abAB]"
)
"""Characters YAML rejects or reads as line breaks (NEL, LS, PS), and escaped surrogates."""

MAX_JSON_KEY = 1000
"""Longer keys go to YAML, which limits an implicit key to 1024 characters."""


def _json(text: str) -> Any:
    body = text.strip(" \r\n")
    if not (body.startswith("{") and body.endswith("}")) or _NOT_YAML_SAFE.search(text):
        return _NOT_HANDLED
    try:
        return json.loads(
            body,
            parse_float=_yaml_number,
            parse_constant=str,  # NaN, Infinity, -Infinity: plain strings in YAML
            object_pairs_hook=_checked_object,
        )
    except (ValueError, RecursionError, _Fallback):
        return _NOT_HANDLED


def _yaml_number(literal: str) -> Any:
    """A JSON number with a fraction or exponent, as YAML 1.1 reads the same plain scalar."""
    tag = _resolve_plain(literal)
    if tag == "tag:yaml.org,2002:float":
        return float(literal)
    if tag == _STR:
        return literal  # e.g. 1e3: YAML 1.1 wants a dot and a signed exponent
    raise _Fallback(literal)


def _checked_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if any(len(key) > MAX_JSON_KEY for key, _ in pairs):
        raise _Fallback("long key")
    return dict(pairs)


# --- YAML events ---------------------------------------------------------------------------------

_RESOLVER = Resolver()
_CONSTRUCTOR = yaml.SafeLoader.yaml_constructors
_CONSTRUCTING = yaml.constructor.SafeConstructor()
_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_SCALAR_TAGS = frozenset(
    {
        _STR,
        "tag:yaml.org,2002:null",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp",
        "tag:yaml.org,2002:binary",
    }
)
"""Tags whose values are immutable and built by PyYAML's safe constructor from the text alone."""


def _resolve_plain(value: str) -> str:
    tag: str = _RESOLVER.resolve(ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
    return tag


def _scalar(tag: str, value: str) -> Any:
    if tag == _STR:
        return value
    if tag not in _SCALAR_TAGS:
        raise _Fallback(tag)
    return _CONSTRUCTOR[tag](_CONSTRUCTING, ScalarNode(tag, value))


def _events(text: str) -> Any:
    parser = _CParser(text)
    try:
        return _build(parser)
    except _Fallback as exc:
        log.debug("config text: %s needs the reference YAML loader", exc)
    except Exception:
        # A YAML error, or a constructor's (e.g. ``!!int abc``): the reference loader raises the
        # one users see, from the same text.
        pass
    finally:
        parser.dispose()
    return _NOT_HANDLED


def _build(parser: Any) -> Any:
    """One document's data from the parser's events (see the module docs for what falls back)."""
    get = parser.get_event
    if type(get()) is not StreamStartEvent:
        raise _Fallback("stream")
    event = get()
    if type(event) is StreamEndEvent:
        return None
    if type(event) is not DocumentStartEvent:
        raise _Fallback("document")
    plain: dict[str, Any] = {}
    """Plain scalar text -> its value (resolved and constructed once per distinct text)."""
    strings: dict[str, str] = {}
    """Every string value -> one shared object."""
    tagged: dict[tuple[str, str], Any] = {}
    anchors: dict[str, Any] = {}
    open_anchors: set[str] = set()
    no_key = _NO_KEY
    # The innermost open collection lives in locals (the hot path); enclosing ones are saved on
    # ``stack`` as (container, is a mapping, pending key, anchor). ``key`` is a mapping's key
    # read but not yet given its value, else ``no_key``.
    stack: list[tuple[Any, bool, Any, str | None]] = []
    root: Any = no_key
    container: Any = None
    is_map = False
    key: Any = no_key
    anchor: str | None = None
    while True:
        event = get()
        kind = type(event)
        if kind is ScalarEvent:
            tag = event.tag
            value = event.value
            if tag is None or tag == "!":
                if event.implicit[0]:
                    item = plain.get(value, no_key)
                    if item is no_key:
                        item = _scalar(_resolve_plain(value), value)
                        if type(item) is str:
                            item = strings.setdefault(item, item)
                        plain[value] = item
                else:
                    item = strings.setdefault(value, value)
            else:
                item = tagged.get((tag, value), no_key)
                if item is no_key:
                    item = tagged[(tag, value)] = _scalar(tag, value)
            if event.anchor is not None:
                _anchor(anchors, event.anchor, item)
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            opening = kind is MappingStartEvent
            tag = event.tag
            if tag is not None and tag != "!" and tag != (_MAP if opening else _SEQ):
                raise _Fallback(tag)
            if container is not None:
                if is_map and key is no_key:
                    raise _Fallback("a collection as a mapping key")
                stack.append((container, is_map, key, anchor))
            container = {} if opening else []
            is_map = opening
            key = no_key
            anchor = event.anchor
            if anchor is not None:
                _anchor(anchors, anchor, container)
                open_anchors.add(anchor)
            continue
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            item = container
            if anchor is not None:
                open_anchors.discard(anchor)
            if stack:
                container, is_map, key, anchor = stack.pop()
            else:
                container = None
        elif kind is AliasEvent:
            name = event.anchor
            if name not in anchors or name in open_anchors:
                raise _Fallback("alias")  # undefined (an error) or recursive
            item = anchors[name]
            if is_map and key is no_key and (type(item) is dict or type(item) is list):
                raise _Fallback("a collection as a mapping key")
        elif kind is DocumentEndEvent:
            if type(get()) is not StreamEndEvent:
                raise _Fallback("more than one document")  # an error for the reference loader
            return None if root is no_key else root
        else:
            raise _Fallback(kind.__name__)
        # Place the finished item in the innermost open collection.
        if container is None:
            root = item
        elif not is_map:
            container.append(item)
        elif key is no_key:
            key = item  # a scalar: a merge key (<<) never gets here, its tag fell back above
        else:
            container[key] = item
            key = no_key


class _NoKey:
    """No mapping key read yet (between two pairs)."""


_NO_KEY: Any = _NoKey()


def _anchor(anchors: dict[str, Any], name: str, value: Any) -> None:
    if name in anchors:
        raise _Fallback("duplicate anchor")  # an error for the reference loader
    anchors[name] = value
