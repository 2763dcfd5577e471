"""Reading OpenAI server-sent events as they pass: first token, usage, stripping the usage chunk."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.sse import StreamObserver, usage_from_body


def event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return event({"id": "c1", "object": "chat.completion.chunk", "choices": [choice], **extra})


ROLE = chunk({"role": "assistant", "content": ""})
HELLO = chunk({"content": "Hel"})
WORLD = chunk({"content": "lo, world"})
FINISH = chunk({}, finish="stop")
USAGE = event(
    {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }
)
DONE = event("[DONE]")

STREAM_EVENTS = [ROLE, HELLO, WORLD, FINISH, USAGE, DONE]
STREAM = b"".join(STREAM_EVENTS)
STRIPPED = b"".join(e for e in STREAM_EVENTS if e is not USAGE)


def run(observer: StreamObserver, pieces: list[bytes], start: float = 0.0) -> bytes:
    """Feed ``pieces`` at times start, start+1, ...; return what the client receives."""
    out = []
    for index, piece in enumerate(pieces):
        replacement = observer.feed(piece, start + index)
        out.append(piece if replacement is None else replacement)
    out.append(observer.finish())
    return b"".join(out)


# --- first token -------------------------------------------------------------------------------


@pytest.mark.parametrize("strip", [True, False])
def test_stream_observer_first_token_at_first_content_not_role_chunk(strip: bool) -> None:
    observer = StreamObserver(strip_usage=strip)
    observer.feed(ROLE, 1.0)
    assert observer.first_token_at is None
    observer.feed(HELLO, 2.0)
    assert observer.first_token_at == 2.0
    observer.feed(WORLD, 3.0)
    observer.feed(USAGE, 4.0)
    assert observer.first_token_at == 2.0


def test_stream_observer_role_chunk_without_content_key_is_not_a_token() -> None:
    observer = StreamObserver(strip_usage=False)
    observer.feed(chunk({"role": "assistant"}), 1.0)
    observer.feed(FINISH, 2.0)
    assert observer.first_token_at is None


def test_stream_observer_tool_call_delta_counts_as_first_token() -> None:
    observer = StreamObserver(strip_usage=False)
    observer.feed(ROLE, 1.0)
    observer.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}), 2.5)
    assert observer.first_token_at == 2.5


def test_stream_observer_legacy_completion_text_counts_as_first_token() -> None:
    observer = StreamObserver(strip_usage=False)
    observer.feed(event({"object": "text_completion", "choices": [{"text": ""}]}), 1.0)
    assert observer.first_token_at is None
    observer.feed(event({"object": "text_completion", "choices": [{"text": "Hi"}]}), 2.0)
    assert observer.first_token_at == 2.0


def test_stream_observer_first_token_in_a_split_event_is_when_it_completes() -> None:
    observer = StreamObserver(strip_usage=False)
    observer.feed(ROLE + HELLO[:10], 1.0)
    assert observer.first_token_at is None
    observer.feed(HELLO[10:], 2.0)
    assert observer.first_token_at == 2.0


# --- usage -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strip", [True, False])
def test_stream_observer_reads_usage_from_final_chunk(strip: bool) -> None:
    observer = StreamObserver(strip_usage=strip)
    run(observer, STREAM_EVENTS)
    assert observer.prompt_tokens == 11
    assert observer.completion_tokens == 3


def test_stream_observer_without_usage_chunk_has_no_usage() -> None:
    observer = StreamObserver(strip_usage=True)
    out = run(observer, [ROLE, HELLO, FINISH, DONE])
    assert out == ROLE + HELLO + FINISH + DONE
    assert observer.prompt_tokens is None
    assert observer.completion_tokens is None


def test_stream_observer_usage_null_on_content_chunks_is_kept() -> None:
    # OpenAI sends "usage": null on every chunk once include_usage is on.
    events = [
        chunk({"role": "assistant", "content": ""}, usage=None),
        chunk({"content": "Hi"}, usage=None),
        USAGE,
        DONE,
    ]
    observer = StreamObserver(strip_usage=True)
    out = run(observer, events)
    assert out == events[0] + events[1] + DONE
    assert observer.first_token_at == 1.0
    assert observer.completion_tokens == 3


def test_stream_observer_usage_on_a_chunk_with_choices_is_read_not_stripped() -> None:
    last = chunk(
        {"content": "!"}, finish="stop", usage={"prompt_tokens": 4, "completion_tokens": 9}
    )
    observer = StreamObserver(strip_usage=True)
    out = run(observer, [ROLE, HELLO, last, DONE])
    assert out == ROLE + HELLO + last + DONE
    assert (observer.prompt_tokens, observer.completion_tokens) == (4, 9)


# --- stripping the usage chunk -----------------------------------------------------------------


def test_stream_observer_strips_usage_chunk_event_by_event() -> None:
    observer = StreamObserver(strip_usage=True)
    replies = [observer.feed(piece, 0.0) for piece in STREAM_EVENTS]
    assert replies == [None, None, None, None, b"", None]  # whole events pass untouched
    assert observer.finish() == b""


def test_stream_observer_strips_usage_chunk_inside_one_big_chunk() -> None:
    observer = StreamObserver(strip_usage=True)
    assert observer.feed(STREAM, 0.0) == STRIPPED
    assert observer.finish() == b""
    assert observer.completion_tokens == 3


def test_stream_observer_strip_at_every_split_offset() -> None:
    for offset in range(len(STREAM) + 1):
        observer = StreamObserver(strip_usage=True)
        out = run(observer, [STREAM[:offset], STREAM[offset:]])
        assert out == STRIPPED, f"split at byte {offset}"
        assert out.endswith(DONE)
        assert observer.prompt_tokens == 11
        assert observer.completion_tokens == 3
        assert observer.first_token_at is not None


def test_stream_observer_strip_at_every_pair_of_split_offsets() -> None:
    n = len(STREAM)
    for first in range(0, n + 1, 7):
        for second in range(first, n + 1, 5):
            observer = StreamObserver(strip_usage=True)
            pieces = [STREAM[:first], STREAM[first:second], STREAM[second:]]
            assert run(observer, pieces) == STRIPPED, f"split at {first} and {second}"


def test_stream_observer_strip_byte_by_byte() -> None:
    observer = StreamObserver(strip_usage=True)
    pieces = [STREAM[i : i + 1] for i in range(len(STREAM))]
    assert run(observer, pieces) == STRIPPED
    assert observer.completion_tokens == 3
    # The first content event completes with its last byte, at that byte's feed time.
    assert observer.first_token_at == float(len(ROLE) + len(HELLO) - 1)


def test_stream_observer_strip_keeps_order_of_interleaved_events() -> None:
    comment = b": keep-alive\n\n"
    named = b"event: ping\ndata: {}\n\n"
    events = [comment, ROLE, HELLO, named, WORLD, FINISH, USAGE, comment, DONE]
    stream = b"".join(events)
    expected = b"".join(e for e in events if e is not USAGE)
    for offset in range(len(stream) + 1):
        observer = StreamObserver(strip_usage=True)
        assert run(observer, [stream[:offset], stream[offset:]]) == expected


def test_stream_observer_strip_returns_held_unterminated_tail_at_finish() -> None:
    observer = StreamObserver(strip_usage=True)
    tail = b"data: [DONE]"  # no final blank line
    assert observer.feed(ROLE + HELLO + tail, 0.0) == ROLE + HELLO
    assert observer.finish() == tail


def test_stream_observer_strip_does_not_buffer_complete_events() -> None:
    observer = StreamObserver(strip_usage=True)
    # A chunk that ends mid-event sends its complete events on at once.
    assert observer.feed(ROLE + HELLO + WORLD[:7], 0.0) == ROLE + HELLO
    assert observer.feed(WORLD[7:], 1.0) == WORLD


def test_stream_observer_strip_handles_crlf_event_separators() -> None:
    # The SSE spec allows CRLF line endings (sse-starlette uses them by default): events must
    # still pass as they complete, and the usage chunk must still be stripped.
    def crlf(data: bytes) -> bytes:
        return data.replace(b"\n", b"\r\n")

    observer = StreamObserver(strip_usage=True)
    replies = [observer.feed(crlf(piece), float(i)) for i, piece in enumerate(STREAM_EVENTS)]
    out = b"".join(
        crlf(piece) if reply is None else reply
        for piece, reply in zip(STREAM_EVENTS, replies, strict=True)
    )
    out += observer.finish()
    assert replies[0] in (None, crlf(ROLE)), "a complete event was held back"
    assert observer.first_token_at == 1.0
    assert out == crlf(STRIPPED)


def test_stream_observer_reads_usage_and_first_token_with_crlf_separators() -> None:
    # Without stripping nothing is modified, but the events must still be observed: otherwise a
    # CRLF-speaking upstream never yields a TTFT, token count or TPOT sample.
    observer = StreamObserver(strip_usage=False)
    for i, piece in enumerate(STREAM_EVENTS):
        assert observer.feed(piece.replace(b"\n", b"\r\n"), float(i)) is None
    assert observer.first_token_at == 1.0
    assert (observer.prompt_tokens, observer.completion_tokens) == (11, 3)


# --- without stripping -------------------------------------------------------------------------


def test_stream_observer_without_strip_never_modifies_at_any_split() -> None:
    for offset in range(len(STREAM) + 1):
        observer = StreamObserver(strip_usage=False)
        assert observer.feed(STREAM[:offset], 1.0) is None
        assert observer.feed(STREAM[offset:], 2.0) is None
        assert observer.finish() == b""
        assert observer.prompt_tokens == 11
        assert observer.completion_tokens == 3


def test_stream_observer_without_strip_byte_by_byte_reads_usage() -> None:
    observer = StreamObserver(strip_usage=False)
    for i in range(len(STREAM)):
        assert observer.feed(STREAM[i : i + 1], float(i)) is None
    assert observer.finish() == b""
    assert (observer.prompt_tokens, observer.completion_tokens) == (11, 3)
    assert observer.first_token_at == float(len(ROLE) + len(HELLO) - 1)


def test_stream_observer_ignores_garbage_events() -> None:
    garbage = b"data: {not json\n\ndata: [1, 2]\n\nretry: 100\n\n"
    observer = StreamObserver(strip_usage=True)
    stream = garbage + HELLO + USAGE + DONE
    assert run(observer, [stream]) == garbage + HELLO + DONE
    assert observer.completion_tokens == 3


# --- non-streamed bodies -----------------------------------------------------------------------


def test_usage_from_body_chat_completion() -> None:
    body = json.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "model": "served-x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
        }
    ).encode()
    assert usage_from_body(body) == (7, 5, "served-x")


def test_usage_from_body_embeddings_has_no_completion_tokens() -> None:
    body = json.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        }
    ).encode()
    assert usage_from_body(body) == (8, None, "text-embedding-3-small")


def test_usage_from_body_without_usage_keeps_model() -> None:
    assert usage_from_body(b'{"model": "m", "choices": []}') == (None, None, "m")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b"<html>Bad Gateway</html>",
        b"[1, 2, 3]",
        b'"text"',
        b"\xff\xfe\x00garbage",
    ],
)
def test_usage_from_body_invalid_json_is_empty(body: bytes) -> None:
    assert usage_from_body(body) == (None, None, None)


def test_usage_from_body_ignores_non_integer_counts() -> None:
    body = b'{"model": 5, "usage": {"prompt_tokens": "7", "completion_tokens": 5.5}}'
    assert usage_from_body(body) == (None, None, None)
