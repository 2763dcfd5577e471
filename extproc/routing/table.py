"""Compile a validated config into a routing table, and resolve requests against it.

This module owns the mapping from a requested model name to a ``RoutingDecision``: which virtual
model it means, and the ordered plan of targets to try. Everything the hot path needs is computed
here once per config load (name index, strategies, provider auth headers); ``resolve`` only looks
up, filters and calls the strategy.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from random import Random
from types import MappingProxyType
from urllib.parse import urlsplit

from extproc.config import GatewayConfig, ProviderConfig, TargetConfig
from extproc.errors import UnknownModel, UnsupportedOperation
from extproc.routing.model import CatalogModel, Operation, Provider, RetryPolicy, Target
from extproc.routing.priority import PriorityStrategy
from extproc.routing.strategy import Strategy, build_strategy

log = logging.getLogger(__name__)

OPERATION_LABEL: Mapping[str, str] = MappingProxyType(
    {"chat": "chat completions", "completion": "completions", "embedding": "embeddings"}
)


@dataclass(frozen=True, slots=True)
class VirtualModel:
    """A resolvable model name: a configured virtual model, or a catalog model called directly."""

    name: str
    """``<group>/<name>`` for virtual models, ``<provider>/<model>`` for catalog models."""
    slug: str | None
    model_types: frozenset[str]
    strategy: Strategy
    targets: tuple[Target, ...]
    is_virtual: bool
    attempt_timeout_ms: int
    """Upper bound for one attempt (Envoy's per-try timeout, set per request)."""


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """What the router decided for one request."""

    virtual_model: VirtualModel
    plan: tuple[Target, ...]
    """Targets in the order to try: the primary first, then fallback candidates."""

    @property
    def primary(self) -> Target:
        """The first target to try."""
        return self.plan[0]


class RoutingTable:
    """An immutable index from model names to virtual models, compiled from one config."""

    def __init__(
        self,
        models: Mapping[str, VirtualModel],
        providers: Mapping[str, Provider],
        first_byte_timeout_ms: int = 120_000,
    ):
        """Wrap prebuilt indexes; use ``compile_table`` to build one from a config."""
        self._models = dict(models)
        self.first_byte_timeout_ms = first_byte_timeout_ms
        self.providers: Mapping[str, Provider] = MappingProxyType(dict(providers))
        self.virtual_models: tuple[VirtualModel, ...] = tuple(
            {id(vm): vm for vm in models.values() if vm.is_virtual}.values()
        )
        self.catalog_models: tuple[VirtualModel, ...] = tuple(
            vm for vm in models.values() if not vm.is_virtual
        )

    def lookup(self, name: str) -> VirtualModel | None:
        """Find a virtual model by ``group/name`` or slug, or a catalog model ``provider/model``."""
        return self._models.get(name)

    def resolve(self, name: str, operation: Operation, rng: Random) -> RoutingDecision:
        """Resolve a requested model name for an operation into a plan of targets."""
        vm = self._models.get(name)
        if vm is None:
            raise UnknownModel(f"The model '{name}' does not exist on this gateway.", param="model")
        if operation not in vm.model_types:
            raise UnsupportedOperation(
                f"The model '{vm.name}' does not support {OPERATION_LABEL[operation]}"
                f" (it serves: {', '.join(sorted(vm.model_types))}).",
                param="model",
            )
        ordered = vm.strategy.order(vm.targets, rng)
        plan = (ordered[0], *(t for t in ordered[1:] if t.fallback_candidate))
        return RoutingDecision(virtual_model=vm, plan=plan)

    def names(self) -> list[str]:
        """Every name a client may send, sorted."""
        return sorted(self._models)


_CLUSTER_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def cluster_name(provider_name: str) -> str:
    """The Envoy cluster name for a provider."""
    return "provider_" + _CLUSTER_SAFE.sub("_", provider_name)


def compile_provider(cfg: ProviderConfig, environ: Mapping[str, str]) -> Provider:
    """Compile one provider: split its URL and read its credential from the environment."""
    parts = urlsplit(cfg.base_url)
    scheme = parts.scheme
    host = parts.hostname or ""
    default_port = 443 if scheme == "https" else 80
    port = parts.port or default_port
    host_text = f"[{host}]" if ":" in host else host
    authority = host_text if port == default_port else f"{host_text}:{port}"
    auth: tuple[str, str] | None = None
    if cfg.api_key_env:
        key = environ.get(cfg.api_key_env)
        if key:
            auth = ("authorization", f"Bearer {key}")
        else:
            log.warning(
                "provider %s: environment variable %s is not set; requests go without credentials",
                cfg.name,
                cfg.api_key_env,
            )
    return Provider(
        name=cfg.name,
        cluster=cluster_name(cfg.name),
        scheme=scheme,
        host=host,
        port=port,
        authority=authority,
        path_prefix=parts.path.rstrip("/"),
        auth_header=auth,
    )


def _compile_target(cfg: TargetConfig, model: CatalogModel) -> Target:
    return Target(
        model=model,
        weight=cfg.weight if cfg.weight is not None else 1,
        priority=cfg.priority if cfg.priority is not None else 0,
        retry=RetryPolicy(
            attempts=cfg.retry_config.attempts,
            delay_ms=cfg.retry_config.delay,
            on_status=frozenset(cfg.retry_config.on_status_codes),
        ),
        fallback_status=frozenset(cfg.fallback_status_codes),
        fallback_candidate=cfg.fallback_candidate,
        override_params=MappingProxyType(dict(cfg.override_params)),
        headers_set=tuple((k.lower(), v) for k, v in cfg.headers_override.set.items()),
        headers_remove=tuple(h.lower() for h in cfg.headers_override.remove),
        metadata_match=MappingProxyType(dict(cfg.metadata_match)),
    )


_DIRECT_RETRY = RetryPolicy(attempts=1, delay_ms=0, on_status=frozenset())


def compile_table(config: GatewayConfig, environ: Mapping[str, str] | None = None) -> RoutingTable:
    """Compile a validated config into a routing table (secrets read from ``environ``)."""
    env = os.environ if environ is None else environ
    providers: dict[str, Provider] = {}
    catalog: dict[str, CatalogModel] = {}
    models: dict[str, VirtualModel] = {}
    direct = PriorityStrategy()
    for p_cfg in config.providers:
        provider = compile_provider(p_cfg, env)
        providers[provider.name] = provider
        for m_cfg in p_cfg.models:
            key = f"{provider.name}/{m_cfg.name}"
            model = CatalogModel(
                key=key,
                provider=provider,
                upstream_model=m_cfg.model or m_cfg.name,
                model_types=frozenset(m_cfg.model_types),
            )
            catalog[key] = model
            # A catalog model called directly goes straight to that model: one attempt, no fallback.
            target = Target(
                model=model,
                weight=1,
                priority=0,
                retry=_DIRECT_RETRY,
                fallback_status=frozenset(),
                fallback_candidate=False,
                override_params=MappingProxyType({}),
                headers_set=(),
                headers_remove=(),
                metadata_match=MappingProxyType({}),
            )
            models[key] = VirtualModel(
                name=key,
                slug=None,
                model_types=model.model_types,
                strategy=direct,
                targets=(target,),
                is_virtual=False,
                attempt_timeout_ms=config.gateway.attempt_timeout_ms,
            )
    for group in config.virtual_model_groups:
        for vm_cfg in group.virtual_models:
            routing = vm_cfg.routing_config
            vm = VirtualModel(
                name=f"{group.name}/{vm_cfg.name}",
                slug=vm_cfg.slug,
                model_types=frozenset(vm_cfg.model_types),
                strategy=build_strategy(routing),
                targets=tuple(
                    _compile_target(t, catalog[t.target]) for t in routing.load_balance_targets
                ),
                is_virtual=True,
                attempt_timeout_ms=routing.attempt_timeout_ms or config.gateway.attempt_timeout_ms,
            )
            models[vm.name] = vm
            if vm.slug:
                models[vm.slug] = vm
    return RoutingTable(models, providers, config.gateway.first_byte_timeout_ms)
