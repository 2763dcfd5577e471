"""Micro-benchmark of recording one finished request's telemetry (``extproc.observe.Recorder``).

No gRPC, no Envoy, no streams: a ``RequestContext`` is built by hand with the attempts already
settled (outside the timed region), then what ``processor`` calls per request is timed:

* **success**: ``decided`` + ``finished`` for one successful attempt with usage (prompt and
  completion tokens, response model; non-streamed, so no time to first token);
* **stream**: the same for a streamed answer (time to first token too);
* **fallback**: ``decided`` + ``settled_failures`` (the 503 arrives) + ``finished``: a failed
  primary attempt then a successful fallback with usage.

Each case runs with the health model stubbed out (telemetry plus the recorder's own bookkeeping:
the row to compare) and with a real ``HealthTracker`` (what the whole ``Recorder`` costs).
Telemetry is set up as the server sets it up (``Telemetry()``: the Prometheus reader);
``--second-reader`` adds an in-memory reader, standing in for OTLP export, and ``--tracing`` a
tracer provider with a span processor that drops spans. The cost of one ``/metrics`` rendering is
timed too, since pre-aggregation could move work to collection time.

    .venv/bin/python bench/telemetry_micro.py [--iterations 20000] [--second-reader] [--tracing]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import git_state  # noqa: E402 - bench/ is the script dir

from extproc.config import parse_config  # noqa: E402
from extproc.health import HealthTracker, Outcome  # noqa: E402
from extproc.observe import Recorder, ResponseFacts  # noqa: E402
from extproc.processor import RequestContext  # noqa: E402
from extproc.routing.attempts import AttemptPlan, build_slots  # noqa: E402
from extproc.routing.table import RoutingDecision, RoutingTable, compile_table  # noqa: E402
from extproc.telemetry import Telemetry  # noqa: E402

CONFIG = """
providers:
  - name: alpha
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: m, model: upstream-m}]
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
            - {target: alpha/m, priority: 0, retry_config: {attempts: 1}}
            - {target: beta/m, priority: 1, retry_config: {attempts: 1}}
"""
VM = "prod/chat"


class NullHealth(HealthTracker):
    """A health model that ignores everything: isolates what telemetry costs."""

    def observe(self, outcome: Outcome, *, share: bool = True) -> None:
        """Drop the outcome."""

    def ended(self, key: str) -> None:
        """Drop the end of an in-flight attempt."""


class Clock:
    """A hand-moved clock shared by the scenario builder and the recorder."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build_table() -> RoutingTable:
    return compile_table(parse_config(CONFIG), environ={})


def context_for(table: RoutingTable, clock: Clock, *, fail_first: bool, stream: bool) -> Any:
    """A request whose attempts are settled: (context, facts), ready for the recorder."""
    vm = table.lookup(VM)
    decision = RoutingDecision(virtual_model=vm, plan=tuple(vm.targets))
    plan = AttemptPlan(slots=build_slots(decision.plan, 10))
    context = RequestContext(
        request_id="bench-1",
        decision=decision,
        body={},
        upstream_suffix="/chat/completions",
        query="",
        client_headers={},
        stream=stream,
        plan=plan,
    )
    clock.now += 0.01
    attempt = 0
    if fail_first:
        plan.begin(attempt, clock.now)
        plan.mark_sent(clock.now)
        clock.now += 0.3
        plan.records[-1].headers_at = clock.now
        plan.outcome(attempt, 503)
        attempt += 1
    plan.begin(attempt, clock.now)
    plan.mark_sent(clock.now)
    sent = clock.now
    clock.now += 0.2
    plan.records[-1].headers_at = clock.now
    plan.outcome(attempt, 200)
    clock.now += 1.5
    facts = ResponseFacts(
        completed=True,
        ended_at=clock.now,
        prompt_tokens=7,
        completion_tokens=42,
        first_token_at=sent + 0.35 if stream else None,
        response_model="served-x",
    )
    return context, facts


def time_case(
    recorder: Recorder,
    make: Callable[[], tuple[RequestContext, ResponseFacts]],
    iterations: int,
    *,
    settle: bool,
) -> list[float]:
    """Per-request recording times in microseconds (context built outside the timed region)."""
    timer = time.perf_counter_ns
    times: list[float] = []
    for _ in range(iterations):
        context, facts = make()
        start = timer()
        recorder.decided(context)
        if settle:
            recorder.settled_failures(context)
        recorder.finished(context, facts)
        times.append((timer() - start) / 1000.0)
    return times


def summary(times: Sequence[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_us": statistics.median(ordered),
        "mean_us": statistics.fmean(ordered),
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


def make_telemetry(second_reader: bool, tracing: bool) -> tuple[Telemetry, Callable[[], None]]:
    """Telemetry as the server builds it, plus the optional OTLP stand-ins; and its cleanup."""
    readers = []
    if second_reader:
        try:  # pre-aggregated telemetry takes readers that carry its histograms
            from extproc.telemetry import InMemoryReader as Reader
        except ImportError:  # the code before it (to measure "before" on an older commit)
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader as Reader

        readers.append(Reader())
    provider = None
    if tracing:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

        class Drop(SpanExporter):
            def export(self, spans: Any) -> Any:
                from opentelemetry.sdk.trace.export import SpanExportResult

                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(Drop()))
    telemetry = Telemetry(readers=readers, tracer_provider=provider)

    def close() -> None:
        telemetry.shutdown()
        if provider is not None:
            provider.shutdown()

    return telemetry, close


def run(iterations: int, second_reader: bool, tracing: bool) -> dict[str, Any]:
    table = build_table()
    results: dict[str, Any] = {}
    scrape: dict[str, float] = {}
    cases = {
        "success": {"fail_first": False, "stream": False},
        "stream": {"fail_first": False, "stream": True},
        "fallback": {"fail_first": True, "stream": False},
    }
    for health_kind in ("health stubbed", "real HealthTracker"):
        for name, shape in cases.items():
            clock = Clock()
            telemetry, close = make_telemetry(second_reader, tracing)
            health_cls = NullHealth if health_kind == "health stubbed" else HealthTracker
            health = health_cls(table.health_settings, clock=clock)
            recorder = Recorder(health, telemetry, clock)

            def make(shape: dict[str, bool] = shape, clock: Clock = clock) -> Any:
                return context_for(table, clock, **shape)

            time_case(recorder, make, min(2000, iterations), settle=shape["fail_first"])  # warm
            gc.collect()
            times = time_case(recorder, make, iterations, settle=shape["fail_first"])
            results[f"{name}: {health_kind}"] = summary(times)
            if name == "fallback" and health_kind == "health stubbed":
                render = []
                for _ in range(50):
                    start = time.perf_counter_ns()
                    telemetry.render_prometheus()
                    render.append((time.perf_counter_ns() - start) / 1000.0)
                scrape = summary(render)
            close()
    results["one /metrics rendering (after the fallback case)"] = scrape
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--second-reader", action="store_true", help="add an in-memory reader")
    parser.add_argument("--tracing", action="store_true", help="trace with a dropping processor")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = run(args.iterations, args.second_reader, args.tracing)
    setup = "Prometheus reader" + (" + in-memory reader" if args.second_reader else "")
    setup += ", tracing on" if args.tracing else ", tracing off"
    print(f"telemetry micro-benchmark ({git_state()}; {setup}; Python {platform.python_version()})")
    print("| case | median (us) | mean (us) | p99 (us) |\n|---|---:|---:|---:|")
    for name, row in results.items():
        print(f"| {name} | {row['median_us']:.1f} | {row['mean_us']:.1f} | {row['p99_us']:.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
