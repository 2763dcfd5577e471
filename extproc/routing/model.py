"""Runtime routing objects compiled from the config: providers, catalog models, targets.

This module owns the immutable shapes the hot path reads. They are built once per config load by
``routing.table`` and never mutated; per-request state lives in the servicer, not here. Providers,
catalog models and targets compare by identity (``eq=False``): field-by-field equality would make
every membership test on the hot path walk every field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Operation = Literal["chat", "completion", "embedding"]


@dataclass(frozen=True, slots=True, eq=False)
class Provider:
    """An upstream account as Envoy and the upstream ext_proc see it."""

    name: str
    cluster: str
    """Envoy cluster name serving this provider."""
    scheme: str
    host: str
    port: int
    authority: str
    """Value for the ``:authority`` header sent upstream."""
    path_prefix: str
    """Base URL path without a trailing slash, e.g. ``/v1``; prepended to the operation path."""
    auth_header: tuple[str, str] | None = field(default=None, repr=False)
    """Header carrying the credential; excluded from repr so it is never logged."""

    @property
    def tls(self) -> bool:
        """Whether Envoy must speak TLS to this provider."""
        return self.scheme == "https"


@dataclass(frozen=True, slots=True, eq=False)
class CatalogModel:
    """A concrete model at a provider."""

    key: str
    """``<provider>/<name>``: what targets and direct requests use."""
    provider: Provider
    upstream_model: str
    """The model name sent upstream (modelNameOverride)."""
    model_types: frozenset[str]
    price: tuple[float, float] | None = None
    """Price per million (input, output) tokens, if configured."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries on one target before falling back."""

    attempts: int
    delay_ms: int
    on_status: frozenset[int]


@dataclass(frozen=True, slots=True, eq=False)
class Target:
    """One catalog model behind a virtual model, with its per-target settings."""

    model: CatalogModel
    weight: int
    priority: int
    retry: RetryPolicy
    fallback_status: frozenset[int]
    fallback_candidate: bool
    override_params: Mapping[str, Any]
    headers_set: tuple[tuple[str, str], ...]
    """Lower-cased header names with their values."""
    headers_remove: tuple[str, ...]
    metadata_match: Mapping[str, str]
    sla_cutoff_s: float | None = None
    """Mean time per output token (s) above which the target is skipped."""
    sla_window_s: float = 180.0
    """Window of that mean."""
    key: str = field(init=False, repr=False)
    """The target's catalog name, e.g. ``openai/gpt-4o`` (its model's key, kept here because the
    hot path reads it for every target it looks at)."""

    def __post_init__(self) -> None:
        """Copy the catalog model's key."""
        object.__setattr__(self, "key", self.model.key)
