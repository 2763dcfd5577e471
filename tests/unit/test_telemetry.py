"""Pre-aggregated telemetry against OpenTelemetry's synchronous instruments: same output.

``Reference`` records the same measurements the way the gateway used to (one synchronous OTel
instrument call per measurement, the attribute rules of the old ``Recorder._metrics``); every
test compares what the exporters get from ``Telemetry`` with what they get from it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricReader,
    MetricsData,
    NumberDataPoint,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from extproc import tally as tally_module
from extproc import telemetry as names
from extproc.routing.model import Target
from extproc.routing.table import RoutingTable
from extproc.telemetry import InMemoryReader, Telemetry

CONFIG = """
providers:
  - name: alpha
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models:
      - {name: m, model: upstream-m}
      - {name: e, model: upstream-e, model_types: [embedding]}
  - name: beta
    type: openai-compatible
    base_url: http://127.0.0.1:8002/v1
    models: [{name: m, model: upstream-b}]
virtual_model_groups:
  - name: prod
    virtual_models:
      - name: chat
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: alpha/m, priority: 0}
            - {target: beta/m, priority: 1}
      - name: embed
        model_types: [embedding]
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: alpha/e, priority: 0}
"""

DELTA = {
    Counter: AggregationTemporality.DELTA,
    ObservableCounter: AggregationTemporality.DELTA,
    Histogram: AggregationTemporality.DELTA,
}


# --- the reference: synchronous OpenTelemetry instruments, as before ---------------------------


class Reference:
    """The instruments as the gateway defined them before pre-aggregation, fed the old way."""

    def __init__(self, readers: list[MetricReader]) -> None:
        self.provider = MeterProvider(
            resource=Resource.create({"service.name": "vmrouter"}),
            metric_readers=readers,
            exemplar_filter=AlwaysOffExemplarFilter(),
        )
        meter = self.provider.get_meter("vmrouter")
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens used per request, by token type",
            explicit_bucket_boundaries_advisory=[1, 4, 16, 64, 256, 1024, 4096, 16384, 65536,
                                                 262144, 1048576, 4194304],
        )  # fmt: skip
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Duration of each attempt at a provider",
            explicit_bucket_boundaries_advisory=[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
                                                 2.56, 5.12, 10.24, 20.48, 40.96, 81.92],
        )  # fmt: skip
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time to the first output token (streams)",
            explicit_bucket_boundaries_advisory=[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                                 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0],
        )  # fmt: skip
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time per output token after the first",
            explicit_bucket_boundaries_advisory=[0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
                                                 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5],
        )  # fmt: skip
        self.attempts = meter.create_counter(
            "vmrouter.attempts", unit="{attempt}",
            description="Attempts per target, outcome and kind",
        )  # fmt: skip
        self.decisions = meter.create_counter(
            "vmrouter.routing.decisions", unit="{request}",
            description="Primary target chosen per virtual model",
        )  # fmt: skip

    def count_decision(self, virtual_model: str, target: str) -> None:
        self.decisions.add(1, {names.VIRTUAL_MODEL: virtual_model, names.TARGET: target})

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
        self.attempts.add(
            1,
            {
                names.VIRTUAL_MODEL: virtual_model,
                names.TARGET: target.key,
                names.OUTCOME: outcome,
                names.ATTEMPT_KIND: kind,
            },
        )
        attrs: dict[str, Any] = {
            names.OPERATION: names.OPERATION_NAMES[operation],
            names.PROVIDER: target.model.provider.name,
            names.REQUEST_MODEL: target.model.upstream_model,
            names.VIRTUAL_MODEL: virtual_model,
        }
        if error:
            attrs[names.ERROR_TYPE] = outcome
        elif response_model:
            attrs[names.RESPONSE_MODEL] = response_model
        self.duration.record(duration, attrs)
        if ttft is not None:
            self.ttft.record(ttft, attrs)
        if tpot is not None:
            self.tpot.record(tpot, attrs)
        if input_tokens is not None:
            self.token_usage.record(input_tokens, {**attrs, names.TOKEN_TYPE: "input"})
        if output_tokens is not None:
            self.token_usage.record(output_tokens, {**attrs, names.TOKEN_TYPE: "output"})


# --- what both record ----------------------------------------------------------------------------


def targets(table: RoutingTable) -> dict[str, Target]:
    found: dict[str, Target] = {}
    for vm in table.virtual_models:
        for target in vm.targets:
            found[target.key] = target
    return found


def requests(
    table: RoutingTable, rounds: int = 1
) -> Iterator[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Decisions and attempts: every attribute rule, values on boundaries and past the last."""
    t = targets(table)
    alpha, beta, embed = t["alpha/m"], t["beta/m"], t["alpha/e"]
    chat = "prod/chat"
    for r in range(rounds):
        yield "decision", (chat, alpha.key), {}
        yield "attempt", (chat, alpha, "chat", "200", "primary", 1.9), {
            "response_model": "served-x", "tpot": 0.38, "input_tokens": 7, "output_tokens": 5,
        }  # fmt: skip
        yield "attempt", (chat, alpha, "chat", "200", "primary", 0.04 + r), {
            "response_model": "served-x", "ttft": 0.5, "tpot": 0.25, "input_tokens": 0,
            "output_tokens": 4194304,
        }  # fmt: skip
        yield "decision", (chat, alpha.key), {}
        yield "attempt", (chat, alpha, "chat", "503", "primary", 0.3), {"error": True}
        yield "attempt", (chat, beta, "chat", "200", "fallback", 100.0), {
            "response_model": "", "tpot": 2.5, "output_tokens": 1,
        }  # fmt: skip
        yield "decision", (chat, beta.key), {}
        yield "attempt", (chat, beta, "chat", "timeout", "primary", 0.0), {"error": True}
        yield "attempt", (chat, beta, "chat", "connect-error", "retry", 0.01), {"error": True}
        yield "attempt", (chat, alpha, "chat", "200", "fallback", 81.92), {"error": True}
        yield "attempt", (chat, alpha, "completion", "400", "primary", 0.02), {
            "response_model": None, "tpot": 0.001, "input_tokens": 3, "output_tokens": 16,
        }  # fmt: skip
        yield "decision", ("prod/embed", embed.key), {}
        yield "attempt", ("prod/embed", embed, "embedding", "200", "primary", 0.16), {
            "response_model": "upstream-e", "input_tokens": 256,
        }  # fmt: skip


def feed(recorder: Telemetry | Reference, table: RoutingTable, rounds: int = 1) -> None:
    for what, args, kwargs in requests(table, rounds):
        if what == "decision":
            recorder.count_decision(*args)
        else:
            recorder.record_attempt(*args, **kwargs)


# --- comparing -----------------------------------------------------------------------------------


def flatten(data: MetricsData | None) -> dict[str, dict[str, Any]]:
    """Every metric by name: its shape, and its points by attributes (times left out)."""
    assert data is not None
    out: dict[str, dict[str, Any]] = {}
    for resource in data.resource_metrics:
        for scoped in resource.scope_metrics:
            assert scoped.scope.name == "vmrouter"
            for metric in scoped.metrics:
                points: dict[frozenset[tuple[str, Any]], Any] = {}
                for point in metric.data.data_points:
                    key = frozenset((point.attributes or {}).items())
                    assert key not in points
                    if isinstance(point, HistogramDataPoint):
                        points[key] = (
                            point.count, point.sum, tuple(point.bucket_counts),
                            tuple(point.explicit_bounds), point.min, point.max,
                            list(point.exemplars),
                        )  # fmt: skip
                    else:
                        assert isinstance(point, NumberDataPoint)
                        points[key] = point.value
                out[metric.name] = {
                    "unit": metric.unit,
                    "description": metric.description,
                    "type": type(metric.data).__name__,
                    "temporality": getattr(metric.data, "aggregation_temporality", None),
                    "monotonic": getattr(metric.data, "is_monotonic", None),
                    "points": points,
                }
    return out


def prometheus_lines(registry: CollectorRegistry) -> list[str]:
    """The exposition's lines, sorted; ``target_info`` carries a random instance id."""
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if "target_info" not in line)


# --- the exporters get the same data --------------------------------------------------------------


def test_prometheus_text_is_what_synchronous_instruments_give(table: RoutingTable) -> None:
    telemetry = Telemetry()
    registry = CollectorRegistry(auto_describe=True)
    reference = Reference([PrometheusMetricReader(registry=registry)])
    feed(telemetry, table, rounds=3)
    feed(reference, table, rounds=3)
    ours = prometheus_lines(telemetry.registry)
    assert ours == prometheus_lines(registry)
    assert any(line.startswith("gen_ai_server_time_to_first_token_seconds_bucket") for line in ours)
    assert any('le="+Inf"' in line for line in ours)


def test_otlp_data_is_what_synchronous_instruments_give(table: RoutingTable) -> None:
    reader = InMemoryReader()
    telemetry = Telemetry(readers=[reader], prometheus=False)
    reference_reader = InMemoryMetricReader()
    reference = Reference([reference_reader])
    feed(telemetry, table, rounds=2)
    feed(reference, table, rounds=2)
    ours = flatten(reader.get_metrics_data())
    expected = flatten(reference_reader.get_metrics_data())
    assert ours == expected
    assert set(ours) == {
        "gen_ai.client.token.usage", "gen_ai.server.request.duration",
        "gen_ai.server.time_to_first_token", "gen_ai.server.time_per_output_token",
        "vmrouter.attempts", "vmrouter.routing.decisions",
    }  # fmt: skip
    # A second collection is cumulative: everything again, plus what came since.
    feed(telemetry, table)
    feed(reference, table)
    assert flatten(reader.get_metrics_data()) == flatten(reference_reader.get_metrics_data())


def test_histograms_share_the_collection_time_and_start_at_their_first_measurement(
    table: RoutingTable,
) -> None:
    reader = InMemoryReader()
    telemetry = Telemetry(readers=[reader], prometheus=False)
    feed(telemetry, table)
    data = reader.get_metrics_data()
    assert data is not None
    [resource] = data.resource_metrics
    [_] = resource.scope_metrics  # the histograms join the meter's own scope
    times = set()
    for scoped in data.resource_metrics[0].scope_metrics:
        for metric in scoped.metrics:
            for point in metric.data.data_points:
                times.add(point.time_unix_nano)
                assert 0 < point.start_time_unix_nano <= point.time_unix_nano
    assert len(times) == 1


def test_delta_readers_get_what_happened_since_their_last_collection(table: RoutingTable) -> None:
    reader = InMemoryReader(preferred_temporality=DELTA)
    cumulative = InMemoryReader()
    telemetry = Telemetry(readers=[reader, cumulative], prometheus=False)
    reference_reader = InMemoryMetricReader(preferred_temporality=DELTA)
    reference = Reference([reference_reader])
    first_end = 0
    for rounds in (2, 1):
        feed(telemetry, table, rounds)
        feed(reference, table, rounds)
        data = reader.get_metrics_data()
        ours, expected = flatten(data), flatten(reference_reader.get_metrics_data())
        for name in ("vmrouter.attempts", "vmrouter.routing.decisions"):
            # Observable counters report idle series as 0 where the synchronous ones omitted them.
            mine = ours.pop(name)
            theirs = expected.pop(name)
            mine["points"] = {k: v for k, v in mine["points"].items() if v != 0}
            assert mine == theirs
        assert ours == expected
        assert data is not None
        histograms = [
            point
            for metric in data.resource_metrics[0].scope_metrics[0].metrics
            if metric.name.startswith("gen_ai.")
            for point in metric.data.data_points
        ]
        assert all(p.start_time_unix_nano >= first_end for p in histograms)
        if first_end:
            assert {p.start_time_unix_nano for p in histograms} == {first_end}
        first_end = histograms[0].time_unix_nano
    # The cumulative reader alongside still sees everything.
    totals = flatten(cumulative.get_metrics_data())
    (count,) = [
        v[0]
        for k, v in totals["gen_ai.server.request.duration"]["points"].items()
        if (names.ERROR_TYPE, "503") in k
    ]
    assert count == 3


def test_a_delta_reader_with_nothing_new_gets_no_histogram_points(table: RoutingTable) -> None:
    reader = InMemoryReader(preferred_temporality=DELTA)
    telemetry = Telemetry(readers=[reader], prometheus=False)
    feed(telemetry, table)
    reader.get_metrics_data()
    telemetry.count_decision("prod/chat", "alpha/m")
    assert {m for m in flatten(reader.get_metrics_data()) if m.startswith("gen_ai.")} == set()


def test_attribute_sets_past_the_cardinality_limit_overflow_like_the_sdk(
    table: RoutingTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = InMemoryReader()
    telemetry = Telemetry(readers=[reader], prometheus=False)
    reference_reader = InMemoryMetricReader()
    reference = Reference([reference_reader])
    alpha = targets(table)["alpha/m"]
    for i in range(tally_module.CARDINALITY_LIMIT + 5):
        for recorder in (telemetry, reference):
            recorder.record_attempt(f"vm-{i}", alpha, "chat", "503", "primary", 0.05, error=True)
    ours = flatten(reader.get_metrics_data())
    assert ours == flatten(reference_reader.get_metrics_data())
    overflow = frozenset({("otel.metric.overflow", True)})
    assert ours["gen_ai.server.request.duration"]["points"][overflow][0] == 5


# --- what is and is not recorded ----------------------------------------------------------------


def test_a_decision_alone_reaches_the_scrape(table: RoutingTable) -> None:
    telemetry = Telemetry()
    telemetry.count_decision("prod/chat", "alpha/m")
    text = telemetry.render_prometheus().decode()
    assert "vmrouter_routing_decisions_total{" in text
    assert "gen_ai_" not in text


def test_without_readers_nothing_is_recorded(table: RoutingTable) -> None:
    telemetry = Telemetry(prometheus=False)
    assert not telemetry.recording
    feed(telemetry, table)
    assert telemetry.tally.lock.acquire(blocking=False)
    telemetry.tally.lock.release()
    assert list(telemetry.attempts.observe(None)) == []  # type: ignore[arg-type]
    assert telemetry._attempt_cells == {}


def test_values_the_sdk_rejects_are_dropped_with_a_warning(
    table: RoutingTable, caplog: pytest.LogCaptureFixture
) -> None:
    reader = InMemoryReader()
    telemetry = Telemetry(readers=[reader], prometheus=False)
    alpha = targets(table)["alpha/m"]
    with caplog.at_level(logging.WARNING, logger="extproc.tally"):
        telemetry.record_attempt("prod/chat", alpha, "chat", "200", "primary", 1.0, ttft=-0.1)
        telemetry.record_attempt("prod/chat", alpha, "chat", "200", "primary", math.nan)
        telemetry.record_attempt("prod/chat", alpha, "chat", "200", "primary", math.inf)
    assert len(caplog.records) == 3
    metrics = flatten(reader.get_metrics_data())
    assert "gen_ai.server.time_to_first_token" not in metrics
    [(count, total, *_)] = metrics["gen_ai.server.request.duration"]["points"].values()
    assert (count, total) == (1, 1.0)
    assert list(metrics["vmrouter.attempts"]["points"].values()) == [3]


def test_cells_stay_right_when_the_cache_starts_over(
    table: RoutingTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(names, "_CACHE_LIMIT", 2)
    telemetry = Telemetry()
    registry = CollectorRegistry(auto_describe=True)
    reference = Reference([PrometheusMetricReader(registry=registry)])
    feed(telemetry, table, rounds=3)
    feed(reference, table, rounds=3)
    assert len(telemetry._attempt_cells) <= 2
    assert prometheus_lines(telemetry.registry) == prometheus_lines(registry)


def test_readers_must_carry_the_tally() -> None:
    with pytest.raises(TypeError, match="TalliedReader"):
        Telemetry(readers=[InMemoryMetricReader()])


def test_histogram_boundaries_must_increase() -> None:
    tally = tally_module.Tally(Telemetry(prometheus=False).tally.scope)
    with pytest.raises(ValueError, match="strictly increasing"):
        tally.histogram("h", "s", "", [0.1, 0.1])
    with pytest.raises(ValueError, match="finite"):
        tally.histogram("h", "s", "", [0.1, math.inf])


def test_a_collection_on_another_thread_sees_whole_measurements(table: RoutingTable) -> None:
    reader = InMemoryReader()
    telemetry = Telemetry(readers=[reader], prometheus=False)
    alpha = targets(table)["alpha/m"]
    stop = threading.Event()
    seen: list[tuple[int, float, int]] = []

    def collect() -> None:
        while not stop.is_set():
            data = reader.get_metrics_data()
            for metric in data.resource_metrics[0].scope_metrics[0].metrics if data else []:
                seen.extend(
                    (point.count, point.sum, sum(point.bucket_counts))
                    for point in metric.data.data_points
                    if isinstance(point, HistogramDataPoint)
                )

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        for _ in range(20_000):
            telemetry.record_attempt(
                "prod/chat", alpha, "chat", "200", "primary", 1.0, tpot=1.0, output_tokens=1
            )
    finally:
        stop.set()
        collector.join()
    assert seen
    assert all(count == total == buckets for count, total, buckets in seen)


def test_recording_from_several_threads_loses_nothing(table: RoutingTable) -> None:
    telemetry = Telemetry()
    alpha = targets(table)["alpha/m"]

    def record() -> None:
        for _ in range(5_000):
            telemetry.count_decision("prod/chat", "alpha/m")
            telemetry.record_attempt("prod/chat", alpha, "chat", "200", "primary", 1.0)

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    text = telemetry.render_prometheus().decode()
    assert "vmrouter_routing_decisions_total{" in text
    for name in ("vmrouter_routing_decisions_total{", "vmrouter_attempts_total{",
                 "gen_ai_server_request_duration_seconds_count{"):  # fmt: skip
        (line,) = [x for x in text.splitlines() if x.startswith(name)]
        assert line.endswith(" 20000.0")
