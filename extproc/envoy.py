"""The wire binding: the only module that touches Envoy's ext_proc protobuf messages.

This module owns decoding ``ProcessingRequest`` headers into plain dicts and encoding plain
decisions (header sets/removals, body replacements, immediate responses, dynamic metadata) into
``ProcessingResponse`` messages. It knows Envoy's quirks (values go in ``raw_value``; a replaced
buffered body needs a matching ``content-length``) so that callers never have to. It holds no
routing logic.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import struct_pb2

from extproc._gen import ext_proc_pb2 as pb

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse

CONTINUE = pb.CommonResponse.CONTINUE
CONTINUE_AND_REPLACE = pb.CommonResponse.CONTINUE_AND_REPLACE
BODY_NONE = pb.ProcessingMode.NONE
BODY_STREAMED = pb.ProcessingMode.STREAMED
BODY_BUFFERED = pb.ProcessingMode.BUFFERED
_SEND = pb.ProcessingMode.SEND
_SKIP = pb.ProcessingMode.SKIP


def decode_headers(headers: pb.HttpHeaders) -> dict[str, str]:
    """Headers as a dict of lower-cased names to values; repeated names are joined with commas."""
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key
        if key in out:
            out[key] = f"{out[key]},{value}"
        else:
            out[key] = value
    return out


def header_value(headers: pb.HttpHeaders, name: str) -> str | None:
    """One header's value (the first one), without decoding the rest; ``name`` is lower-case."""
    for h in headers.headers.headers:
        if h.key == name:
            return h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return None


def _header_mutation(
    target: pb.HeaderMutation,
    set_headers: Iterable[tuple[str, str]] | None,
    remove_headers: Iterable[str] | None,
) -> None:
    if set_headers:
        for key, value in set_headers:
            option = target.set_headers.add()
            option.header.key = key
            option.header.raw_value = value.encode()
    if remove_headers:
        target.remove_headers.extend(remove_headers)


def _common(
    common: pb.CommonResponse,
    set_headers: Iterable[tuple[str, str]] | None,
    remove_headers: Iterable[str] | None,
    body: bytes | None,
    clear_route_cache: bool,
) -> None:
    common.SetInParent()  # an empty CommonResponse must still select the oneof branch
    if set_headers or remove_headers:
        _header_mutation(common.header_mutation, set_headers, remove_headers)
    if body is not None:
        common.body_mutation.body = body
    if clear_route_cache:
        common.clear_route_cache = True


def request_headers_response(
    *,
    set_headers: Iterable[tuple[str, str]] | None = None,
    remove_headers: Iterable[str] | None = None,
    replace_body: bytes | None = None,
    dynamic_metadata: Metadata | None = None,
) -> pb.ProcessingResponse:
    """Answer a request_headers message; ``replace_body`` sends a new body (CONTINUE_AND_REPLACE).

    ``dynamic_metadata`` maps namespaces to their fields.
    """
    response = pb.ProcessingResponse()
    common = response.request_headers.response
    if replace_body is not None:
        common.status = CONTINUE_AND_REPLACE
    _common(common, set_headers, remove_headers, replace_body, clear_route_cache=False)
    if dynamic_metadata:
        _set_metadata(response, dynamic_metadata)
    return response


def request_body_response(
    *,
    set_headers: Iterable[tuple[str, str]] | None = None,
    remove_headers: Iterable[str] | None = None,
    clear_route_cache: bool = False,
    dynamic_metadata: Metadata | None = None,
) -> pb.ProcessingResponse:
    """Answer a buffered request_body message, optionally re-routing with new headers."""
    response = pb.ProcessingResponse()
    _common(response.request_body.response, set_headers, remove_headers, None, clear_route_cache)
    if dynamic_metadata:
        _set_metadata(response, dynamic_metadata)
    return response


def response_headers_response(
    *,
    set_headers: Iterable[tuple[str, str]] | None = None,
    remove_headers: Iterable[str] | None = None,
    body_mode: int | None = None,
    dynamic_metadata: Metadata | None = None,
) -> pb.ProcessingResponse:
    """Answer a response_headers message; ``body_mode`` asks for the response body that way.

    ``mode_override`` replaces the filter's whole processing mode, so every field is set: headers
    sent, no request body (the request has left by now), trailers skipped.
    """
    response = pb.ProcessingResponse()
    common = response.response_headers.response
    _common(common, set_headers, remove_headers, None, clear_route_cache=False)
    if dynamic_metadata:
        _set_metadata(response, dynamic_metadata)
    if body_mode is not None:
        mode = response.mode_override
        mode.request_header_mode = _SEND
        mode.response_header_mode = _SEND
        mode.request_body_mode = BODY_NONE
        mode.response_body_mode = body_mode  # type: ignore[assignment]
        mode.request_trailer_mode = _SKIP
        mode.response_trailer_mode = _SKIP
    return response


def response_body_response(
    *,
    replace_body: bytes | None = None,
    streamed: bool = False,
    dynamic_metadata: Metadata | None = None,
) -> pb.ProcessingResponse:
    """Answer a response_body message.

    A replaced buffered body needs a matching ``content-length`` (set here); streamed chunks
    (``streamed``) carry no length.
    """
    response = pb.ProcessingResponse()
    headers = None
    if replace_body is not None and not streamed:
        headers = [("content-length", str(len(replace_body)))]
    _common(response.response_body.response, headers, None, replace_body, False)
    if dynamic_metadata:
        _set_metadata(response, dynamic_metadata)
    return response


def immediate_response(
    status: int,
    body: bytes,
    *,
    headers: Iterable[tuple[str, str]] = (),
    details: str = "",
    content_type: str = "application/json",
    dynamic_metadata: Metadata | None = None,
) -> pb.ProcessingResponse:
    """Answer the client directly without contacting any upstream."""
    response = pb.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = status
    immediate.body = body
    _header_mutation(immediate.headers, [("content-type", content_type), *headers], None)
    if details:
        immediate.details = details
    if dynamic_metadata:
        _set_metadata(response, dynamic_metadata)
    return response


Metadata = Mapping[str, "Mapping[str, Any] | struct_pb2.Struct"]
"""Dynamic metadata: namespace to its fields, or to a prebuilt Struct (see ``priority_groups``)."""


@functools.lru_cache(maxsize=4096)
def priority_groups(clusters: tuple[str, ...]) -> struct_pb2.Struct:
    """The priority-group specifier's metadata for an attempt schedule (attempt n -> group n).

    Built once per distinct schedule and copied into responses: building a nested Struct from
    Python values costs far more than copying a prebuilt one.
    """
    fields = struct_pb2.Struct()
    fields.update(
        {
            "priority_groups": [
                {"name": f"a{i}", "clusters": [{"cluster_name": cluster, "weight": 1}]}
                for i, cluster in enumerate(clusters)
            ]
        }
    )
    return fields


def _set_metadata(response: pb.ProcessingResponse, namespaces: Metadata) -> None:
    for namespace, values in namespaces.items():
        target = response.dynamic_metadata.fields[namespace].struct_value
        if isinstance(values, struct_pb2.Struct):
            target.CopyFrom(values)
            continue
        for key, value in values.items():
            if isinstance(value, str):
                target.fields[key].string_value = value  # the common case, without Struct.update
            else:
                target.update({key: value})


def continue_response(kind: str) -> pb.ProcessingResponse:
    """The do-nothing answer for a message of oneof kind ``kind`` (e.g. ``response_body``)."""
    response = pb.ProcessingResponse()
    if kind in ("request_trailers", "response_trailers"):
        getattr(response, kind).SetInParent()
    else:
        getattr(response, kind).response.SetInParent()
    return response


def metadata_string(request: pb.ProcessingRequest, namespace: str, key: str) -> str | None:
    """Read one forwarded dynamic metadata string value."""
    struct = request.metadata_context.filter_metadata.get(namespace)
    if struct is None:
        return None
    value = struct.fields.get(key)
    if value is None or not value.HasField("string_value"):
        return None
    return str(value.string_value)
