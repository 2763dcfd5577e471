"""Pre-aggregated instruments: counters and explicit-bucket histograms kept in plain Python.

This module owns the cheap side of metrics. OpenTelemetry's synchronous instruments copy, validate
and hash the attribute mapping of every measurement, once per metric reader, and take locks and
build a ``Measurement`` on the way. Here each attribute set is resolved once to a *cell* that the
caller keeps (``telemetry.Telemetry`` caches them per virtual model, target and outcome); a
measurement is then a few integer and float updates:

* ``Counter``: one ``CounterCell`` (an int) per attribute set. It is exported through an OTel
  ``ObservableCounter`` whose callback reports the totals, so the SDK still does everything
  downstream: cumulative or delta temporality per reader, cardinality limits, Prometheus naming.
* ``Histogram``: one ``Series`` per attribute set, with one share (``_View``) per reader: bucket
  counts (``bisect_left`` on the boundaries, as the SDK's explicit-bucket aggregation does), sum,
  min and max since that reader's last collection, and its running totals. The SDK has no
  observable histogram, so these become OTel ``HistogramDataPoint`` s at collection time: a
  ``TalliedReader`` (a mixin for any ``MetricReader``) adds them to the ``MetricsData`` the SDK
  collected, under the meter's scope, before the reader exports it (to Prometheus or OTLP), so
  every exporter renders the same data through its own code. A cumulative reader folds its
  interval into its totals the way the SDK does; a delta reader gets the interval.

Semantics kept from the SDK: values that are not finite or are negative are dropped with a
warning; an attribute set beyond the first 2,000 of an instrument (OpenTelemetry's default
cardinality limit) goes to one ``otel.metric.overflow=true`` series; delta points start at the
reader's previous collection; the points of one collection share the SDK's timestamp. Updates
take one re-entrant lock per tally (one acquisition per recorded attempt), so recording from
several threads is safe, and so is a collection running on another thread (the OTLP reader's).

Histograms must be recorded together with a counter increment (``Telemetry`` always counts the
attempt): the SDK hands a reader nothing at all when none of its own instruments has data, and
the histograms ride on that hand-over.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from itertools import pairwise
from time import time_ns
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import DefaultAggregation
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger(__name__)

Attributes = Mapping[str, str]
"""Every attribute this gateway puts on a metric is a string."""

CARDINALITY_LIMIT = 2000
"""Attribute sets per instrument before the overflow series (OpenTelemetry's default)."""
OVERFLOW_ATTRIBUTES: Mapping[str, Any] = {"otel.metric.overflow": True}
_INF = math.inf


class CounterCell:
    """The running total of one counter for one attribute set (add with the tally's lock held)."""

    __slots__ = ("attributes", "value")

    def __init__(self, attributes: Mapping[str, Any]) -> None:
        self.attributes = attributes
        self.value = 0


class Counter:
    """A monotonic counter: one ``CounterCell`` per attribute set, read by an OTel callback."""

    def __init__(self, tally: Tally) -> None:
        self._lock = tally.lock
        self._cells: dict[tuple[tuple[str, str], ...], CounterCell] = {}

    def cell(self, attributes: Attributes) -> CounterCell:
        """The cell for ``attributes`` (created on first use); the caller adds to ``value``."""
        key = tuple(attributes.items())
        cell = self._cells.get(key)
        if cell is None:
            with self._lock:
                cell = self._cells.setdefault(key, CounterCell(dict(attributes)))
        return cell

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        """``ObservableCounter`` callback: every attribute set's total."""
        with self._lock:
            cells = list(self._cells.values())
        return [Observation(cell.value, cell.attributes) for cell in cells]


class _View:
    """One reader's share of one series: since its last collection, and its running totals.

    Each reader folds its own intervals, exactly as the SDK's per-reader aggregations do (the
    cumulative sum is ``interval sum + previous sum`` at every collection), so even the last bit
    of a float sum is what that reader got from synchronous instruments.
    """

    __slots__ = ("counts", "max", "min", "sum", "total_counts", "total_max", "total_min",
                 "total_sum")  # fmt: skip

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum: float = 0
        self.min = _INF
        self.max = -_INF
        self.total_counts = [0] * buckets
        self.total_sum: float = 0
        self.total_min = _INF
        self.total_max = -_INF

    def fold(self) -> None:
        """Add the interval to the running totals (a cumulative reader's collection)."""
        self.total_counts = [a + b for a, b in zip(self.counts, self.total_counts, strict=True)]
        self.total_sum = self.sum + self.total_sum
        self.total_min = min(self.min, self.total_min)
        self.total_max = max(self.max, self.total_max)
        self.reset()

    def reset(self) -> None:
        """Start a new interval."""
        self.counts = [0] * len(self.counts)
        self.sum = 0
        self.min = _INF
        self.max = -_INF


class Series:
    """One histogram's aggregation for one attribute set (``add`` with the tally's lock held)."""

    __slots__ = ("attributes", "bounds", "instrument", "start_ns", "views")

    def __init__(self, instrument: Histogram, attributes: Mapping[str, Any], readers: int) -> None:
        self.instrument = instrument
        self.attributes = attributes
        self.bounds = instrument.bounds
        self.start_ns = time_ns()
        self.views = [_View(len(self.bounds) + 1) for _ in range(readers)]

    def add(self, value: float) -> None:
        """Record one measurement."""
        if not 0 <= value < _INF:
            log.warning("%s: dropped %r (not finite, or negative)", self.instrument.name, value)
            return
        index = bisect_left(self.bounds, value)
        for view in self.views:
            view.counts[index] += 1
            view.sum += value
            if value < view.min:
                view.min = value
            if value > view.max:
                view.max = value


class Histogram:
    """An explicit-bucket histogram: one ``Series`` per attribute set."""

    def __init__(
        self, tally: Tally, name: str, unit: str, description: str, bounds: Sequence[float]
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.bounds = tuple(bounds)
        if any(not math.isfinite(b) for b in self.bounds) or any(
            a >= b for a, b in pairwise(self.bounds)
        ):
            raise ValueError(f"{name}: boundaries must be finite and strictly increasing")
        self._tally = tally
        self._series: dict[tuple[tuple[str, str], ...], Series] = {}
        self._overflow: Series | None = None
        self._last_collection_ns: list[int | None] = []
        """Per reader: when it last collected this histogram (delta points start there)."""

    def series(self, attributes: Attributes) -> Series:
        """The series for ``attributes`` (created on first use, or the overflow series)."""
        key = tuple(attributes.items())
        found = self._series.get(key)
        if found is not None:
            return found
        with self._tally.lock:
            found = self._series.get(key)
            if found is None:
                readers = len(self._last_collection_ns)
                if len(self._series) >= CARDINALITY_LIMIT:
                    if self._overflow is None:
                        self._overflow = Series(self, OVERFLOW_ATTRIBUTES, readers)
                    return self._overflow
                found = self._series[key] = Series(self, dict(attributes), readers)
            return found

    def _add_view(self) -> None:
        self._last_collection_ns.append(None)
        for series in self._all():
            series.views.append(_View(len(self.bounds) + 1))

    def _all(self) -> list[Series]:
        found = list(self._series.values())
        if self._overflow is not None:
            found.append(self._overflow)
        return found

    def metric(self, reader: int, delta: bool, now_ns: int) -> Metric | None:
        """Reader ``reader``'s collection as OTel metric data (``None`` without points).

        Call with the tally's lock held: the reader's intervals start over.
        """
        every = self._all()
        if not every:
            return None
        points = []
        since = self._last_collection_ns[reader]
        for series in every:
            view = series.views[reader]
            if delta:
                start = series.start_ns if since is None else since
                counts, total, low, high = view.counts, view.sum, view.min, view.max
                view.reset()
            else:
                view.fold()
                start = series.start_ns
                counts, total = view.total_counts, view.total_sum
                low, high = view.total_min, view.total_max
            count = sum(counts)
            if count:
                points.append(
                    HistogramDataPoint(
                        attributes=series.attributes,
                        start_time_unix_nano=start,
                        time_unix_nano=now_ns,
                        count=count,
                        sum=total,
                        bucket_counts=tuple(counts),
                        explicit_bounds=series.bounds,
                        min=low,
                        max=high,
                        exemplars=[],
                    )
                )
        self._last_collection_ns[reader] = now_ns
        if not points:
            return None
        temporality = AggregationTemporality.DELTA if delta else AggregationTemporality.CUMULATIVE
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=HistogramData(data_points=points, aggregation_temporality=temporality),
        )


class Tally:
    """The pre-aggregated instruments of one meter, and their export to that meter's readers."""

    def __init__(self, scope: InstrumentationScope) -> None:
        """Instruments created here are exported under ``scope`` (the meter's)."""
        self.lock = threading.RLock()
        self.scope = scope
        self._histograms: list[Histogram] = []
        self._readers: dict[int, tuple[int, bool]] = {}
        """``id(reader)`` to its index in every series' views, and whether it wants delta."""

    def counter(self) -> Counter:
        """A new counter (register ``Counter.observe`` as an ``ObservableCounter`` callback)."""
        return Counter(self)

    def histogram(
        self, name: str, unit: str, description: str, bounds: Sequence[float]
    ) -> Histogram:
        """A new explicit-bucket histogram exported as ``name`` (create them before ``attach``)."""
        histogram = Histogram(self, name, unit, description, bounds)
        with self.lock:
            self._histograms.append(histogram)
            for _ in self._readers:
                histogram._add_view()
        return histogram

    def attach(self, reader: MetricReader) -> None:
        """Export to ``reader`` too: it gets its own share of every series."""
        # The reader's wishes live in private attributes set by MetricReader.__init__ (from the
        # exporter's preferences for PeriodicExportingMetricReader); there is no public getter.
        temporality = _for_histograms(getattr(reader, "_instrument_class_temporality", {}))
        aggregation = _for_histograms(getattr(reader, "_instrument_class_aggregation", {}))
        if aggregation is not None and not isinstance(aggregation, DefaultAggregation):
            log.warning(
                "%s asks for %s histograms; vmrouter exports explicit buckets",
                type(reader).__name__,
                type(aggregation).__name__,
            )
        with self.lock:
            if id(reader) in self._readers:
                return
            delta = temporality is AggregationTemporality.DELTA
            self._readers[id(reader)] = (len(self._readers), delta)
            for histogram in self._histograms:
                histogram._add_view()

    def merged(self, data: MetricsData, reader: MetricReader) -> MetricsData:
        """``data`` (what the SDK collected for ``reader``) plus the histograms, in our scope."""
        index, delta = self._readers[id(reader)]
        now_ns = _collection_time(data)
        with self.lock:
            metrics = [
                m for h in self._histograms if (m := h.metric(index, delta, now_ns)) is not None
            ]
        if not metrics or not data.resource_metrics:
            return data
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, scoped in enumerate(scopes):
            if scoped.scope == self.scope:
                scopes[i] = replace(scoped, metrics=[*scoped.metrics, *metrics])
                break
        else:
            scopes.append(ScopeMetrics(scope=self.scope, metrics=metrics, schema_url=""))
        return replace(data, resource_metrics=[replace(first, scope_metrics=scopes), *rest])


def _for_histograms(by_class: Mapping[type, Any]) -> Any:
    return next((v for k, v in by_class.items() if issubclass(k, SdkHistogram)), None)


def _collection_time(data: MetricsData) -> int:
    """The SDK's timestamp for this collection (from any of its points), so all points share it."""
    for resource in data.resource_metrics:
        for scoped in resource.scope_metrics:
            for metric in scoped.metrics:
                for point in metric.data.data_points:
                    return int(point.time_unix_nano)
    return time_ns()


class TalliedReader(MetricReader):
    """Mixin for a ``MetricReader``: every collection it receives also carries the tally's data.

    Put it first in the bases (``class R(TalliedReader, PrometheusMetricReader)``); ``Telemetry``
    binds it to its tally. Until then it passes collections through unchanged.
    """

    tally: Tally | None = None

    def bind(self, tally: Tally) -> None:
        """Add ``tally``'s histograms to every collection from now on."""
        tally.attach(self)
        self.tally = tally

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if self.tally is not None:
            metrics_data = self.tally.merged(metrics_data, self)
        # The concrete reader after this mixin in the MRO implements it (mypy sees the abstract).
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)  # type: ignore[safe-super]
