"""Reading an OpenAI server-sent-event stream as it passes, without buffering it.

This module owns what the gateway learns from a streamed response: when the first output token
arrived and the final ``usage`` (from the usage chunk OpenAI-compatible servers send when asked
with ``stream_options.include_usage``). When the gateway asked for that chunk on the client's
behalf, it removes it so the client sees exactly the stream it asked for. Events that span chunk
boundaries are reassembled; bytes only wait while an event is incomplete and stripping is on.
"""

from __future__ import annotations

import json
import re
from typing import Any

_SEPARATOR = re.compile(rb"\r?\n\r?\n")
"""The blank line ending an SSE event; the spec allows LF and CRLF line endings."""


class StreamObserver:
    """Feeds on response chunks; reports first-token time and usage."""

    __slots__ = ("_pending", "completion_tokens", "first_token_at", "prompt_tokens", "strip_usage")

    def __init__(self, strip_usage: bool) -> None:
        """Observe a stream; ``strip_usage`` removes the usage-only chunk from what passes."""
        self.strip_usage = strip_usage
        self._pending = b""
        self.first_token_at: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, chunk: bytes, now: float) -> bytes | None:
        """Observe one chunk; return the bytes to send instead, or None to send it unchanged."""
        data = self._pending + chunk
        last_end = -1
        kept: list[bytes] = []
        removed = False
        start = 0
        for match in _SEPARATOR.finditer(data):
            event = data[start : match.start()]
            whole = data[start : match.end()]
            start = last_end = match.end()
            if not event.strip():
                kept.append(whole)
                continue
            if self._observe(event, now) and self.strip_usage:
                removed = True
                continue
            kept.append(whole)
        if last_end < 0:
            self._pending = data
            return b"" if self.strip_usage else None
        complete, self._pending = data[:last_end], data[last_end:]
        if not self.strip_usage:
            return None
        if not removed and not self._pending:
            return None if complete == chunk else complete
        return b"".join(kept)

    def finish(self) -> bytes:
        """Bytes held back at the end of the stream (an unterminated last event)."""
        rest, self._pending = self._pending, b""
        return rest if self.strip_usage else b""

    def _observe(self, event: bytes, now: float) -> bool:
        """Note first token and usage; return True for a usage-only chunk."""
        needs_token = self.first_token_at is None
        if not needs_token and b'"usage"' not in event:
            return False
        payload = _data(event)
        if payload is None:
            return False
        if needs_token and _has_output(payload):
            self.first_token_at = now
        usage = payload.get("usage")
        if isinstance(usage, dict):
            prompt = usage.get("prompt_tokens")
            completion = usage.get("completion_tokens")
            if isinstance(prompt, int):
                self.prompt_tokens = prompt
            if isinstance(completion, int):
                self.completion_tokens = completion
            return not payload.get("choices")
        return False


def _data(event: bytes) -> dict[str, Any] | None:
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    text = b"\n".join(lines)
    if text == b"[DONE]":
        return None
    try:
        decoded = json.loads(text)
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


def _has_output(payload: dict[str, Any]) -> bool:
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
            return True
        if choice.get("text"):
            return True
    return False


def usage_from_body(body: bytes) -> tuple[int | None, int | None, str | None]:
    """(prompt tokens, completion tokens, model) from a non-streamed JSON response."""
    try:
        decoded = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None, None, None
    return usage_of(decoded)


def usage_of(decoded: Any) -> tuple[int | None, int | None, str | None]:
    """(prompt tokens, completion tokens, model) from a decoded JSON response."""
    if not isinstance(decoded, dict):
        return None, None, None
    model = decoded.get("model") if isinstance(decoded.get("model"), str) else None
    model = model or None
    usage = decoded.get("usage")
    if not isinstance(usage, dict):
        return None, None, model
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
        model,
    )
