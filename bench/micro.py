"""Micro-benchmark of the pure decision path, and of config load/compile time and memory.

``make bench-micro`` runs this. No gRPC, no Envoy: configs are built programmatically, validated
with ``extproc.config.validate_config`` and compiled with ``extproc.routing.table.compile_table``.

* **Decision path**: one virtual model with 10, 100 and 1,000 targets, for each of the weight-,
  priority- and latency-based strategies, plus one config of 10,000 virtual models (3 targets
  each, strategies mixed, a random model per request). One decision is what the router stream does
  per request before it answers Envoy: ``table.resolve(name, "chat", rng, health)`` with a real
  ``HealthTracker`` (every target has recent samples, so latency and SLA filters do real work),
  then ``build_slots(decision.plan, 10)`` and ``AttemptPlan(slots=...)``. Each decision is timed
  on its own (``perf_counter_ns``); the table gives the median and p99 in microseconds.
* **10,000 virtual models**: the YAML file's load (parse + validate + compile, what a reload
  does), each step on its own, the same load from the config written as JSON, and memory
  measured in fresh processes so that nothing this process allocated counts: a child that loads
  and compiles the config, and a real ``python -m extproc serve`` with that config (VmRSS once it
  listens, and VmHWM).

    .venv/bin/python bench/micro.py [--quick] [--out /tmp/vmrouter-bench/micro.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import free_port, git_state, status_kb  # noqa: E402 - bench/ is the script dir

from extproc import config_text  # noqa: E402
from extproc.config import load_config, parse_config, validate_config  # noqa: E402
from extproc.health import HealthTracker, Outcome  # noqa: E402
from extproc.memory import gc_paused  # noqa: E402
from extproc.routing.attempts import AttemptPlan, build_slots  # noqa: E402
from extproc.routing.table import RoutingTable, compile_table  # noqa: E402

MAX_ATTEMPTS = 10
TARGET_DECISION_US = 20.0
TARGET_COMPILE_S = 1.0
TARGET_RSS_MB = 200.0
ENVIRON = {f"BENCH_KEY_{p:03d}": f"sk-bench-{p:03d}" for p in range(100)}
"""Provider credentials, as the ext_proc reads them from its environment."""
STRATEGIES = ("weight-based-routing", "priority-based-routing", "latency-based-routing")


# --- configs --------------------------------------------------------------------------------------


def catalog(providers: int, models_per_provider: int) -> list[dict[str, Any]]:
    """Providers on loopback URLs, each with ``models_per_provider`` chat models."""
    return [
        {
            "name": f"p{p:03d}",
            "type": "openai-compatible",
            "base_url": f"http://127.0.0.1:{20000 + p}/v1",
            "api_key_env": f"BENCH_KEY_{p:03d}",
            "models": [
                {"name": f"m{m:03d}", "model": f"vendor/model-{p:03d}-{m:03d}"}
                for m in range(models_per_provider)
            ],
        }
        for p in range(providers)
    ]


def target_names(providers: int, models_per_provider: int) -> list[str]:
    return [f"p{p:03d}/m{m:03d}" for m in range(models_per_provider) for p in range(providers)]


def routing(kind: str, names: list[str], index: int = 0) -> dict[str, Any]:
    """A routing_config of ``kind`` over ``names`` with realistic per-target settings."""
    n = len(names)
    targets: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        t: dict[str, Any] = {"target": name}
        if kind == "weight-based-routing":
            # weights must sum to 100: 100 // n each (the first 100 % n get one more); past 100
            # targets, the first 100 get 1 and the rest 0 (they come last, shuffled)
            t["weight"] = 100 // n + (1 if i < 100 % n else 0)
        elif kind == "priority-based-routing":
            t["priority"] = i % 5
            if i % 4 == 0:
                t["sla_cutoff"] = {"time_per_output_token_ms": 80, "window_seconds": 180}
        if i % 3 == 0:
            t["override_params"] = {"temperature": 0.2}
        if i % 5 == 0:
            t["headers_override"] = {"set": {"x-team": f"team-{index % 7}"}}
        targets.append(t)
    config: dict[str, Any] = {"type": kind, "load_balance_targets": targets}
    if kind == "latency-based-routing":
        config.update({"window_seconds": 1200, "band": 1.2, "min_samples": 3})
    return config


def one_vm_config(kind: str, n_targets: int) -> tuple[dict[str, Any], list[str]]:
    providers = 10
    per = max(1, -(-n_targets // providers))
    names = target_names(providers, per)[:n_targets]
    raw = {
        "providers": catalog(providers, per),
        "virtual_model_groups": [
            {
                "name": "bench",
                "virtual_models": [
                    {"name": "vm", "slug": "bench-vm", "routing_config": routing(kind, names)}
                ],
            }
        ],
    }
    return raw, ["bench/vm"]


def many_vms_config(count: int = 10_000, per_group: int = 100) -> tuple[dict[str, Any], list[str]]:
    """``count`` virtual models of 3 targets each, strategies mixed, half with a slug."""
    providers, per = 50, 20
    names = target_names(providers, per)
    groups = []
    requested: list[str] = []
    for g in range(count // per_group):
        vms = []
        for v in range(per_group):
            i = g * per_group + v
            kind = STRATEGIES[i % 3]
            picked = [names[(i * 7 + k * 331) % len(names)] for k in range(3)]
            vm: dict[str, Any] = {"name": f"vm-{v:03d}", "routing_config": routing(kind, picked, i)}
            if kind == "weight-based-routing":
                for t, w in zip(
                    vm["routing_config"]["load_balance_targets"], (50, 30, 20), strict=True
                ):
                    t["weight"] = w
            if i % 2 == 0:
                vm["slug"] = f"g{g:03d}-vm{v:03d}"
                requested.append(vm["slug"])
            else:
                requested.append(f"group-{g:03d}/vm-{v:03d}")
            vms.append(vm)
        groups.append({"name": f"group-{g:03d}", "virtual_models": vms})
    return {"providers": catalog(providers, per), "virtual_model_groups": groups}, requested


def warm_health(table: RoutingTable, rng: random.Random) -> HealthTracker:
    """A health tracker in steady state: every target has a few recent successful samples."""
    health = HealthTracker(table.health_settings)
    health.register_windows(table.tpot_windows)
    keys = {t.key for vm in table.virtual_models for t in vm.targets}
    for key in sorted(keys):
        for _ in range(5):
            tpot = rng.uniform(0.01, 0.06)
            health.observe(
                Outcome(
                    target=key,
                    status=200,
                    ttfb_s=0.2,
                    duration_s=2.0,
                    output_tokens=100,
                    tpot_s=tpot,
                    input_tokens=50,
                )
            )
    return health


# --- timing ---------------------------------------------------------------------------------------


def time_decisions(
    table: RoutingTable,
    names: list[str],
    health: HealthTracker,
    iterations: int,
    rng: random.Random,
    budget_s: float,
) -> dict[str, float]:
    """Median and p99 (us) of the whole decision (resolve + slots + plan) and of resolve alone.

    Each loop stops after ``iterations`` decisions or ``budget_s`` seconds, whichever is first
    (at least 5 decisions), so a slow case stays bounded; the count is reported.
    """
    picks = [names[rng.randrange(len(names))] for _ in range(iterations)]
    clock = time.perf_counter_ns
    resolve = table.resolve
    warm_until = time.monotonic() + budget_s / 10
    for name in picks[:200]:  # warm caches
        AttemptPlan(slots=build_slots(resolve(name, "chat", rng, health).plan, MAX_ATTEMPTS))
        if time.monotonic() > warm_until:
            break
    gc.collect()
    full: list[int] = []
    deadline = time.monotonic() + budget_s
    for name in picks:
        start = clock()
        decision = resolve(name, "chat", rng, health)
        AttemptPlan(slots=build_slots(decision.plan, MAX_ATTEMPTS))
        full.append(clock() - start)
        if len(full) >= 5 and time.monotonic() > deadline:
            break
    only: list[int] = []
    deadline = time.monotonic() + budget_s / 2
    for name in picks:
        start = clock()
        resolve(name, "chat", rng, health)
        only.append(clock() - start)
        if len(only) >= 5 and time.monotonic() > deadline:
            break
    full.sort()
    only.sort()
    return {
        "iterations": len(full),
        "median_us": full[len(full) // 2] / 1000,
        "p99_us": full[min(len(full) - 1, int(len(full) * 0.99))] / 1000,
        "resolve_median_us": only[len(only) // 2] / 1000,
        "plan_length": len(resolve(names[0], "chat", rng, health).plan),
    }


def timed(fn: Any, *args: Any, repeat: int = 1) -> tuple[Any, float]:
    """Best of up to ``repeat`` wall-clock times (s), with the last result.

    A step that takes more than a second runs once: it is slow enough to read, and the run stays
    bounded.
    """
    best = float("inf")
    result = None
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = fn(*args)
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        if elapsed > 1.0:
            break
    return result, best


# --- memory in fresh processes --------------------------------------------------------------------


def rss_child(path: str) -> None:
    """Child mode: RSS after imports, after loading the file, after compiling; print JSON."""
    out = {"after_imports_mb": status_kb("self", "VmRSS") / 1024}
    config = load_config(path)
    out["after_load_mb"] = status_kb("self", "VmRSS") / 1024
    table = compile_table(config, environ=ENVIRON)
    gc.collect()
    out["after_compile_mb"] = status_kb("self", "VmRSS") / 1024
    out["peak_mb"] = status_kb("self", "VmHWM") / 1024
    out["names"] = len(table.names())
    print(json.dumps(out))


def serve_rss(path: Path, timeout: float = 60.0) -> dict[str, float]:
    """Start ``python -m extproc serve`` on ``path``; its RSS once listening; stop it by PID."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "extproc",
                "--log-level",
                "WARNING",
                "serve",
                "--config",
                str(path),
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                "",
                "--reload-interval",
                "0",
                "--drain-seconds",
                "1",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **ENVIRON},
        )
        try:
            start = time.monotonic()
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"serve exited early: {log.read()[-2000:]!r}")
                with socket.socket() as sock:
                    sock.settimeout(0.2)
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if time.monotonic() - start > timeout:
                    raise RuntimeError("serve did not listen in time")
                time.sleep(0.05)
            ready_s = time.monotonic() - start
            time.sleep(1.0)  # let start-up garbage settle
            return {
                "rss_mb": status_kb(proc.pid, "VmRSS") / 1024,
                "peak_mb": status_kb(proc.pid, "VmHWM") / 1024,
                "listening_after_s": ready_s,
            }
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    parser.add_argument(
        "--quick", action="store_true", default=quick, help="fewer iterations (BENCH_QUICK=1)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("BENCH_MICRO_OUT", "/tmp/vmrouter-bench/micro.json")),
    )
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return 0

    started = time.monotonic()
    rng = random.Random(7)
    scale = 0.2 if args.quick else 1.0
    budget = 0.7 if args.quick else 3.0
    rows: list[dict[str, Any]] = []
    for n in (10, 100, 1000):
        for kind in STRATEGIES:
            raw, names = one_vm_config(kind, n)
            table = compile_table(validate_config(raw), environ=ENVIRON)
            health = warm_health(table, rng)
            iterations = int(scale * {10: 20_000, 100: 10_000, 1000: 1_000}[n])
            result = time_decisions(table, names, health, iterations, rng, budget)
            rows.append({"case": f"1 VM, {n} targets", "strategy": kind, **result})
            print(
                f"{n:>5} targets  {kind:<24} median {result['median_us']:8.1f} us  "
                f"p99 {result['p99_us']:8.1f} us  (resolve alone {result['resolve_median_us']:.1f}"
                f" us; plan of {result['plan_length']})",
                flush=True,
            )

    raw, names = many_vms_config()
    many_table = compile_table(validate_config(raw), environ=ENVIRON)
    health = warm_health(many_table, rng)
    result = time_decisions(many_table, names, health, int(scale * 20_000), rng, budget)
    rows.append({"case": "10,000 VMs, 3 targets each", "strategy": "mixed", **result})
    print(
        f"10,000 VMs, random model per decision: median {result['median_us']:.1f} us  "
        f"p99 {result['p99_us']:.1f} us",
        flush=True,
    )

    # load / compile time for 10,000 virtual models
    workdir = Path(tempfile.mkdtemp(prefix="vmrouter-micro-"))
    try:
        path = workdir / "gateway-10k.yaml"
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        text = yaml.dump(raw, Dumper=dumper, sort_keys=False)
        path.write_text(text)
        json_path = workdir / "gateway-10k.json"
        json_path.write_text(json.dumps(raw, indent=1))
        repeat = 1 if args.quick else 3

        def parse(source: str) -> Any:
            with gc_paused():  # as parse_config does
                return config_text.load(source)

        parsed, parse_s = timed(parse, text, repeat=repeat)
        config, validate_s = timed(validate_config, parsed, repeat=repeat)
        _, compile_s = timed(lambda: compile_table(config, environ=ENVIRON), repeat=repeat)
        _, load_s = timed(
            lambda: compile_table(parse_config(path.read_text()), environ=ENVIRON), repeat=repeat
        )
        _, json_load_s = timed(
            lambda: compile_table(parse_config(json_path.read_text()), environ=ENVIRON),
            repeat=repeat,
        )
        csafe = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        c_yaml_s = timed(lambda: yaml.load(text, Loader=csafe), repeat=repeat)[1]
        load = {
            "file_mb": len(text.encode()) / 1e6,
            "virtual_models": 10_000,
            "providers": len(raw["providers"]),
            "catalog_models": sum(len(p["models"]) for p in raw["providers"]),
            "parse_s": parse_s,
            "yaml_csafeloader_s": c_yaml_s,
            "validate_s": validate_s,
            "compile_table_s": compile_s,
            "validate_plus_compile_s": validate_s + compile_s,
            "full_load_s": load_s,
            "full_load_json_s": json_load_s,
        }
        child = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            check=True,
        )
        memory = json.loads(child.stdout.strip().splitlines()[-1])
        memory["serve_10k"] = serve_rss(path)
        memory["serve_bench_config"] = serve_rss(ROOT / "bench" / "gateway.yaml")
    finally:
        for leftover in workdir.iterdir():
            leftover.unlink()
        workdir.rmdir()

    print()
    text_table = render(rows, load, memory, time.monotonic() - started, args.quick)
    print(text_table)
    result_doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "python": platform.python_version(),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "load_average_at_end": os.getloadavg()[0],
            "tree": git_state(),
        },
        "quick": args.quick,
        "decisions": rows,
        "load_10k": load,
        "memory_10k": memory,
        "table": text_table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result_doc, indent=2))
    print(f"\nresults: {args.out}")
    return 0


def render(
    rows: list[dict[str, Any]],
    load: dict[str, Any],
    memory: dict[str, Any],
    took: float,
    quick: bool,
) -> str:
    lines = [
        f"vmrouter micro-benchmark ({'quick' if quick else 'full'}; took {took:.0f} s): one "
        "decision = resolve + build_slots + AttemptPlan, warm HealthTracker",
        "",
        "| case | strategy | median (us) | p99 (us) | resolve alone, median (us) | plan |"
        " decisions timed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['case']} | {r['strategy']} | {r['median_us']:,.1f} | "
        f"{r['p99_us']:,.1f} | {r['resolve_median_us']:,.1f} | {r['plan_length']} | "
        f"{r['iterations']:,} |"
        for r in rows
    ]
    lines += [
        "",
        f"10,000 virtual models ({load['file_mb']:.1f} MB of YAML, "
        f"{load['providers']} providers, {load['catalog_models']} catalog models):",
        "",
        "| step | time (s) |",
        "|---|---:|",
        f"| parse: extproc.config_text.load (what parse_config uses) | {load['parse_s']:.3f} |",
        f"| (for comparison: yaml.load with libyaml's CSafeLoader, collector on) | "
        f"{load['yaml_csafeloader_s']:.3f} |",
        f"| validate_config (pydantic + cross-references) | {load['validate_s']:.3f} |",
        f"| compile_table | {load['compile_table_s']:.3f} |",
        f"| validate + compile | {load['validate_plus_compile_s']:.3f} |",
        f"| full load from the file (parse_config + compile_table, as a reload) | "
        f"{load['full_load_s']:.3f} |",
        f"| the same load from the config written as JSON | {load['full_load_json_s']:.3f} |",
        "",
        "| memory, fresh processes | MB |",
        "|---|---:|",
        f"| child after imports | {memory['after_imports_mb']:.1f} |",
        f"| child after load_config | {memory['after_load_mb']:.1f} |",
        f"| child after compile_table | {memory['after_compile_mb']:.1f} |",
        f"| child peak (VmHWM) | {memory['peak_mb']:.1f} |",
        f"| `extproc serve`, bench/gateway.yaml: RSS / peak | "
        f"{memory['serve_bench_config']['rss_mb']:.1f} / "
        f"{memory['serve_bench_config']['peak_mb']:.1f} |",
        f"| `extproc serve`, 10,000 VMs: RSS / peak | {memory['serve_10k']['rss_mb']:.1f} / "
        f"{memory['serve_10k']['peak_mb']:.1f} |",
        f"| (`extproc serve` with 10,000 VMs listening after) | "
        f"{memory['serve_10k']['listening_after_s']:.1f} s |",
    ]
    at100 = [r for r in rows if r["case"] == "1 VM, 100 targets"]
    worst = max(at100, key=lambda r: r["median_us"])
    rss = memory["serve_10k"]["peak_mb"]
    checks = [
        (
            "decision median at 100 targets (worst strategy: " + worst["strategy"] + ")",
            f"< {TARGET_DECISION_US:g} us",
            f"{worst['median_us']:.1f} us",
            worst["median_us"] < TARGET_DECISION_US,
        ),
        (
            "10k VMs: validate + compile",
            f"< {TARGET_COMPILE_S:g} s",
            f"{load['validate_plus_compile_s']:.3f} s",
            load["validate_plus_compile_s"] < TARGET_COMPILE_S,
        ),
        (
            "10k VMs: full load from YAML (reload path)",
            f"< {TARGET_COMPILE_S:g} s",
            f"{load['full_load_s']:.3f} s",
            load["full_load_s"] < TARGET_COMPILE_S,
        ),
        (
            "10k VMs: ext_proc peak RSS",
            f"< {TARGET_RSS_MB:g} MB",
            f"{rss:.1f} MB",
            rss < TARGET_RSS_MB,
        ),
    ]
    lines += ["", "| target (issue 7) | goal | measured | |", "|---|---|---:|---|"]
    lines += [
        f"| {name} | {goal} | {value} | {'met' if ok else 'MISSED'} |"
        for name, goal, value, ok in checks
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
