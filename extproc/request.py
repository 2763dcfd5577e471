"""What a client request means, and what each target receives: pure functions, no I/O.

This module owns the OpenAI API surface the gateway routes (paths, the ``model`` field, content
type checks) and the per-target rewrite of a request (model name, ``override_params``, path and
headers). It never decides which target to use; ``routing.table`` does that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from extproc.errors import InvalidRequest, NotFound, UnsupportedMediaType
from extproc.routing.model import Operation, Target

OPERATIONS: Mapping[str, tuple[Operation, str]] = {
    "/v1/chat/completions": ("chat", "/chat/completions"),
    "/v1/completions": ("completion", "/completions"),
    "/v1/embeddings": ("embedding", "/embeddings"),
}
"""Routed client paths: the operation and the path suffix appended to a provider's base URL."""

MODELS_PATH = "/v1/models"


def split_path(path: str) -> tuple[str, str]:
    """Split ``:path`` into the path without a trailing slash and the query string."""
    base, _, query = path.partition("?")
    if len(base) > 1:
        base = base.rstrip("/")
    return base, query


def operation_for(path: str) -> tuple[Operation, str]:
    """The operation and upstream path suffix for a routed path, or ``NotFound``."""
    found = OPERATIONS.get(path)
    if found is None:
        raise NotFound(f"Unknown API path '{path}'. Routed paths: {', '.join(OPERATIONS)}.")
    return found


def check_content_type(content_type: str | None) -> None:
    """Reject bodies declared as anything but JSON; a missing content type is accepted."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"Unsupported content type '{media}': send the body as JSON with"
            " 'Content-Type: application/json'."
        )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(body: bytes) -> tuple[dict[str, Any], str]:
    """Decode a request body and return it with its ``model``, or raise ``InvalidRequest``."""
    if not body.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object with 'model'.")
    try:
        decoded = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = decoded.get("model")
    if model is None:
        raise InvalidRequest("The request body has no 'model' field.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("The 'model' field must be a non-empty string.", param="model")
    return decoded, model


def wants_usage_injection(body: Mapping[str, Any], operation: str) -> bool:
    """Whether a streamed request lacks ``stream_options.include_usage`` (we then ask for it)."""
    if operation == "embedding" or body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


METADATA_HEADER = "x-gateway-metadata"
EXPLAIN_HEADER = "x-gateway-explain"


def parse_metadata_header(value: str | None) -> dict[str, str]:
    """Client metadata from ``x-gateway-metadata``: a JSON object of strings (else 400)."""
    if value is None or not value.strip():
        return {}
    try:
        decoded = json.loads(value)
    except ValueError:
        raise InvalidRequest(
            f"The {METADATA_HEADER} header must be a JSON object of strings; it is not valid JSON."
        ) from None
    if not isinstance(decoded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in decoded.items()
    ):
        raise InvalidRequest(f"The {METADATA_HEADER} header must be a JSON object of strings.")
    return decoded


def last_user_text(body: Mapping[str, Any]) -> str:
    """The text category rules look at: the last user message (or the prompt / input)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text_of(message.get("content"))
        return ""
    for key in ("prompt", "input"):
        if key in body:
            return _text_of(body[key])
    return ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return ""


def target_body(
    original: Mapping[str, Any], target: Target, *, include_usage: bool = False
) -> bytes:
    """The body one target receives: the client's body, model renamed, override params merged.

    Built from the client's original body for every attempt, never from an earlier rewrite.
    Unknown fields pass through; the target's ``override_params`` win over the client's values.
    ``include_usage`` adds ``stream_options.include_usage`` so the stream reports its tokens.
    """
    body = dict(original)
    body.update(target.override_params)
    body["model"] = target.model.upstream_model
    if include_usage:
        options = body.get("stream_options")
        merged = dict(options) if isinstance(options, dict) else {}
        merged["include_usage"] = True
        body["stream_options"] = merged
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def upstream_path(target: Target, suffix: str, query: str) -> str:
    """The ``:path`` sent to the target's provider."""
    path = target.model.provider.path_prefix + suffix
    return f"{path}?{query}" if query else path
