"""Our trimmed ext_proc.proto against Envoy's full API types (the envoy-data-plane package).

Every message and field we declare must carry the same field number and a wire-compatible type as
Envoy's, or Envoy and the ext_proc silently misread each other. The round trips below encode with
one side's classes and decode with the other's.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import warnings
from typing import Any

import pytest
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from extproc import envoy
from extproc._gen import ext_proc_pb2 as pb

# envoy-data-plane's generated classes trip a pydantic deprecation warning at import time, and the
# test suite turns warnings into errors.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.config.core import v3 as envoy_core
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as envoy_filter
    from envoy_data_plane.envoy.service.ext_proc import v3 as envoy_service
    from envoy_data_plane.envoy.type import v3 as envoy_type
    from envoy_data_plane.google import protobuf as envoy_protobuf

ENVOY_MODULES: dict[str, types.ModuleType] = {
    "HeaderValue": envoy_core,
    "HeaderMap": envoy_core,
    "HeaderValueOption": envoy_core,
    "Metadata": envoy_core,
    "ProcessingMode": envoy_filter,
    "HttpStatus": envoy_type,
}
"""Messages declared in our file under the service package but defined elsewhere in Envoy's API."""

OUR_MESSAGES: dict[str, Descriptor] = dict(pb.DESCRIPTOR.message_types_by_name)

_TYPE_NAMES = {
    getattr(FieldDescriptor, name): name.removeprefix("TYPE_").lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_")
}

COMPATIBLE = {
    ("int32", "enum"),  # an enum is an int32 varint on the wire (HttpStatus.code, append_action)
    ("string", "bytes"),
    ("bytes", "string"),
}
"""(ours, Envoy's) proto types that differ in name only: same wire type, same encoding."""

WELL_KNOWN = {
    "google.protobuf.Struct": "Struct",
    "google.protobuf.BoolValue": "bool",  # betterproto unwraps wrapper types
    "google.protobuf.Duration": "timedelta",
}
"""Class name betterproto uses for each well-known type we reference."""


def envoy_class(name: str) -> type[Any]:
    module = ENVOY_MODULES.get(name, envoy_service)
    cls = getattr(module, name)
    assert isinstance(cls, type)
    return cls


def envoy_fields(cls: type[Any]) -> dict[int, tuple[str, Any]]:
    """Field number -> (name, betterproto FieldMetadata) of an envoy-data-plane message class."""
    out: dict[int, tuple[str, Any]] = {}
    for field in dataclasses.fields(cls):
        meta = field.metadata["betterproto"]
        out[meta.number] = (field.name, meta)
    return out


def type_name(field: FieldDescriptor) -> str:
    return _TYPE_NAMES[field.type]


def is_map(field: FieldDescriptor) -> bool:
    return bool(field.message_type is not None and field.message_type.GetOptions().map_entry)


def assert_compatible(ours: str, theirs: str, where: str) -> None:
    assert ours == theirs or (ours, theirs) in COMPATIBLE, f"{where}: {ours} vs Envoy's {theirs}"


def referenced_name(field: FieldDescriptor) -> str:
    """The class name betterproto uses for the message a field of ours references."""
    message = field.message_type
    assert message is not None
    if message.full_name in WELL_KNOWN:
        return WELL_KNOWN[message.full_name]
    assert message.file is pb.DESCRIPTOR, message.full_name
    return message.name


# --- field by field ----------------------------------------------------------------------------


def test_wire_compat_declares_the_expected_messages() -> None:
    assert set(OUR_MESSAGES) == {
        "HeaderValue",
        "HeaderMap",
        "HeaderValueOption",
        "Metadata",
        "ProcessingMode",
        "HttpStatus",
        "ProcessingRequest",
        "ProcessingResponse",
        "HttpHeaders",
        "HttpBody",
        "HttpTrailers",
        "HeadersResponse",
        "BodyResponse",
        "TrailersResponse",
        "CommonResponse",
        "HeaderMutation",
        "BodyMutation",
        "ImmediateResponse",
    }
    assert pb.DESCRIPTOR.package == "envoy.service.ext_proc.v3"


def check_fields(ours: Descriptor, cls: type[Any]) -> None:
    """Assert every field of ``ours`` has the same number, name and wire type in ``cls``."""
    name = ours.name
    theirs = envoy_fields(cls)
    assert ours.fields, f"{name} declares no field"
    for field in ours.fields:
        where = f"{name}.{field.name} = {field.number}"
        assert field.number in theirs, f"{where}: no such field number in Envoy's {cls.__name__}"
        their_name, meta = theirs[field.number]
        assert field.name == their_name, f"{where}: Envoy calls field {field.number} {their_name}"
        if is_map(field):
            assert meta.proto_type == "map", f"{where}: a map here, {meta.proto_type} in Envoy"
            key, value = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            assert_compatible(type_name(key), meta.map_meta[0].proto_type, f"{where} (key)")
            assert_compatible(type_name(value), meta.map_meta[1].proto_type, f"{where} (value)")
            value_cls = cls._betterproto.cls_by_field[f"{field.name}.value"]
            assert value_cls.__name__ == referenced_name(value), where
            continue
        assert meta.proto_type != "map", f"{where}: a map in Envoy"
        assert field.is_repeated == meta.repeated, f"{where}: repeated differs"
        assert_compatible(type_name(field), meta.proto_type, where)
        oneof = field.containing_oneof
        assert (oneof.name if oneof else None) == meta.group, f"{where}: oneof differs"
        if field.message_type is not None:
            their_cls = cls._betterproto.cls_by_field[field.name]
            assert their_cls.__name__ == referenced_name(field), (
                f"{where}: references {referenced_name(field)}, Envoy {their_cls.__name__}"
            )


@pytest.mark.parametrize("name", sorted(OUR_MESSAGES))
def test_wire_compat_every_field_matches_envoy(name: str) -> None:
    check_fields(OUR_MESSAGES[name], envoy_class(name))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("HttpBody", envoy_service.HttpHeaders),
        ("ProcessingRequest", envoy_service.ProcessingResponse),
        ("HeadersResponse", envoy_service.TrailersResponse),
        ("HttpStatus", envoy_core.HeaderMap),
    ],
)
def test_wire_compat_checker_detects_a_mismatch(ours: str, theirs: type[Any]) -> None:
    with pytest.raises(AssertionError):
        check_fields(OUR_MESSAGES[ours], theirs)


def test_wire_compat_referenced_classes_are_the_mapped_ones() -> None:
    """Our name -> module mapping agrees with what Envoy's own messages reference."""
    request = envoy_service.ProcessingRequest._betterproto.cls_by_field
    assert request["metadata_context"] is envoy_core.Metadata
    response = envoy_service.ProcessingResponse._betterproto.cls_by_field
    assert response["mode_override"] is envoy_filter.ProcessingMode
    assert response["dynamic_metadata"] is envoy_protobuf.Struct
    assert response["override_message_timeout"] is datetime.timedelta
    immediate = envoy_service.ImmediateResponse._betterproto.cls_by_field
    assert immediate["status"] is envoy_type.HttpStatus
    mutation = envoy_service.HeaderMutation._betterproto.cls_by_field
    assert mutation["set_headers"] is envoy_core.HeaderValueOption
    assert (
        envoy_core.HeaderValueOption._betterproto.cls_by_field["header"] is envoy_core.HeaderValue
    )
    assert envoy_service.HttpHeaders._betterproto.cls_by_field["headers"] is envoy_core.HeaderMap


def _enums() -> list[tuple[str, EnumDescriptor]]:
    return [
        (message.name, enum) for message in OUR_MESSAGES.values() for enum in message.enum_types
    ]


@pytest.mark.parametrize(("message", "enum"), _enums(), ids=lambda v: getattr(v, "name", v))
def test_wire_compat_enum_values_match_envoy(message: str, enum: EnumDescriptor) -> None:
    theirs = getattr(ENVOY_MODULES.get(message, envoy_service), f"{message}{enum.name}")
    for value in enum.values:
        assert theirs[value.name].value == value.number, f"{message}.{enum.name}.{value.name}"


def test_wire_compat_enums_are_declared() -> None:
    assert {f"{m}.{e.name}" for m, e in _enums()} == {
        "ProcessingMode.HeaderSendMode",
        "ProcessingMode.BodySendMode",
        "CommonResponse.ResponseStatus",
    }


def test_wire_compat_service_method_path_matches_envoy() -> None:
    service = pb.DESCRIPTOR.services_by_name["ExternalProcessor"]
    method = service.methods_by_name["Process"]
    path = f"/{service.full_name}/{method.name}"
    assert path == "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
    assert method.client_streaming
    assert method.server_streaming
    assert method.input_type is OUR_MESSAGES["ProcessingRequest"]
    assert method.output_type is OUR_MESSAGES["ProcessingResponse"]
    assert path in envoy_service.ExternalProcessorBase().__mapping__()


# --- round trips -------------------------------------------------------------------------------


def _parse_response(message: pb.ProcessingResponse) -> Any:
    return envoy_service.ProcessingResponse.parse(message.SerializeToString())


def test_wire_compat_headers_response_round_trip() -> None:
    ours = pb.ProcessingResponse()
    common = ours.request_headers.response
    common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
    option = common.header_mutation.set_headers.add()
    option.header.key = "x-team"
    option.header.raw_value = "gateway-é".encode()
    option.append.value = False
    option.append_action = 2  # OVERWRITE_IF_EXISTS_OR_ADD
    common.header_mutation.remove_headers.extend(["x-client-trace", "x-vm-retry"])
    common.body_mutation.body = b'{"model":"gpt-4o"}'
    common.clear_route_cache = True
    ours.dynamic_metadata.update({"io.vmrouter": {"content_length": "18"}})

    with pytest.warns(DeprecationWarning, match="append is deprecated"):
        theirs = _parse_response(ours)  # Envoy still reads the deprecated 'append' (field 2)
    assert theirs.request_headers is not None
    response = theirs.request_headers.response
    assert response.status == envoy_service.CommonResponseResponseStatus.CONTINUE_AND_REPLACE
    [header] = response.header_mutation.set_headers
    assert header.header.key == "x-team"
    assert header.header.raw_value == "gateway-é".encode()
    assert header.header.value == ""
    assert header.append is False
    assert header.append_action == envoy_core.HeaderValueOptionHeaderAppendAction(2)
    assert response.header_mutation.remove_headers == ["x-client-trace", "x-vm-retry"]
    assert response.body_mutation.body == b'{"model":"gpt-4o"}'
    assert response.clear_route_cache is True
    content_length = theirs.dynamic_metadata.fields["io.vmrouter"].struct_value.fields
    assert content_length["content_length"].string_value == "18"


def test_wire_compat_immediate_response_round_trip() -> None:
    ours = pb.ProcessingResponse()
    immediate = ours.immediate_response
    immediate.status.code = 429
    immediate.body = b'{"error":{}}'
    immediate.details = "vmrouter_rate_limited"
    option = immediate.headers.set_headers.add()
    option.header.key = "content-type"
    option.header.raw_value = b"application/json"

    theirs = _parse_response(ours)
    assert theirs.immediate_response is not None
    assert theirs.request_headers is None
    parsed = theirs.immediate_response
    assert parsed.status.code == envoy_type.StatusCode.TooManyRequests == 429
    assert parsed.body == b'{"error":{}}'
    assert parsed.details == "vmrouter_rate_limited"
    [header] = parsed.headers.set_headers
    assert (header.header.key, header.header.raw_value) == ("content-type", b"application/json")


def test_wire_compat_helper_responses_round_trip() -> None:
    """What extproc.envoy builds decodes in Envoy's types as intended."""
    immediate = _parse_response(envoy.immediate_response(404, b"{}", details="vmrouter_x"))
    assert immediate.immediate_response.status.code == 404
    assert immediate.immediate_response.details == "vmrouter_x"

    groups = {"io.vmrouter.pg": {"priority_groups": [{"name": "a0", "clusters": []}]}}
    body = _parse_response(
        envoy.request_body_response(
            set_headers=[("x-envoy-max-retries", "2")],
            clear_route_cache=True,
            dynamic_metadata=groups,
        )
    )
    common = body.request_body.response
    assert common.clear_route_cache is True
    assert common.header_mutation.set_headers[0].header.raw_value == b"2"
    assert body.dynamic_metadata.to_dict() == groups

    headers = _parse_response(envoy.response_headers_response(body_mode=envoy.BODY_NONE))
    assert headers.response_headers is not None
    assert headers.mode_override is not None  # present even though NONE is the zero value
    assert headers.mode_override.response_body_mode == envoy_filter.ProcessingModeBodySendMode.NONE

    # mode_override replaces Envoy's whole processing mode: every field must say what we mean.
    reply = {"io.vmrouter": {"x-gateway-attempts": "a/m1:200"}}
    streamed = _parse_response(
        envoy.response_headers_response(body_mode=envoy.BODY_STREAMED, dynamic_metadata=reply)
    )
    send, skip = (
        envoy_filter.ProcessingModeHeaderSendMode.SEND,
        (envoy_filter.ProcessingModeHeaderSendMode.SKIP),
    )
    mode = streamed.mode_override
    assert (mode.request_header_mode, mode.response_header_mode) == (send, send)
    assert mode.request_body_mode == envoy_filter.ProcessingModeBodySendMode.NONE
    assert mode.response_body_mode == envoy_filter.ProcessingModeBodySendMode.STREAMED
    assert (mode.request_trailer_mode, mode.response_trailer_mode) == (skip, skip)
    assert streamed.dynamic_metadata.to_dict() == reply

    stopped = _parse_response(envoy.immediate_response(502, b"{}", dynamic_metadata=reply))
    assert stopped.immediate_response.status.code == 502
    assert stopped.dynamic_metadata.to_dict() == reply

    served = {"io.vmrouter": {"x-gateway-served-model": "gpt-4o-2024-08-06"}}
    body_reply = _parse_response(envoy.response_body_response(dynamic_metadata=served))
    assert body_reply.response_body is not None
    assert body_reply.dynamic_metadata.to_dict() == served

    replaced = _parse_response(envoy.response_body_response(replace_body=b"abc"))
    mutation = replaced.response_body.response
    assert mutation.body_mutation.body == b"abc"
    assert mutation.header_mutation.set_headers[0].header.key == "content-length"
    assert mutation.header_mutation.set_headers[0].header.raw_value == b"3"

    passed = _parse_response(envoy.continue_response("response_body"))
    assert passed.response_body is not None
    assert passed.response_body.response is not None
    trailers = _parse_response(envoy.continue_response("request_trailers"))
    assert trailers.request_trailers is not None


def _envoy_request_headers() -> Any:
    header_map = envoy_core.HeaderMap(
        headers=[
            envoy_core.HeaderValue(key=":path", raw_value=b"/v1/chat/completions"),
            envoy_core.HeaderValue(key="x-multi", raw_value=b"a"),
            envoy_core.HeaderValue(key="x-multi", raw_value=b"b"),
            envoy_core.HeaderValue(key="x-legacy", value="plain"),
        ]
    )
    attributes = envoy_protobuf.Struct(
        fields={"xds.cluster_name": envoy_protobuf.Value(string_value="provider_openai")}
    )
    request_meta = envoy_protobuf.Struct(
        fields={"request_id": envoy_protobuf.Value(string_value="abc-1")}
    )
    return envoy_service.ProcessingRequest(
        request_headers=envoy_service.HttpHeaders(headers=header_map, end_of_stream=True),
        attributes={"envoy.filters.http.ext_proc": attributes},
        metadata_context=envoy_core.Metadata(filter_metadata={"io.vmrouter.request": request_meta}),
        observability_mode=False,
        protocol_config=envoy_service.ProtocolConfiguration(
            send_body_without_waiting_for_header_response=True
        ),
    )


def test_wire_compat_request_headers_round_trip() -> None:
    theirs = _envoy_request_headers()
    ours = pb.ProcessingRequest.FromString(bytes(theirs))
    assert ours.WhichOneof("request") == "request_headers"
    assert ours.request_headers.end_of_stream is True
    assert envoy.decode_headers(ours.request_headers) == {
        ":path": "/v1/chat/completions",
        "x-multi": "a,b",
        "x-legacy": "plain",
    }
    attributes = ours.attributes["envoy.filters.http.ext_proc"].fields
    assert attributes["xds.cluster_name"].string_value == "provider_openai"
    assert envoy.metadata_string(ours, "io.vmrouter.request", "request_id") == "abc-1"
    # a field only Envoy declares survives our parse and re-serialization untouched
    again = envoy_service.ProcessingRequest.parse(ours.SerializeToString())
    assert again == theirs


@pytest.mark.parametrize("kind", ["request_body", "response_body"])
def test_wire_compat_body_request_round_trip(kind: str) -> None:
    body = envoy_service.HttpBody(body=b'{"model":"x"}', end_of_stream=True)
    theirs = envoy_service.ProcessingRequest(**{kind: body})
    ours = pb.ProcessingRequest.FromString(bytes(theirs))
    assert ours.WhichOneof("request") == kind
    assert getattr(ours, kind).body == b'{"model":"x"}'
    assert getattr(ours, kind).end_of_stream is True


def test_wire_compat_response_headers_request_round_trip() -> None:
    status = envoy_core.HeaderMap(headers=[envoy_core.HeaderValue(key=":status", raw_value=b"503")])
    theirs = envoy_service.ProcessingRequest(
        response_headers=envoy_service.HttpHeaders(headers=status)
    )
    ours = pb.ProcessingRequest.FromString(bytes(theirs))
    assert ours.WhichOneof("request") == "response_headers"
    assert ours.response_headers.end_of_stream is False
    assert envoy.decode_headers(ours.response_headers) == {":status": "503"}


def test_wire_compat_trailers_request_round_trip() -> None:
    trailers = envoy_core.HeaderMap(headers=[envoy_core.HeaderValue(key="grpc-status", value="0")])
    theirs = envoy_service.ProcessingRequest(
        response_trailers=envoy_service.HttpTrailers(trailers=trailers)
    )
    ours = pb.ProcessingRequest.FromString(bytes(theirs))
    assert ours.WhichOneof("request") == "response_trailers"
    [header] = ours.response_trailers.trailers.headers
    assert (header.key, header.value) == ("grpc-status", "0")


def test_wire_compat_our_request_parses_in_envoy_types() -> None:
    ours = pb.ProcessingRequest()
    header = ours.request_headers.headers.headers.add()
    header.key = ":method"
    header.raw_value = b"POST"
    ours.request_headers.end_of_stream = False
    ours.attributes["f"].update({"k": "v"})
    struct = struct_pb2.Struct()
    struct.update({"request_id": "r-9"})
    ours.metadata_context.filter_metadata["io.vmrouter.request"].CopyFrom(struct)
    theirs = envoy_service.ProcessingRequest.parse(ours.SerializeToString())
    assert theirs.request_headers.headers.headers[0].key == ":method"
    assert theirs.request_headers.headers.headers[0].raw_value == b"POST"
    assert theirs.attributes["f"].fields["k"].string_value == "v"
    meta = theirs.metadata_context.filter_metadata["io.vmrouter.request"]
    assert meta.fields["request_id"].string_value == "r-9"
