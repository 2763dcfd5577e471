"""Metrics and traces: OpenTelemetry instruments, the Prometheus endpoint, optional OTLP.

This module owns every instrument name and attribute key the gateway emits (documented in
``docs/telemetry.md``) and the exporters: a Prometheus text endpoint served by the ext_proc
process (``/metrics``), and OTLP/HTTP for metrics and traces when ``OTEL_EXPORTER_OTLP_ENDPOINT``
is set and the ``otlp`` extra is installed. It never decides anything; ``processor`` calls it.
Nothing here touches the global OpenTelemetry providers, so several runtimes can coexist.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, generate_latest

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


class Telemetry:
    """The gateway's instruments, bound to one MeterProvider (and optionally a TracerProvider)."""

    def __init__(
        self,
        *,
        readers: Iterable[MetricReader] = (),
        tracer_provider: trace.TracerProvider | None = None,
        prometheus: bool = True,
    ) -> None:
        """Create the instruments; ``prometheus`` adds a reader for ``render_prometheus``."""
        self.registry = CollectorRegistry(auto_describe=True)
        all_readers = list(readers)
        if prometheus:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            all_readers.append(PrometheusMetricReader(registry=self.registry))
        resource = Resource.create({"service.name": "vmrouter"})
        # No exemplars: they cost a filter check and a sample on every measurement.
        self.meter_provider = MeterProvider(
            resource=resource,
            metric_readers=all_readers,
            exemplar_filter=AlwaysOffExemplarFilter(),
        )
        self.tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer("vmrouter")
        meter = self.meter_provider.get_meter("vmrouter")
        self.token_usage = meter.create_histogram(
            TOKEN_USAGE, unit="{token}", description="Tokens used per request, by token type",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )  # fmt: skip
        self.duration = meter.create_histogram(
            REQUEST_DURATION, unit="s", description="Duration of each attempt at a provider",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )  # fmt: skip
        self.ttft = meter.create_histogram(
            TIME_TO_FIRST_TOKEN, unit="s", description="Time to the first output token (streams)",
            explicit_bucket_boundaries_advisory=_TTFT_BUCKETS,
        )  # fmt: skip
        self.tpot = meter.create_histogram(
            TIME_PER_OUTPUT_TOKEN, unit="s", description="Time per output token after the first",
            explicit_bucket_boundaries_advisory=_TPOT_BUCKETS,
        )  # fmt: skip
        self.attempts = meter.create_counter(
            ATTEMPTS, unit="{attempt}", description="Attempts per target, outcome and kind"
        )
        self.decisions = meter.create_counter(
            DECISIONS, unit="{request}", description="Primary target chosen per virtual model"
        )
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
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "vmrouter"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    return Telemetry(readers=[reader], tracer_provider=provider)
