"""The router-level and upstream-level ext_proc streams, driven with real protobuf messages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from random import Random
from typing import Any

import pytest
from google.protobuf import json_format

from extproc import envoy
from extproc._gen import ext_proc_pb2 as pb
from extproc.envoy_config import METADATA_NS, PRIORITY_GROUP_NS, REQUEST_NS, RETRY_HEADER
from extproc.processor import RouterStream, Runtime, UpstreamStream
from extproc.routing.table import RoutingTable
from tests.unit.support import (
    CHAT_PATH,
    OPENAI_PROVIDER,
    FakeClock,
    SyncRouter,
    body_message,
    client_headers,
    headers_message,
    request_id_of,
    start_attempt,
    table_from_yaml,
    upstream_body,
    upstream_status,
)

CONFIG = (
    "\nproviders:"
    + OPENAI_PROVIDER
    + """  - name: onprem
    type: openai-compatible
    base_url: http://127.0.0.1:8001/openai/v1/
    models: [{name: llama, model: meta-llama/Llama-3.1-8B-Instruct}]
virtual_model_groups:
  - name: prod
    virtual_models:
      - name: chat
        slug: prod-chat
        routing_config:
          type: priority-based-routing
          attempt_timeout_ms: 30000
          load_balance_targets:
            - target: openai/gpt-4o
              priority: 0
              retry_config: {attempts: 2, delay: 0}
              override_params: {temperature: 0.2, max_tokens: 64}
              headers_override:
                set: {X-Team: gateway, x-openai-only: "1"}
                remove: [x-client-trace]
            - target: onprem/llama
              priority: 1
              retry_config: {attempts: 1}
              headers_override:
                set: {x-onprem: "yes"}
      - name: slow
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: openai/gpt-4o, priority: 0, retry_config: {attempts: 2, delay: 1500}}
"""
)

OPENAI_KEY = "sk-test-123"
SPOOFED_ID_HEADER = "x-vm-request-id"


def _table() -> RoutingTable:
    return table_from_yaml(CONFIG, environ={"TEST_OPENAI_KEY": OPENAI_KEY})


@pytest.fixture()
def runtime() -> Runtime:
    return Runtime(_table(), rng=Random(1), clock=FakeClock(100.0))


# --- message builders (more in tests.unit.support) --------------------------------------------


def json_body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# --- response readers --------------------------------------------------------------------------


def common_of(response: pb.ProcessingResponse) -> pb.CommonResponse:
    kind = response.WhichOneof("response")
    assert kind in ("request_headers", "response_headers", "request_body", "response_body")
    return getattr(response, kind).response


def set_headers(response: pb.ProcessingResponse) -> dict[str, str]:
    options = common_of(response).header_mutation.set_headers
    out = {o.header.key: o.header.raw_value.decode() for o in options}
    assert len(out) == len(options), "a header is set twice"
    assert all(not o.header.value for o in options), "values must go in raw_value"
    return out


def removed_headers(response: pb.ProcessingResponse) -> list[str]:
    return list(common_of(response).header_mutation.remove_headers)


def metadata(response: pb.ProcessingResponse) -> dict[str, Any]:
    return json_format.MessageToDict(response.dynamic_metadata)


def reply_headers(response: pb.ProcessingResponse) -> dict[str, str]:
    """The gateway response headers a reply publishes (the route renders them for the client)."""
    published = dict(metadata(response).get(METADATA_NS, {}))
    published.pop("content_length", None)
    return published


def groups(response: pb.ProcessingResponse) -> list[str]:
    """The clusters of the priority-group metadata, one per attempt, checking the group shape."""
    pg = metadata(response)[PRIORITY_GROUP_NS]["priority_groups"]
    clusters = []
    for index, group in enumerate(pg):
        assert group["name"] == f"a{index}"
        assert len(group["clusters"]) == 1
        assert group["clusters"][0]["weight"] == 1
        clusters.append(group["clusters"][0]["cluster_name"])
    return clusters


def immediate(response: pb.ProcessingResponse) -> tuple[int, dict[str, Any]]:
    assert response.WhichOneof("response") == "immediate_response"
    reply = response.immediate_response
    content_types = [
        o.header.raw_value.decode()
        for o in reply.headers.set_headers
        if o.header.key == "content-type"
    ]
    assert content_types == ["application/json"]
    return reply.status.code, json.loads(reply.body)


def error_of(response: pb.ProcessingResponse, status: int) -> dict[str, Any]:
    code, body = immediate(response)
    assert code == status
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def assert_passthrough(response: pb.ProcessingResponse, kind: str) -> None:
    assert response.WhichOneof("response") == kind
    common = getattr(response, kind).response
    assert common.status == envoy.CONTINUE
    assert not common.HasField("header_mutation")
    assert not common.HasField("body_mutation")
    assert not response.HasField("dynamic_metadata")
    assert not response.HasField("mode_override")


# --- flow helpers ------------------------------------------------------------------------------


def start(
    runtime: Runtime,
    body: bytes,
    *,
    path: str = CHAT_PATH,
    extra: Iterable[tuple[str, str]] = (),
) -> tuple[RouterStream, pb.ProcessingResponse]:
    """Run the router stream's request phase; return the stream and the request_body reply."""
    router = SyncRouter(runtime)
    reply = router.handle(headers_message("request_headers", client_headers(path, extra=extra)))
    assert reply.WhichOneof("response") == "request_headers"
    return router, router.handle(body_message("request_body", body))


def sent_body(reply: pb.ProcessingResponse) -> dict[str, Any]:
    common = reply.request_headers.response
    assert common.status == envoy.CONTINUE_AND_REPLACE
    return json.loads(common.body_mutation.body)


CHAT_BODY = json_body(
    model="prod-chat",
    messages=[{"role": "user", "content": "hi"}],
    temperature=0.9,
    vendor_extension={"keep": True},
)

CLIENT_EXTRA = (
    ("x-team", "client-team"),
    ("x-client-trace", "trace-1"),
    ("authorization", "Bearer client-key"),
)


def first_attempt(runtime: Runtime, body: bytes = CHAT_BODY) -> UpstreamStream:
    """Route ``body`` on a router stream, then open Envoy's first attempt; return its stream."""
    _, reply = start(runtime, body)
    upstream, _ = start_attempt(runtime, request_id_of(reply), 1)
    return upstream


# --- GET /v1/models and request validation ------------------------------------------------------


def test_router_stream_models_list_is_immediate_200(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    reply = router.handle(
        headers_message(
            "request_headers", client_headers("/v1/models", "GET", None), end_of_stream=True
        )
    )
    status, body = immediate(reply)
    assert status == 200
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert set(ids) == set(runtime.table.names())
    assert len(ids) == len(set(ids))
    owners = {m["id"]: m["owned_by"] for m in body["data"]}
    assert owners["prod/chat"] == owners["prod-chat"] == "virtual"
    assert owners["openai/gpt-4o"] == "openai"
    assert owners["onprem/llama"] == "onprem"
    assert all(m["object"] == "model" for m in body["data"])


def test_router_stream_models_list_accepts_trailing_slash_and_query(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    reply = router.handle(
        headers_message("request_headers", client_headers("/v1/models/?x=1", "GET", None))
    )
    assert immediate(reply)[0] == 200


def test_router_stream_unknown_path_is_404(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    reply = router.handle(headers_message("request_headers", client_headers("/v1/assistants")))
    error = error_of(reply, 404)
    assert error["code"] == "not_found"
    assert error["type"] == "invalid_request_error"
    assert "/v1/assistants" in error["message"]
    assert reply.immediate_response.details == "vmrouter_not_found"


def test_router_stream_wrong_method_is_405(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    reply = router.handle(headers_message("request_headers", client_headers(method="GET")))
    error = error_of(reply, 405)
    assert error["code"] == "method_not_allowed"
    assert "POST" in error["message"]


def test_router_stream_models_list_with_post_is_405(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    reply = router.handle(headers_message("request_headers", client_headers("/v1/models")))
    assert "GET" in error_of(reply, 405)["message"]


def test_router_stream_wrong_content_type_is_415(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    reply = router.handle(
        headers_message("request_headers", client_headers(content_type="text/plain"))
    )
    error = error_of(reply, 415)
    assert error["code"] == "unsupported_media_type"
    assert "text/plain" in error["message"]


@pytest.mark.parametrize(
    "content_type", [None, "application/json; charset=utf-8", "application/vnd.api+json"]
)
def test_router_stream_json_or_missing_content_type_is_accepted(
    runtime: Runtime, content_type: str | None
) -> None:
    router = SyncRouter(runtime)
    reply = router.handle(
        headers_message("request_headers", client_headers(content_type=content_type))
    )
    assert_passthrough(reply, "request_headers")


def test_router_stream_empty_body_at_headers_end_of_stream_is_400(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    reply = router.handle(headers_message("request_headers", client_headers(), end_of_stream=True))
    error = error_of(reply, 400)
    assert "empty" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "fragment", "param"),
    [
        (b"{not json", "not valid JSON", None),
        (b'{"model": NaN}', "not valid JSON", None),
        (b"[1, 2]", "must be a JSON object", None),
        (b'{"messages": []}', "no 'model' field", "model"),
        (b'{"model": 5}', "must be a non-empty string", "model"),
        (b'{"model": ""}', "must be a non-empty string", "model"),
        (b"  ", "empty", None),
    ],
)
def test_router_stream_bad_body_is_400(
    runtime: Runtime, body: bytes, fragment: str, param: str | None
) -> None:
    _, reply = start(runtime, body)
    error = error_of(reply, 400)
    assert fragment in error["message"]
    assert error["param"] == param
    assert error["code"] == "invalid_request"
    assert runtime.requests == {}


def test_router_stream_unknown_model_is_404_naming_it(runtime: Runtime) -> None:
    _, reply = start(runtime, json_body(model="gpt-5", messages=[]))
    error = error_of(reply, 404)
    assert "gpt-5" in error["message"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"


def test_router_stream_embeddings_on_chat_only_model_is_400(runtime: Runtime) -> None:
    _, reply = start(runtime, json_body(model="prod/chat", input="x"), path="/v1/embeddings")
    error = error_of(reply, 400)
    assert error["code"] == "unsupported_operation"
    assert "embeddings" in error["message"]


def test_router_stream_embeddings_on_embedding_model_is_routed(runtime: Runtime) -> None:
    router, reply = start(
        runtime, json_body(model="openai/embed", input="x"), path="/v1/embeddings"
    )
    request_id = request_id_of(reply)
    _, first = start_attempt(runtime, request_id, 1, path="/v1/embeddings")
    assert set_headers(first)[":path"] == "/v1/embeddings"
    assert sent_body(first)["model"] == "text-embedding-3-small"
    router.close()


# --- request headers and body ------------------------------------------------------------------


def test_router_stream_removes_client_sent_internal_headers(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    extra = [(SPOOFED_ID_HEADER, "spoofed"), (RETRY_HEADER, "1"), ("x-vmware", "kept")]
    reply = router.handle(headers_message("request_headers", client_headers(extra=extra)))
    assert reply.WhichOneof("response") == "request_headers"
    assert sorted(removed_headers(reply)) == sorted([SPOOFED_ID_HEADER, RETRY_HEADER])
    assert set_headers(reply) == {}


def test_router_stream_without_internal_headers_changes_nothing(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    reply = router.handle(headers_message("request_headers", client_headers()))
    assert_passthrough(reply, "request_headers")


def test_router_stream_body_sets_routing_headers_and_attempt_groups(runtime: Runtime) -> None:
    router, reply = start(runtime, CHAT_BODY)
    assert reply.WhichOneof("response") == "request_body"
    common = reply.request_body.response
    assert common.clear_route_cache is True
    headers = set_headers(reply)
    request_id = request_id_of(reply)
    assert request_id
    # the id travels as forwarded metadata: a header would reach the providers
    assert SPOOFED_ID_HEADER not in headers
    assert set(headers) == {"x-envoy-max-retries", "x-envoy-upstream-rq-per-try-timeout-ms"}
    # openai/gpt-4o has two slots, onprem/llama one: three attempts, two retries
    assert headers["x-envoy-max-retries"] == "2"
    assert headers["x-envoy-upstream-rq-per-try-timeout-ms"] == "30000"
    assert groups(reply) == ["provider_openai", "provider_openai", "provider_onprem"]
    assert set(metadata(reply)) == {PRIORITY_GROUP_NS, REQUEST_NS, METADATA_NS}
    # Should Envoy answer before any attempt reaches us, the first one's connection failed.
    assert reply_headers(reply) == {
        "x-gateway-virtual-model": "prod/chat",
        "x-gateway-target": "openai/gpt-4o",
        "x-gateway-served-model": "gpt-4o-2024-08-06",
        "x-gateway-attempts": "openai/gpt-4o:connect-error",
    }
    assert request_id in runtime.requests
    assert router.context is runtime.requests[request_id]


def test_router_stream_request_ids_are_unique(runtime: Runtime) -> None:
    _, first = start(runtime, CHAT_BODY)
    _, second = start(runtime, CHAT_BODY)
    assert request_id_of(first) != request_id_of(second)
    assert len(runtime.requests) == 2


def test_router_stream_per_try_timeout_defaults_to_gateway_setting(runtime: Runtime) -> None:
    _, reply = start(runtime, json_body(model="openai/gpt-4o", messages=[]))
    headers = set_headers(reply)
    assert headers["x-envoy-upstream-rq-per-try-timeout-ms"] == "600000"
    assert headers["x-envoy-max-retries"] == "0"
    assert groups(reply) == ["provider_openai"]


def test_router_stream_close_forgets_the_request(runtime: Runtime) -> None:
    router, reply = start(runtime, CHAT_BODY)
    request_id = request_id_of(reply)
    assert request_id in runtime.requests
    router.close()
    assert request_id not in runtime.requests
    router.close()  # idempotent


def test_router_stream_close_before_any_request_is_harmless(runtime: Runtime) -> None:
    SyncRouter(runtime).close()
    assert runtime.requests == {}


# --- upstream attempts -------------------------------------------------------------------------


def test_upstream_stream_rewrites_first_attempt_for_its_target(runtime: Runtime) -> None:
    path = CHAT_PATH + "?api-version=2024"
    extra = CLIENT_EXTRA
    _, reply = start(runtime, CHAT_BODY, path=path, extra=extra)
    _, first = start_attempt(runtime, request_id_of(reply), 1, extra, path=path)
    assert first.WhichOneof("response") == "request_headers"
    body = sent_body(first)
    assert body == {
        "model": "gpt-4o-2024-08-06",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,  # the target's override wins
        "max_tokens": 64,
        "vendor_extension": {"keep": True},
    }
    headers = set_headers(first)
    assert headers[":path"] == "/v1/chat/completions?api-version=2024"
    assert headers[":authority"] == "api.openai.com"
    assert headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert headers["x-team"] == "gateway"
    assert headers["x-openai-only"] == "1"
    assert "x-client-trace" in removed_headers(first)
    assert "x-client-trace" not in headers
    raw = first.request_headers.response.body_mutation.body
    assert set(metadata(first)) == {METADATA_NS}
    assert metadata(first)[METADATA_NS]["content_length"] == str(len(raw))
    # Should Envoy answer before this attempt does, it timed out.
    assert reply_headers(first) == {
        "x-gateway-target": "openai/gpt-4o",
        "x-gateway-served-model": "gpt-4o-2024-08-06",
        "x-gateway-attempts": "openai/gpt-4o:timeout",
    }


def test_upstream_stream_first_attempt_sends_only_real_header_changes(runtime: Runtime) -> None:
    # The first attempt carries the client's headers as they came: restoring a header to the
    # client's value, or removing one the client never sent, would be work for nothing.
    _, reply = start(runtime, CHAT_BODY, extra=CLIENT_EXTRA)
    _, first = start_attempt(runtime, request_id_of(reply), 1, CLIENT_EXTRA)
    headers, removed = set_headers(first), removed_headers(first)
    assert sorted(removed) == ["x-client-trace"]  # openai's headers_override removes it
    assert {k: v for k, v in headers.items() if not k.startswith(":")} == {
        "authorization": f"Bearer {OPENAI_KEY}",  # the client's own key is replaced, never sent
        "x-team": "gateway",
        "x-openai-only": "1",
    }
    assert "x-onprem" not in headers  # managed for onprem/llama, never sent by the client


def test_upstream_stream_query_string_is_kept_on_provider_path(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    router.handle(
        headers_message("request_headers", client_headers(CHAT_PATH + "?api-version=2024"))
    )
    reply = router.handle(body_message("request_body", json_body(model="onprem/llama")))
    _, first = start_attempt(runtime, request_id_of(reply), 1)
    headers = set_headers(first)
    assert headers[":path"] == "/openai/v1/chat/completions?api-version=2024"
    assert headers[":authority"] == "127.0.0.1:8001"
    assert sent_body(first) == {"model": "meta-llama/Llama-3.1-8B-Instruct"}


def test_upstream_stream_second_target_restores_headers_the_first_changed(
    runtime: Runtime,
) -> None:
    client = CLIENT_EXTRA
    _, reply = start(runtime, CHAT_BODY, extra=client)
    request_id = request_id_of(reply)
    upstream, first = start_attempt(runtime, request_id, 1, client)
    # Envoy keeps the first attempt's header changes for the retry: simulate what it now holds.
    carried = dict(client)
    carried.update({k: v for k, v in set_headers(first).items() if not k.startswith(":")})
    for name in removed_headers(first):
        carried.pop(name, None)
    assert carried == {
        "x-team": "gateway",
        "x-openai-only": "1",
        "authorization": f"Bearer {OPENAI_KEY}",
    }
    retry = upstream_status(upstream, 401)  # fallback-only: straight to onprem/llama
    assert set_headers(retry) == {RETRY_HEADER: "1"}
    assert groups(retry) == ["provider_openai", "provider_onprem"]

    _, second = start_attempt(runtime, request_id, 2, list(carried.items()))
    headers = set_headers(second)
    removed = removed_headers(second)
    assert headers["x-team"] == "client-team"  # the client's value is back
    assert headers["x-client-trace"] == "trace-1"  # removed by openai only
    assert headers["x-onprem"] == "yes"
    assert "x-openai-only" in removed  # the client never sent it
    assert "authorization" in removed  # onprem has no credential; never leak openai's
    assert "authorization" not in headers
    assert headers[":path"] == "/openai/v1/chat/completions"
    assert headers[":authority"] == "127.0.0.1:8001"
    body = sent_body(second)
    assert body["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert body["temperature"] == 0.9  # built from the client's body, not openai's rewrite
    assert "max_tokens" not in body


def test_upstream_stream_retry_status_sets_retry_header_and_groups(runtime: Runtime) -> None:
    _, reply = start(runtime, CHAT_BODY)
    request_id = request_id_of(reply)
    upstream, _ = start_attempt(runtime, request_id, 1)
    retry = upstream_status(upstream, 503)
    assert retry.WhichOneof("response") == "response_headers"
    assert set_headers(retry) == {RETRY_HEADER: "1"}
    assert groups(retry) == ["provider_openai", "provider_openai", "provider_onprem"]
    assert not retry.HasField("mode_override")  # Envoy drops this response: no body for us
    # Should the retry never reach us, its connection failed.
    assert reply_headers(retry)["x-gateway-attempts"] == (
        "openai/gpt-4o:503,openai/gpt-4o:connect-error"
    )
    _, second = start_attempt(runtime, request_id, 2)
    assert set_headers(second)[":authority"] == "api.openai.com"


def test_upstream_stream_final_status_sets_no_retry_header(runtime: Runtime) -> None:
    for status in (200, 400):
        upstream = first_attempt(runtime)
        final = upstream_status(upstream, status, (RETRY_HEADER, "1"))
        assert set_headers(final) == {}
        # A provider's own x-vm-retry must not make Envoy retry the answer.
        assert removed_headers(final) == [RETRY_HEADER]
        assert final.mode_override.response_body_mode == envoy.BODY_BUFFERED


def test_upstream_stream_attempt_after_plan_ended_is_answered_locally(runtime: Runtime) -> None:
    _, reply = start(runtime, CHAT_BODY)
    request_id = request_id_of(reply)
    upstream, _ = start_attempt(runtime, request_id, 1)
    upstream_status(upstream, 503)
    upstream, _ = start_attempt(runtime, request_id, 2)
    upstream_status(upstream, 503)
    # Envoy retries a refused connection on its own: the plan has no slot for attempt 4.
    late, stopped = start_attempt(runtime, request_id, 4)
    status, body = immediate(stopped)
    assert status == 503
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["message"] == "onprem/llama failed (connect-error)"
    assert stopped.immediate_response.details == "vmrouter_plan_exhausted"
    assert reply_headers(stopped)["x-gateway-attempts"] == (
        "openai/gpt-4o:503,openai/gpt-4o:503,onprem/llama:connect-error"
    )
    follow = asyncio.run(late.handle(headers_message("response_headers", [(":status", "503")])))
    assert_passthrough(follow, "response_headers")


def test_upstream_stream_unknown_request_id_is_immediate_503(runtime: Runtime) -> None:
    upstream, reply = start_attempt(runtime, "nope-1", 1)
    error = error_of(reply, 503)
    assert error["code"] == "routing_state_lost"
    later = asyncio.run(upstream.handle(headers_message("response_headers", [(":status", "503")])))
    assert_passthrough(later, "response_headers")


def test_upstream_stream_missing_request_id_is_immediate_503(runtime: Runtime) -> None:
    upstream = UpstreamStream(runtime)
    reply = asyncio.run(upstream.handle(headers_message("request_headers", client_headers())))
    assert error_of(reply, 503)["code"] == "routing_state_lost"


def test_upstream_stream_ignores_a_request_id_sent_as_header(runtime: Runtime) -> None:
    _, reply = start(runtime, CHAT_BODY)
    headers = [*client_headers(), (SPOOFED_ID_HEADER, request_id_of(reply))]
    upstream = UpstreamStream(runtime)
    answer = asyncio.run(upstream.handle(headers_message("request_headers", headers)))
    assert error_of(answer, 503)["code"] == "routing_state_lost"


def test_upstream_stream_other_messages_pass_through(runtime: Runtime) -> None:
    upstream = first_attempt(runtime)
    passed = asyncio.run(upstream.handle(body_message("response_body", b"{}")))
    assert_passthrough(passed, "response_body")


def test_upstream_stream_retry_on_same_target_waits_its_delay(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    waited: list[float] = []

    async def fake_sleep(delay: float) -> None:
        waited.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    _, reply = start(runtime, json_body(model="prod/slow", messages=[]))
    request_id = request_id_of(reply)
    upstream, _ = start_attempt(runtime, request_id, 1)
    assert waited == []
    upstream_status(upstream, 503)
    _, second = start_attempt(runtime, request_id, 2)
    assert waited == [1.5]
    assert sent_body(second)["model"] == "gpt-4o-2024-08-06"


# --- the final response (on the answering attempt's upstream stream) -------------------------


def test_upstream_stream_final_response_publishes_the_gateway_headers(runtime: Runtime) -> None:
    router, reply = start(runtime, CHAT_BODY)
    request_id = request_id_of(reply)
    upstream, _ = start_attempt(runtime, request_id, 1)
    upstream_status(upstream, 503)
    upstream, _ = start_attempt(runtime, request_id, 2)
    final = upstream_status(upstream, 200)
    assert final.WhichOneof("response") == "response_headers"
    assert reply_headers(final) == {
        "x-gateway-target": "openai/gpt-4o",
        "x-gateway-served-model": "gpt-4o-2024-08-06",
        "x-gateway-attempts": "openai/gpt-4o:503,openai/gpt-4o:200",
    }
    assert set(metadata(final)) == {METADATA_NS}  # the attempt order stays as it is
    # mode_override replaces the filter's whole processing mode: every field is set.
    mode = final.mode_override
    assert mode.response_body_mode == envoy.BODY_BUFFERED
    assert mode.request_header_mode == pb.ProcessingMode.SEND
    assert mode.response_header_mode == pb.ProcessingMode.SEND
    assert mode.request_body_mode == pb.ProcessingMode.NONE
    assert mode.request_trailer_mode == pb.ProcessingMode.SKIP
    assert mode.response_trailer_mode == pb.ProcessingMode.SKIP
    router.close()


def test_upstream_stream_final_response_after_fallback_names_the_last_target(
    runtime: Runtime,
) -> None:
    _, reply = start(runtime, CHAT_BODY)
    request_id = request_id_of(reply)
    upstream, _ = start_attempt(runtime, request_id, 1)
    upstream_status(upstream, 403)
    upstream, _ = start_attempt(runtime, request_id, 2)
    assert reply_headers(upstream_status(upstream, 200)) == {
        "x-gateway-target": "onprem/llama",
        "x-gateway-served-model": "meta-llama/Llama-3.1-8B-Instruct",
        "x-gateway-attempts": "openai/gpt-4o:403,onprem/llama:200",
    }


def test_upstream_stream_explain_and_virtual_model_are_published_once(runtime: Runtime) -> None:
    _, reply = start(runtime, CHAT_BODY, extra=[("x-gateway-explain", "1")])
    published = reply_headers(reply)
    assert published["x-gateway-virtual-model"] == "prod/chat"
    assert "plan=openai/gpt-4o,onprem/llama" in published["x-gateway-explain"]
    # Later replies merge into the same namespace: they only update what changes.
    upstream, first = start_attempt(runtime, request_id_of(reply), 1)
    final = upstream_status(upstream, 200)
    for later in (first, final):
        assert "x-gateway-virtual-model" not in reply_headers(later)
        assert "x-gateway-explain" not in reply_headers(later)


def test_router_stream_end_without_an_answer_settles_the_attempt_as_timeout(
    runtime: Runtime,
) -> None:
    router, reply = start(runtime, json_body(model="openai/gpt-4o", messages=[]))
    request_id = request_id_of(reply)
    _, first = start_attempt(runtime, request_id, 1)
    assert reply_headers(first)["x-gateway-attempts"] == "openai/gpt-4o:timeout"
    context = runtime.requests[request_id]
    router.close()  # Envoy answered 504 itself; the request is over
    assert context.plan.summary() == "openai/gpt-4o:timeout"
    assert context.finished
    assert runtime.health.failures("openai/gpt-4o") == 1


def test_router_stream_end_after_a_retry_that_never_arrived_is_connect_error(
    runtime: Runtime,
) -> None:
    router, reply = start(runtime, CHAT_BODY)
    request_id = request_id_of(reply)
    upstream, _ = start_attempt(runtime, request_id, 1)
    upstream_status(upstream, 503)
    context = runtime.requests[request_id]
    router.close()
    assert context.plan.summary() == "openai/gpt-4o:503,openai/gpt-4o:connect-error"
    assert runtime.health.failures("openai/gpt-4o") == 2


def test_upstream_stream_response_body_names_the_served_model(runtime: Runtime) -> None:
    router, reply = start(runtime, CHAT_BODY)
    request_id = request_id_of(reply)
    upstream, _ = start_attempt(runtime, request_id, 1)
    upstream_status(upstream, 200)
    answer = json_body(id="c1", object="chat.completion", model="gpt-4o-2024-08-06-mini")
    final = upstream_body(upstream, answer)
    assert final.WhichOneof("response") == "response_body"
    assert reply_headers(final) == {"x-gateway-served-model": "gpt-4o-2024-08-06-mini"}
    assert not final.response_body.response.HasField("body_mutation")
    assert runtime.requests[request_id].finished
    router.close()


def test_upstream_stream_response_body_without_model_publishes_nothing(runtime: Runtime) -> None:
    upstream = first_attempt(runtime)
    upstream_status(upstream, 200)
    assert_passthrough(upstream_body(upstream, b'{"object": "chat.completion"}'), "response_body")


def test_upstream_stream_response_body_chunks_before_the_end_pass(runtime: Runtime) -> None:
    upstream = first_attempt(runtime)
    upstream_status(upstream, 200)
    chunk = upstream_body(upstream, b'{"model":', end_of_stream=False)
    assert_passthrough(chunk, "response_body")


def test_upstream_stream_response_without_body_finishes_at_headers(runtime: Runtime) -> None:
    _, reply = start(runtime, CHAT_BODY)
    request_id = request_id_of(reply)
    upstream, _ = start_attempt(runtime, request_id, 1)
    message = headers_message("response_headers", [(":status", "204")], end_of_stream=True)
    final = asyncio.run(upstream.handle(message))
    assert not final.HasField("mode_override")
    assert reply_headers(final)["x-gateway-attempts"] == "openai/gpt-4o:204"
    assert runtime.requests[request_id].finished


def test_upstream_stream_non_json_error_body_is_replaced(runtime: Runtime) -> None:
    upstream = first_attempt(runtime, json_body(model="onprem/llama", messages=[]))
    final_headers = upstream_status(upstream, 502)
    assert final_headers.mode_override.response_body_mode == envoy.BODY_BUFFERED
    final = upstream_body(upstream, b"<html>Bad Gateway</html>\n")
    common = final.response_body.response
    assert common.HasField("body_mutation")
    new_body = common.body_mutation.body
    assert json.loads(new_body) == {
        "error": {
            "message": "onprem/llama answered 502: <html>Bad Gateway</html>",
            "type": "upstream_error",
            "param": None,
            "code": 502,
        }
    }
    assert set_headers(final) == {"content-length": str(len(new_body))}


def test_upstream_stream_openai_shaped_error_body_is_kept(runtime: Runtime) -> None:
    upstream = first_attempt(runtime, json_body(model="onprem/llama", messages=[]))
    upstream_status(upstream, 500)
    error = json_body(error={"message": "boom", "type": "server_error"})
    assert_passthrough(upstream_body(upstream, error), "response_body")


def test_upstream_stream_successful_stream_streams_the_body_through(runtime: Runtime) -> None:
    body = json_body(model="prod-chat", messages=[], stream=True)
    upstream = first_attempt(runtime, body)
    final = upstream_status(upstream, 200)
    assert final.mode_override.response_body_mode == envoy.BODY_STREAMED
    assert final.mode_override.response_header_mode == pb.ProcessingMode.SEND
    assert "content-length" in removed_headers(final)
    assert reply_headers(final)["x-gateway-target"] == "openai/gpt-4o"


def test_upstream_stream_failed_stream_buffers_the_error_body(runtime: Runtime) -> None:
    body = json_body(model="onprem/llama", messages=[], stream=True)
    upstream = first_attempt(runtime, body)
    final = upstream_status(upstream, 400)
    assert final.mode_override.response_body_mode == envoy.BODY_BUFFERED


def test_upstream_stream_only_the_answering_attempt_reads_a_body(runtime: Runtime) -> None:
    _, reply = start(runtime, CHAT_BODY)
    request_id = request_id_of(reply)
    first, _ = start_attempt(runtime, request_id, 1)
    upstream_status(first, 503)
    second, _ = start_attempt(runtime, request_id, 2)
    upstream_status(second, 200)
    assert_passthrough(upstream_body(first, b"<html>late</html>"), "response_body")
    assert not runtime.requests[request_id].finished


@pytest.mark.parametrize(
    ("waited", "status", "how"), [(1.0, 502, "broke off"), (30.0, 504, "timed out")]
)
def test_upstream_stream_answer_broken_before_the_client_saw_it(
    runtime: Runtime, waited: float, status: int, how: str
) -> None:
    clock = runtime.clock
    assert isinstance(clock, FakeClock)
    router, reply = start(runtime, CHAT_BODY)
    request_id = request_id_of(reply)
    upstream, _ = start_attempt(runtime, request_id, 1)
    upstream_status(upstream, 200)
    # The body broke off (a reset) or ran out of time (prod/chat: attempt_timeout_ms 30000) while
    # Envoy still held the response for us: Envoy retries, and the plan has no slot for that.
    clock.now += waited
    _, stopped = start_attempt(runtime, request_id, 2)
    code, body = immediate(stopped)
    assert code == status
    assert body["error"]["message"] == f"openai/gpt-4o answered 200, but its response {how}"
    assert reply_headers(stopped)["x-gateway-attempts"] == "openai/gpt-4o:200"
    router.close()
    assert runtime.health.failures("openai/gpt-4o") == 1  # a broken answer is a failure


def test_router_stream_passes_everything_after_an_immediate_response(runtime: Runtime) -> None:
    router = SyncRouter(runtime)
    reply = router.handle(headers_message("request_headers", client_headers("/v1/nope")))
    assert immediate(reply)[0] == 404
    assert_passthrough(router.handle(body_message("request_body", b"{}")), "request_body")
    assert runtime.requests == {}


def test_router_stream_response_messages_pass(runtime: Runtime) -> None:
    # The router-level filter skips the response phases; should it get one, it changes nothing.
    router, _ = start(runtime, CHAT_BODY)
    status = headers_message("response_headers", [(":status", "200")])
    assert_passthrough(router.handle(status), "response_headers")
    assert_passthrough(router.handle(body_message("response_body", b"{}")), "response_body")
    router.close()


def test_upstream_stream_response_without_context_passes(runtime: Runtime) -> None:
    upstream = UpstreamStream(runtime)
    assert_passthrough(upstream_status(upstream, 200), "response_headers")
    assert_passthrough(upstream_body(upstream, b"{}"), "response_body")
