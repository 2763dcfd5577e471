"""Metrics and traces: the gateway's instruments, the Prometheus endpoint, optional OTLP.

This module owns every instrument name and attribute key the gateway emits (documented in
``docs/telemetry.md``), the per-request recording entry points ``observe.Recorder`` calls
(``count_decision``, ``record_attempt``) and the exporters: a Prometheus text endpoint served by
the ext_proc process (``/metrics``), and OTLP/HTTP for metrics and traces when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the ``otlp`` extra is installed. It never decides
anything. Nothing here touches the global OpenTelemetry providers, so several runtimes can coexist.

Recording is pre-aggregated (``extproc.tally``): the per-request instruments (attempts, routing
decisions, the four GenAI histograms) are plain counters and bucket arrays in this process,
reached through cells cached per (virtual model, target, operation, outcome, kind, response model),
so a request costs a few dictionary lookups and additions instead of one OpenTelemetry
measurement per instrument and reader. The OpenTelemetry SDK still owns everything downstream:
the counters are ``ObservableCounter`` s read at collection, and the histograms are added, as
OTel ``HistogramDataPoint`` s, to what each reader collects (``tally.TalliedReader``), so the
Prometheus and OTLP exporters render them with their own code, with the same names, units,
attributes, buckets and values as synchronous instruments would give. Readers must therefore be
``TalliedReader`` s (``PeriodicReader`` wraps an exporter such as OTLP's). With no reader at all
nothing is recorded; with no tracer provider no span is started.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry, generate_latest

from extproc.routing.model import Target
from extproc.tally import CounterCell, Series, TalliedReader, Tally

log = logging.getLogger(__name__)

# GenAI semantic-convention instruments.
TOKEN_USAGE = "gen_ai.client.token.usage"
REQUEST_DURATION = "gen_ai.server.request.duration"
TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"
# Our own instruments.
ATTEMPTS = "vmrouter.attempts"
DECISIONS = "vmrouter.routing.decisions"
TARGET_HEALTH = "vmrouter.target.healthy"
TARGET_FAILURES = "vmrouter.target.consecutive_failures"
CONFIG_RELOADS = "vmrouter.config.reloads"

# Attribute keys.
OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
TOKEN_TYPE = "gen_ai.token.type"
ERROR_TYPE = "error.type"
VIRTUAL_MODEL = "vmrouter.virtual_model"
TARGET = "vmrouter.target"
OUTCOME = "vmrouter.outcome"
ATTEMPT_KIND = "vmrouter.attempt.kind"

OPERATION_NAMES = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings"}

_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92]  # fmt: skip
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0]  # fmt: skip
_TPOT_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                 2.5]  # fmt: skip
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304]


_CACHE_LIMIT = 4096
"""Cached cell bundles before the caches start over (bounds what config reloads leave behind)."""
_SCOPE = InstrumentationScope("vmrouter")
"""The meter's scope: ``MeterProvider.get_meter("vmrouter")``."""


class PrometheusReader(TalliedReader, PrometheusMetricReader):
    """The Prometheus reader, with the tally's histograms in every collection."""


class PeriodicReader(TalliedReader, PeriodicExportingMetricReader):
    """A periodic exporting reader (OTLP), with the tally's histograms in every collection."""


class InMemoryReader(TalliedReader, InMemoryMetricReader):
    """An in-memory reader (tests, benchmarks), with the tally's histograms in every collection."""


class _AttemptCells:
    """Where one kind of attempt is counted and measured (histogram series made on first use)."""

    __slots__ = ("attempts", "common", "duration", "input", "output", "tpot", "ttft")

    def __init__(self, attempts: CounterCell, common: dict[str, str], duration: Series) -> None:
        self.attempts = attempts
        self.common = common
        self.duration = duration
        self.ttft: Series | None = None
        self.tpot: Series | None = None
        self.input: Series | None = None
        self.output: Series | None = None


class Telemetry:
    """The gateway's instruments, bound to one MeterProvider (and optionally a TracerProvider)."""

    def __init__(
        self,
        *,
        readers: Iterable[MetricReader] = (),
        tracer_provider: trace.TracerProvider | None = None,
        prometheus: bool = True,
    ) -> None:
        """Create the instruments; ``prometheus`` adds a reader for ``render_prometheus``.

        ``readers`` must be ``TalliedReader`` s (``PeriodicReader``, ``InMemoryReader``): other
        readers would never see the histograms.
        """
        self.registry = CollectorRegistry(auto_describe=True)
        all_readers = list(readers)
        for reader in all_readers:
            if not isinstance(reader, TalliedReader):
                raise TypeError(f"{type(reader).__name__} is not a TalliedReader")
        if prometheus:
            all_readers.append(PrometheusReader(registry=self.registry))
        self.recording = bool(all_readers)
        """Whether any reader exists: without one, recording is skipped."""
        self.tracing = tracer_provider is not None
        """Whether spans are wanted: without a tracer provider, none is started."""
        resource = Resource.create({"service.name": "vmrouter"})
        # No exemplars: they cost a filter check and a sample on every measurement.
        self.meter_provider = MeterProvider(
            resource=resource,
            metric_readers=all_readers,
            exemplar_filter=AlwaysOffExemplarFilter(),
        )
        self.tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer("vmrouter")
        meter = self.meter_provider.get_meter(_SCOPE.name)
        tally = self.tally = Tally(_SCOPE)
        self.token_usage = tally.histogram(
            TOKEN_USAGE, "{token}", "Tokens used per request, by token type", _TOKEN_BUCKETS
        )
        self.duration = tally.histogram(
            REQUEST_DURATION, "s", "Duration of each attempt at a provider", _DURATION_BUCKETS
        )
        self.ttft = tally.histogram(
            TIME_TO_FIRST_TOKEN, "s", "Time to the first output token (streams)", _TTFT_BUCKETS
        )
        self.tpot = tally.histogram(
            TIME_PER_OUTPUT_TOKEN, "s", "Time per output token after the first", _TPOT_BUCKETS
        )
        self.attempts = tally.counter()
        meter.create_observable_counter(
            ATTEMPTS, callbacks=[self.attempts.observe], unit="{attempt}",
            description="Attempts per target, outcome and kind",
        )  # fmt: skip
        self.decisions = tally.counter()
        meter.create_observable_counter(
            DECISIONS, callbacks=[self.decisions.observe], unit="{request}",
            description="Primary target chosen per virtual model",
        )  # fmt: skip
        self.reloads = meter.create_counter(
            CONFIG_RELOADS, unit="{reload}", description="Config reloads by result"
        )
        self._health_source: Callable[[], dict[str, tuple[bool, int, float]]] | None = None
        meter.create_observable_gauge(
            TARGET_HEALTH, callbacks=[self._observe_health], unit="1",
            description="1 when the target is available, 0 while it cools down",
        )  # fmt: skip
        meter.create_observable_gauge(
            TARGET_FAILURES, callbacks=[self._observe_failures], unit="{failure}",
            description="Consecutive failed attempts per target",
        )  # fmt: skip
        for reader in all_readers:
            assert isinstance(reader, TalliedReader)
            reader.bind(tally)
        self._decision_cells: dict[tuple[str, str], CounterCell] = {}
        self._attempt_cells: dict[tuple[Any, ...], _AttemptCells] = {}

    # --- recording (the per-request hot path) ---------------------------------------------------

    def count_decision(self, virtual_model: str, target: str) -> None:
        """Count one routing decision: ``virtual_model`` chose ``target`` as its primary."""
        if not self.recording:
            return
        cell = self._decision_cells.get((virtual_model, target))
        if cell is None:
            cell = self.decisions.cell({VIRTUAL_MODEL: virtual_model, TARGET: target})
            _remember(self._decision_cells, (virtual_model, target), cell)
        with self.tally.lock:
            cell.value += 1

    def record_attempt(
        self,
        virtual_model: str,
        target: Target,
        operation: str,
        outcome: str,
        kind: str,
        duration: float,
        *,
        error: bool = False,
        response_model: str | None = None,
        ttft: float | None = None,
        tpot: float | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """Count one attempt and record its duration, times and token usage.

        ``operation`` is the router's (``chat``, ``completion``, ``embedding``); ``outcome`` the
        status or ``connect-error``/``timeout``; ``kind`` ``primary``/``retry``/``fallback``. A
        failed attempt (``error``) carries its outcome as ``error.type``, a successful one its
        ``response_model`` (when known) as ``gen_ai.response.model``.
        """
        if not self.recording:
            return
        model = None if error else response_model or None
        key = (virtual_model, target, operation, outcome, kind, error, model)
        cells = self._attempt_cells.get(key)
        if cells is None:
            cells = self._attempt_cells_for(key)
        with self.tally.lock:
            cells.attempts.value += 1
            cells.duration.add(duration)
            if ttft is not None:
                (cells.ttft or self._series(cells, "ttft")).add(ttft)
            if tpot is not None:
                (cells.tpot or self._series(cells, "tpot")).add(tpot)
            if input_tokens is not None:
                (cells.input or self._series(cells, "input")).add(input_tokens)
            if output_tokens is not None:
                (cells.output or self._series(cells, "output")).add(output_tokens)

    def _attempt_cells_for(self, key: tuple[Any, ...]) -> _AttemptCells:
        virtual_model, target, operation, outcome, kind, error, model = key
        attempts = self.attempts.cell(
            {VIRTUAL_MODEL: virtual_model, TARGET: target.key, OUTCOME: outcome, ATTEMPT_KIND: kind}
        )
        common = {
            OPERATION: OPERATION_NAMES[operation],
            PROVIDER: target.model.provider.name,
            REQUEST_MODEL: target.model.upstream_model,
            VIRTUAL_MODEL: virtual_model,
        }
        if error:
            common[ERROR_TYPE] = outcome
        elif model:
            common[RESPONSE_MODEL] = model
        cells = _AttemptCells(attempts, common, self.duration.series(common))
        _remember(self._attempt_cells, key, cells)
        return cells

    def _series(self, cells: _AttemptCells, which: str) -> Series:
        """Make ``cells``' ``ttft``/``tpot``/``input``/``output`` series at its first measurement.

        Lazily, as the SDK would: an attribute set exists once something was recorded with it.
        """
        if which == "ttft":
            series = self.ttft.series(cells.common)
        elif which == "tpot":
            series = self.tpot.series(cells.common)
        else:
            series = self.token_usage.series({**cells.common, TOKEN_TYPE: which})
        setattr(cells, which, series)
        return series

    # --- collection -----------------------------------------------------------------------------

    def watch_health(self, source: Callable[[], dict[str, tuple[bool, int, float]]]) -> None:
        """Report target health from ``source`` (``HealthTracker.snapshot``) on every collection."""
        self._health_source = source

    def _observe_health(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._health_source is None:
            return []
        return [
            Observation(1 if ok else 0, {TARGET: key})
            for key, (ok, _, _) in self._health_source().items()
        ]

    def _observe_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._health_source is None:
            return []
        return [
            Observation(failures, {TARGET: key})
            for key, (_, failures, _) in self._health_source().items()
        ]

    def render_prometheus(self) -> bytes:
        """The Prometheus text exposition of every instrument."""
        return bytes(generate_latest(self.registry))

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        self.meter_provider.shutdown()


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def otlp_telemetry() -> Telemetry:
    """Telemetry with OTLP/HTTP export added when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return Telemetry()
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the 'otlp' extra is not installed")
        return Telemetry()
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "vmrouter"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    reader = PeriodicReader(OTLPMetricExporter())
    return Telemetry(readers=[reader], tracer_provider=provider)
