"""Compile a validated config into a routing table, and resolve requests against it.

This module owns the mapping from a requested model name to a ``RoutingDecision``: which virtual
model it means, which category (for category-based routing), and the ordered plan of targets to
try. Everything the hot path needs is computed here once per config load (name index,
strategies, compiled category patterns, provider auth headers); ``resolve`` only looks up, takes
the route's health snapshot (``routing.eligibility``: eligible and held targets and the strategy's
prepared order, cached until health changes), makes the request's random draws (SLA probes, the
order, drawn lazily by ``routing.draw``) and applies stickiness and fallback eligibility.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from random import Random
from types import MappingProxyType
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from extproc.config import (
    CategoryBasedRouting,
    GatewayConfig,
    HealthConfig,
    ProviderConfig,
    RoundRobinRouting,
    StateConfig,
    TargetConfig,
    TargetRoutingConfig,
)
from extproc.errors import ConfigError, NoTargetAvailable, UnknownModel, UnsupportedOperation
from extproc.health import HealthSettings
from extproc.memory import gc_paused
from extproc.routing.draw import Drawing, Group, Plan, fixed, order_all, order_group, plan_of
from extproc.routing.eligibility import RouteCache, Snapshot, View
from extproc.routing.explain import Explanation
from extproc.routing.model import CatalogModel, Operation, Provider, RetryPolicy, Target
from extproc.routing.priority import PriorityStrategy
from extproc.routing.strategy import NO_HEALTH, HealthView, Strategy, build_strategy

log = logging.getLogger(__name__)

EAGER_PLAN = 12
"""Plans with at most this many fallback candidates are drawn whole when resolved; longer ones
draw their later targets when first read (see ``routing.draw.Plan``)."""

OPERATION_LABEL: Mapping[str, str] = MappingProxyType(
    {"chat": "chat completions", "completion": "completions", "embedding": "embeddings"}
)


_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """Targets and the strategy ordering them: a virtual model has one, or one per category."""

    strategy: Strategy
    targets: tuple[Target, ...]
    category: str | None = None
    keywords: frozenset[str] = frozenset()
    """Lower-cased words (whole-word match) or phrases with spaces (substring match)."""
    patterns: tuple[re.Pattern[str], ...] = ()
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    cache: RouteCache = field(init=False, repr=False)
    """Health snapshots of this route (mutable state on an immutable route: see eligibility)."""

    def __post_init__(self) -> None:
        """Attach the route's snapshot cache."""
        object.__setattr__(self, "cache", RouteCache(self.strategy, self.targets))

    def matches(self, request: RequestFacts) -> str | None:
        """Why this category matches the request, or None (the default category never 'matches')."""
        if not (self.keywords or self.patterns or self.metadata):
            return None
        for key, value in self.metadata.items():
            if request.metadata.get(key) != value:
                return None
        if not (self.keywords or self.patterns):
            return "metadata " + ", ".join(f"{k}={v}" for k, v in self.metadata.items())
        text = request.text
        if self.keywords:
            lowered = text.lower()
            words = set(_WORD.findall(lowered))
            hit = next(
                (k for k in sorted(self.keywords) if (k in lowered if " " in k else k in words)),
                None,
            )
            if hit is not None:
                return f"keyword {hit!r}"
        for pattern in self.patterns:
            if pattern.search(text):
                return f"pattern {pattern.pattern!r}"
        return None


_WORD = re.compile(r"[\w'-]+")


@dataclass(frozen=True, slots=True)
class StickyPolicy:
    """Session affinity: which request values identify a session, and for how long it sticks."""

    ttl_s: int
    identifiers: tuple[tuple[str, str], ...]
    """(source, key): source is ``headers`` (key lower-cased) or ``metadata``."""

    def session(self, headers: Mapping[str, str], metadata: Mapping[str, str]) -> str | None:
        """The session key for a request, or None when no identifier is present."""
        values: list[str] = []
        for source, key in self.identifiers:
            value = (headers if source == "headers" else metadata).get(key)
            values.append(f"{source}:{key}={value}" if value is not None else "")
        return "|".join(values) if any(values) else None


@dataclass(frozen=True, slots=True)
class VirtualModel:
    """A resolvable model name: a configured virtual model, or a catalog model called directly."""

    name: str
    """``<group>/<name>`` for virtual models, ``<provider>/<model>`` for catalog models."""
    slug: str | None
    model_types: frozenset[str]
    routes: tuple[Route, ...]
    """One route, or one per category with the ``default`` category last."""
    is_virtual: bool
    attempt_timeout_ms: int
    """Upper bound for one attempt (Envoy's per-try timeout, set per request)."""
    sticky: StickyPolicy | None = None
    routing_type: str = "priority-based-routing"

    @property
    def targets(self) -> tuple[Target, ...]:
        """Every target of every route, without repeats."""
        seen: dict[int, Target] = {}
        for route in self.routes:
            for target in route.targets:
                seen.setdefault(id(target), target)
        return tuple(seen.values())

    @property
    def strategy(self) -> Strategy:
        """The first route's strategy."""
        return self.routes[0].strategy


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What resolution may look at besides the model name."""

    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    """Client metadata merged with the gateway's (the gateway wins)."""
    text: str = ""
    """The last user message, for category rules."""
    sticky_target: str | None = None
    """The target this request's session is stuck to, if any."""


NO_REQUEST = RequestFacts()


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """What the router decided for one request."""

    virtual_model: VirtualModel
    plan: Plan
    """Targets in the order to try: the primary first, then fallback candidates. A sequence whose
    later targets are drawn when first read; ``plan.members()`` gives them all without drawing."""
    category: str | None = None
    sticky_hit: bool = False
    """The primary is the session's sticky target."""

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
        gateway_metadata: Mapping[str, str] | None = None,
        state: StateConfig | None = None,
    ):
        """Wrap prebuilt indexes; use ``compile_table`` to build one from a config."""
        self._models = dict(models)
        self.gateway_metadata: Mapping[str, str] = MappingProxyType(dict(gateway_metadata or {}))
        """Metadata this gateway adds to every request (wins over the client's keys)."""
        self.state = state or StateConfig()
        self.health_settings = health_settings or HealthSettings()
        self.first_byte_timeout_ms = first_byte_timeout_ms
        self.sla_probe_ratio = sla_probe_ratio
        windows: set[float] = set()
        for vm in models.values():
            for route in vm.routes:
                windows.update(route.strategy.windows)
                windows.update(t.sla_window_s for t in route.targets if t.sla_cutoff_s is not None)
        self.tpot_windows: frozenset[float] = frozenset(windows)
        """Every window length routing will ask the health model about (TPOT, tokens, rates)."""
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
        request: RequestFacts = NO_REQUEST,
        explain: Explanation | None = None,
    ) -> RoutingDecision:
        """Resolve a requested model name for an operation into a plan of targets.

        1. Category-based models pick their category (first whose rules match, else default).
        2. ``metadata_match``: targets whose every key matches the request metadata take
           precedence; targets without ``metadata_match`` follow as fallbacks; targets whose
           match fails are out.
        3. Targets in cooldown or over their SLA cutoff are filtered out before the strategy
           runs (a weighted strategy spreads their weight over the rest) and kept at the end of
           the plan, least bad first. If every target is filtered out the request still goes to
           the least bad one.
        4. A healthy sticky target goes first. Targets that are not fallback candidates are
           dropped from every position but the first.
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
        routes = vm.routes
        route = routes[-1]
        reason = "default"
        if len(routes) > 1:
            for candidate in routes[:-1]:
                why = candidate.matches(request)
                if why is not None:
                    route, reason = candidate, why
                    break
        if explain is not None:
            explain.virtual_model = vm.name
            explain.strategy = route.strategy.name
            explain.metadata = dict(request.metadata)
            if route.category is not None:
                explain.category, explain.category_reason = route.category, reason
            explain.candidates = [t.key for t in route.targets]
        cache = route.cache
        key = cache.pool_key(request.metadata)
        snap = cache.snapshot(key, health)
        view: View = snap
        probed: tuple[Target, ...] = ()
        if snap.probes:
            # Over its SLA: skipped, except for a small probe share that keeps measuring it.
            ratio = self.sla_probe_ratio
            probed = tuple(t for t in snap.probes if rng.random() < ratio)
            if probed:
                view = snap.with_probes(probed, cache, health)
        if explain is not None:
            _explain_filters(route, key, snap, view, probed, health, explain)
        sticky = request.sticky_target
        if not view.eligible:
            if not view.held:
                raise NoTargetAvailable(
                    f"No target of '{vm.name}' matches the request metadata.", param="model"
                )
            if explain is not None:
                explain.notes.append("every target is unhealthy: trying the least bad one")
                if sticky is not None:
                    explain.sticky = (
                        f"session stuck to {sticky}, which is not eligible now: routing normally"
                    )
                _explain_plan(view.held, explain)
            assert view.fixed_plan is not None  # held targets alone come in a fixed order
            return RoutingDecision(vm, Plan(view.fixed_plan), route.category)
        stuck: Target | None = None
        if sticky is not None:
            found = view.sticky(sticky)
            if found is True:
                return self._ambiguous_sticky(vm, route, view, sticky, rng, health, explain)
            stuck = found if isinstance(found, Target) else None
            if explain is not None:
                explain.sticky = (
                    f"session stuck to {sticky}"
                    if stuck is not None
                    else f"session stuck to {sticky}, which is not eligible now: routing normally"
                )
        elif explain is None and view.fixed_plan is not None:
            return RoutingDecision(vm, Plan(view.fixed_plan), route.category)
        groups: Sequence[Group] | None = view.groups
        if groups is None:
            groups = _groups(view, route.strategy, health, rng)
        if len(view.candidates) <= EAGER_PLAN:
            # A short plan is drawn whole: cheaper than drawing it on demand.
            full: Sequence[Target]
            if stuck is None and len(groups) == 1:
                full = order_group(groups[0], rng)  # often a ready-made tuple (routing.draw)
            else:
                full = order_all(groups, rng, stuck)
                if stuck is not None:
                    full.insert(0, stuck)
            if explain is not None:
                _explain_plan(full, explain)
            return RoutingDecision(vm, Plan(plan_of(full)), route.category, stuck is not None)
        drawing = Drawing(groups, rng, stuck)
        first = stuck if stuck is not None else drawing.next()
        assert first is not None  # some target is eligible
        if explain is not None:
            # What Plan draws when read in order: the primary, then the rest at once.
            drawn = [first, *drawing.rest()]
            _explain_plan(drawn, explain)
            plan = Plan(plan_of(drawn))
        else:
            plan = Plan([first], drawing, view.candidates)
        return RoutingDecision(vm, plan, route.category, stuck is not None)

    def _ambiguous_sticky(
        self,
        vm: VirtualModel,
        route: Route,
        view: View,
        sticky: str,
        rng: Random,
        health: HealthView,
        explain: Explanation | None,
    ) -> RoutingDecision:
        """The sticky key is eligible more than once in one pool: the first drawn one wins."""
        ordered = order_all(_groups(view, route.strategy, health, rng, held=False), rng)
        stuck = next(t for t in ordered if t.key == sticky)
        ordered.remove(stuck)
        full = [stuck, *ordered, *view.held]
        if explain is not None:
            explain.sticky = f"session stuck to {sticky}"
            _explain_plan(full, explain)
        return RoutingDecision(vm, Plan(plan_of(full)), route.category, True)

    def names(self) -> list[str]:
        """Every name a client may send, sorted."""
        return sorted(self._models)


def _groups(
    view: View, strategy: Strategy, health: HealthView, rng: Random, held: bool = True
) -> list[Group]:
    """The groups one request's order is drawn from: each pool's, then the held targets.

    A pool whose strategy prepared nothing (its order changes with every request) is ordered
    here, at once, so that it reads health as it is now.
    """
    groups: list[Group] = []
    for pool in view.pools:
        if not pool.eligible:
            continue
        if pool.groups is None:
            groups.append(fixed(strategy.order(pool.eligible, health, rng)))
        else:
            groups.extend(pool.groups)
    if held and view.held:
        groups.append(fixed(view.held))
    return groups


def _explain_filters(
    route: Route,
    key: tuple[int, ...],
    snap: Snapshot,
    view: View,
    probed: tuple[Target, ...],
    health: HealthView,
    explain: Explanation,
) -> None:
    """Record the metadata, cooldown and SLA filters, the pools and the strategy's scores."""
    for index, target in enumerate(route.cache.conditioned):
        if index not in key:
            wanted = ", ".join(f"{k}={v}" for k, v in target.metadata_match.items())
            explain.drop(target.key, f"metadata_match {wanted} does not match")
    let_in = set(probed)
    for pool in view.pools:
        for target in pool.members:
            if target in snap.cooling:
                explain.drop(
                    target.key,
                    f"cooling down ({health.cooldown_remaining(target.key):.1f}s left,"
                    f" {health.failures(target.key)} consecutive failures)",
                )
            elif target in let_in:
                explain.notes.append(f"{target.key} is over its SLA but drawn as a probe")
            elif target in snap.over:
                cutoff = target.sla_cutoff_s or 0.0
                explain.drop(
                    target.key,
                    f"over SLA: tpot {snap.over[target] * 1000:.1f} ms > {cutoff * 1000:g} ms",
                )
        explain.pools.append((pool.name, [t.key for t in pool.eligible]))
        explain.scores.update(route.strategy.explain(pool.eligible, health))


def _explain_plan(full: Sequence[Target], explain: Explanation) -> None:
    """Record the targets dropped for not being fallback candidates, and the plan."""
    for target in full[1:]:
        if not target.fallback_candidate:
            explain.drop(target.key, "fallback_candidate: false (never a fallback)")
    explain.plan = [t.key for t in plan_of(full)]


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


_ATOMS = (str, int, float, bool, type(None))
_Tuple = TypeVar("_Tuple", bound=tuple[object, ...])


class _Shared:
    """Equal immutable pieces of one compiled config, made once and shared by every target.

    At 10,000 virtual models most targets repeat the same retry policy, status-code sets, empty
    mappings and header lists: sharing them saves both compile time and memory (several hundred
    bytes per target). Mappings are shared only when every value is a plain scalar, compared
    with its type and ``repr`` so that ``1``, ``1.0``, ``True`` and ``-0.0``, equal in Python
    but not in the JSON sent upstream, never stand in for one another.
    """

    def __init__(self) -> None:
        self._codes: dict[tuple[int, ...], frozenset[int]] = {}
        self._retries: dict[RetryPolicy, RetryPolicy] = {}
        self._tuples: dict[tuple[object, ...], tuple[object, ...]] = {}
        self._mappings: dict[tuple[tuple[str, type, str], ...], Mapping[str, Any]] = {}
        self._strategies: dict[tuple[object, ...], Strategy] = {}
        self._types: dict[tuple[str, ...], frozenset[str]] = {}
        self._seen: dict[int, Any] = {}
        """What a config object (by identity) compiled to. Pydantic hands most targets the same
        default objects (``extproc.config._shared``), and the config outlives the compilation,
        so an ``id`` cannot be reused meanwhile."""

    def codes(self, codes: list[int]) -> frozenset[int]:
        found: frozenset[int] | None = self._seen.get(id(codes))
        if found is None:
            key = tuple(codes)
            found = self._codes.get(key)
            if found is None:
                found = self._codes[key] = frozenset(codes)
            self._seen[id(codes)] = found
        return found

    def retry(self, cfg: TargetConfig) -> RetryPolicy:
        retry = cfg.retry_config
        found: RetryPolicy | None = self._seen.get(id(retry))
        if found is None:
            policy = RetryPolicy(retry.attempts, retry.delay, self.codes(retry.on_status_codes))
            found = self._seen[id(retry)] = self._retries.setdefault(policy, policy)
        return found

    def model_types(self, types: Sequence[str]) -> frozenset[str]:
        key = tuple(types)
        found = self._types.get(key)
        if found is None:
            found = self._types[key] = frozenset(types)
        return found

    def interned(self, items: _Tuple) -> _Tuple:
        return cast(_Tuple, self._tuples.setdefault(items, items))

    def mapping(self, values: Mapping[str, Any]) -> Mapping[str, Any]:
        if not values:
            return _EMPTY
        if not all(type(v) in _ATOMS for v in values.values()):
            return MappingProxyType(dict(values))
        key = tuple((k, type(v), repr(v)) for k, v in values.items())
        found = self._mappings.get(key)
        if found is None:
            found = self._mappings[key] = MappingProxyType(dict(values))
        return found

    def strategy(self, routing: TargetRoutingConfig) -> Strategy:
        """One strategy object per distinct setting; round-robin keeps a rotation per route."""
        if isinstance(routing, RoundRobinRouting):
            return build_strategy(routing)
        fields = routing.__dict__  # pydantic keeps field values there; getattr of a missing one
        key = (routing.type, *(fields.get(f) for f in _STRATEGY_SETTINGS))  # is slow
        found = self._strategies.get(key)
        if found is None:
            found = self._strategies[key] = build_strategy(routing)
        return found


_STRATEGY_SETTINGS = ("window_seconds", "band", "min_samples")
"""Every routing-config field a strategy object is built from (besides its type)."""


def _compile_target(cfg: TargetConfig, model: CatalogModel, shared: _Shared) -> Target:
    headers = cfg.headers_override
    sla = cfg.sla_cutoff
    return Target(
        model=model,
        weight=cfg.weight if cfg.weight is not None else 1,
        priority=cfg.priority if cfg.priority is not None else 0,
        retry=shared.retry(cfg),
        fallback_status=shared.codes(cfg.fallback_status_codes),
        fallback_candidate=cfg.fallback_candidate,
        override_params=shared.mapping(cfg.override_params),
        headers_set=(
            shared.interned(tuple((k.lower(), v) for k, v in headers.set.items()))
            if headers.set
            else ()
        ),
        headers_remove=(
            shared.interned(tuple(h.lower() for h in headers.remove)) if headers.remove else ()
        ),
        metadata_match=shared.mapping(cfg.metadata_match),
        sla_cutoff_s=sla.time_per_output_token_ms / 1000.0 if sla is not None else None,
        sla_window_s=sla.window_seconds if sla is not None else 180.0,
    )


_DIRECT_RETRY = RetryPolicy(attempts=1, delay_ms=0, on_status=frozenset())


def _targets(
    routing: TargetRoutingConfig, catalog: Mapping[str, CatalogModel], shared: _Shared
) -> tuple[Target, ...]:
    return tuple(
        _compile_target(t, catalog[t.target], shared) for t in routing.load_balance_targets
    )


def _compile_routes(
    routing: TargetRoutingConfig | CategoryBasedRouting,
    catalog: Mapping[str, CatalogModel],
    shared: _Shared,
) -> tuple[Route, ...]:
    """One route, or one per category with the default category last."""
    if not isinstance(routing, CategoryBasedRouting):
        return (
            Route(strategy=shared.strategy(routing), targets=_targets(routing, catalog, shared)),
        )
    routes: list[Route] = []
    default: Route | None = None
    for category in routing.categories:
        route = Route(
            strategy=shared.strategy(category.routing_config),
            targets=_targets(category.routing_config, catalog, shared),
            category=category.name,
            keywords=frozenset(k.lower() for k in category.keywords),
            patterns=tuple(re.compile(p) for p in category.patterns),
            metadata=MappingProxyType(dict(category.metadata)),
        )
        if category.name == "default":
            default = route
        else:
            routes.append(route)
    assert default is not None  # validation requires exactly one default category
    routes.append(default)
    return tuple(routes)


def compile_table(config: GatewayConfig, environ: Mapping[str, str] | None = None) -> RoutingTable:
    """Compile a validated config into a routing table (secrets read from ``environ``)."""
    with gc_paused():  # see extproc.memory: the collector would dominate a large config
        return _compile(config, os.environ if environ is None else environ)


def _compile(config: GatewayConfig, env: Mapping[str, str]) -> RoutingTable:
    providers: dict[str, Provider] = {}
    catalog: dict[str, CatalogModel] = {}
    models: dict[str, VirtualModel] = {}
    shared = _Shared()
    direct = PriorityStrategy()
    attempt_timeout_ms = config.gateway.attempt_timeout_ms
    for p_cfg in config.providers:
        provider = compile_provider(p_cfg, env)
        providers[provider.name] = provider
        for m_cfg in p_cfg.models:
            key = f"{provider.name}/{m_cfg.name}"
            model = CatalogModel(
                key=key,
                provider=provider,
                upstream_model=m_cfg.model or m_cfg.name,
                model_types=shared.model_types(m_cfg.model_types),
                price=(m_cfg.price.input, m_cfg.price.output) if m_cfg.price else None,
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
                override_params=_EMPTY,
                headers_set=(),
                headers_remove=(),
                metadata_match=_EMPTY,
            )
            models[key] = VirtualModel(
                name=key,
                slug=None,
                model_types=model.model_types,
                routes=(Route(strategy=direct, targets=(target,)),),
                is_virtual=False,
                attempt_timeout_ms=attempt_timeout_ms,
            )
    for group in config.virtual_model_groups:
        for vm_cfg in group.virtual_models:
            routing = vm_cfg.routing_config
            sticky = None
            if routing.sticky_routing is not None:
                sticky = StickyPolicy(
                    ttl_s=routing.sticky_routing.ttl_seconds,
                    identifiers=tuple(
                        (i.source, i.key.lower() if i.source == "headers" else i.key)
                        for i in routing.sticky_routing.session_identifiers
                    ),
                )
            vm = VirtualModel(
                name=f"{group.name}/{vm_cfg.name}",
                slug=vm_cfg.slug,
                model_types=shared.model_types(vm_cfg.model_types),
                routes=_compile_routes(routing, catalog, shared),
                is_virtual=True,
                attempt_timeout_ms=routing.attempt_timeout_ms or attempt_timeout_ms,
                sticky=sticky,
                routing_type=routing.type,
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
        gateway_metadata(config.gateway.metadata, env),
        config.state,
    )


GATEWAY_METADATA_ENV = "VMROUTER_GATEWAY_METADATA"


def gateway_metadata(configured: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """The config's gateway metadata, overridden by the JSON object in the environment."""
    merged = dict(configured)
    raw = environ.get(GATEWAY_METADATA_ENV)
    if raw:
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in decoded.items()
        ):
            raise ConfigError([f"{GATEWAY_METADATA_ENV}: expected a JSON object of strings"])
        merged.update(decoded)
    return merged


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
