"""The gateway's error tree.

This module owns every error a client can receive from the gateway itself (as opposed to errors a
provider returned): each carries the HTTP status and the OpenAI error ``type``/``code`` it maps to.
The servicer turns a raised ``GatewayError`` into an Envoy ImmediateResponse in exactly one place;
nothing else builds error bodies.
"""

from __future__ import annotations

import json
from typing import ClassVar


class GatewayError(Exception):
    """An error answered to the client with an OpenAI-style JSON body."""

    http_status: ClassVar[int] = 500
    error_type: ClassVar[str] = "gateway_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        """Store the human-readable message and the request parameter it concerns."""
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> bytes:
        """Return the OpenAI-shaped error body: ``{"error": {"message", "type", "code", ...}}``."""
        return error_body(self.message, self.error_type, self.code, self.param)


def error_body(
    message: str, error_type: str, code: str | int | None, param: str | None = None
) -> bytes:
    """Encode an OpenAI-style error object."""
    return json.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


class InvalidRequest(GatewayError):
    """The request body or headers cannot be routed (400)."""

    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class UnsupportedMediaType(InvalidRequest):
    """The request body is not declared as JSON (415)."""

    http_status = 415
    code = "unsupported_media_type"


class UnknownModel(GatewayError):
    """The requested model is neither a virtual model, a slug nor a catalog model (404)."""

    http_status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class UnsupportedOperation(InvalidRequest):
    """The model exists but does not serve this operation, e.g. embeddings on a chat model."""

    code = "unsupported_operation"


class NotFound(GatewayError):
    """No such API path on the gateway (404)."""

    http_status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class NoTargetAvailable(GatewayError):
    """Every target of the virtual model was filtered out before any attempt (503)."""

    http_status = 503
    error_type = "service_unavailable"
    code = "no_target_available"


class ConfigError(Exception):
    """A gateway configuration failed validation; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        """Keep every problem; the message lists them one per line."""
        self.problems = problems
        super().__init__("invalid gateway config:\n  " + "\n  ".join(problems))
