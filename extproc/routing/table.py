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

from extproc.config import GatewayConfig, HealthConfig, ProviderConfig, TargetConfig
from extproc.health import HealthSettings
from extproc.errors import UnknownModel, UnsupportedOperation
from extproc.routing.model import CatalogModel, Operation, Provider, RetryPolicy, Target
from extproc.routing.priority import PriorityStrategy
from extproc.routing.strategy import NO_HEALTH, HealthView, Strategy, build_strategy

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
        sla_probe_ratio: float = 0.05,
        health_settings: HealthSettings | None = None,
    ):
        """Wrap prebuilt indexes; use ``compile_table`` to build one from a config."""
        self._models = dict(models)
        self.health_settings = health_settings or HealthSettings()
        self.first_byte_timeout_ms = first_byte_timeout_ms
        self.sla_probe_ratio = sla_probe_ratio
        windows: set[float] = set()
        for vm in models.values():
            windows.update(t.sla_window_s for t in vm.targets if t.sla_cutoff_s is not None)
            window = getattr(vm.strategy, "window_s", None)
            if isinstance(window, float | int):
                windows.add(float(window))
        self.tpot_windows: frozenset[float] = frozenset(windows)
        """Every TPOT window length routing will ask the health model about."""
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

    def resolve(
        self,
        name: str,
        operation: Operation,
        rng: Random,
        health: HealthView = NO_HEALTH,
    ) -> RoutingDecision:
        """Resolve a requested model name for an operation into a plan of targets.

        Targets in cooldown or over their SLA cutoff are filtered out before the strategy runs (a
        weighted strategy then spreads their weight over the rest). They stay in the plan as last
        resort fallbacks, least bad first. If every target is filtered out the request still goes
        out, to the least bad target.
        """
        vm = self._models.get(name)
        if vm is None:
            raise UnknownModel(f"The model '{name}' does not exist on this gateway.", param="model")
        if operation not in vm.model_types:
            raise UnsupportedOperation(
                f"The model '{vm.name}' does not support {OPERATION_LABEL[operation]}"
                f" (it serves: {', '.join(sorted(vm.model_types))}).",
                param="model",
            )
        eligible: list[Target] = []
        held: list[Target] = []
        for target in vm.targets:
            if self._usable(target, health, rng):
                eligible.append(target)
            else:
                held.append(target)
        held.sort(key=lambda t: (health.cooldown_remaining(t.key), health.failures(t.key)))
        ordered = [*vm.strategy.order(eligible, health, rng), *held] if eligible else held
        plan = (ordered[0], *(t for t in ordered[1:] if t.fallback_candidate))
        return RoutingDecision(virtual_model=vm, plan=plan)

    def _usable(self, target: Target, health: HealthView, rng: Random) -> bool:
        if not health.available(target.key):
            return False
        if target.sla_cutoff_s is None:
            return True
        mean, _ = health.tpot(target.key, target.sla_window_s)
        if mean is None or mean <= target.sla_cutoff_s:
            return True
        # Over its SLA: skipped, except for a small probe share that keeps measuring it.
        return rng.random() < self.sla_probe_ratio

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
        sla_cutoff_s=(cfg.sla_cutoff.time_per_output_token_ms / 1000.0 if cfg.sla_cutoff else None),
        sla_window_s=cfg.sla_cutoff.window_seconds if cfg.sla_cutoff else 180.0,
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
    return RoutingTable(
        models,
        providers,
        config.gateway.first_byte_timeout_ms,
        config.gateway.health.sla_probe_ratio,
        health_settings(config.gateway.health),
    )


def health_settings(cfg: HealthConfig) -> HealthSettings:
    """The health model's settings from the ``gateway.health`` config block."""
    return HealthSettings(
        consecutive_failures=cfg.consecutive_failures,
        failure_rate=cfg.failure_rate,
        failure_rate_min_requests=cfg.failure_rate_min_requests,
        failure_window_s=cfg.failure_window_seconds,
        cooldown_base_s=cfg.cooldown_seconds,
        cooldown_max_s=cfg.max_cooldown_seconds,
        retry_after_max_s=cfg.max_retry_after_seconds,
    )
