#!/usr/bin/env python3
"""Drain Envoy before it is stopped: the preStop hook of the Envoy container in Kubernetes.

Envoy exits at once on SIGTERM and cuts every request it is proxying. The kubelet sends SIGTERM to
a container only once its preStop hook has returned, so this hook, run in the Envoy container
(installed as ``/usr/local/bin/vmrouter-envoy-drain`` in the vmrouter/envoy image):

1. fails Envoy's health check (``POST /healthcheck/fail``): the admin ``/ready``, and with it the
   pod's readiness listener, answers 503 from now on;
2. starts the graceful listener drain (``POST /drain_listeners?graceful``): Envoy asks clients to
   close their connections (``connection: close`` on HTTP/1.1, GOAWAY on HTTP/2), keeps accepting
   new ones for ``--drain-time-s`` (Envoy's flag), then closes its listeners; requests already
   accepted go on;
3. waits at least ``--min-seconds`` (while the endpoint leaves the Service), then until the API
   listener has no active request (``http.vmrouter.downstream_rq_active`` is 0), at most
   ``--max-seconds`` from its start; then it returns and the kubelet stops Envoy.

Standard library only (the Envoy image has python3 but no curl). Exit status: 0 once drained or at
the bound, 1 when the admin endpoint does not answer (nothing to wait for), 2 for bad arguments.

    vmrouter-envoy-drain --admin 127.0.0.1:9901 --min-seconds 5 --max-seconds 25
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_ADMIN = "127.0.0.1:9901"
DEFAULT_STAT = "http.vmrouter.downstream_rq_active"
POLL_SECONDS = 0.2
HTTP_TIMEOUT = 2.0
MAX_MISSES = 3
"""Consecutive unanswered polls after which Envoy is taken for gone."""


def _admin(base: str, path: str, *, post: bool = False) -> str:
    request = urllib.request.Request(f"{base}{path}", method="POST" if post else "GET")
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        return str(response.read().decode("utf-8", "replace"))


def active_requests(base: str, stat: str) -> int | None:
    """The gauge ``stat`` of Envoy's admin at ``base``; None if it cannot be read."""
    try:
        pattern = urllib.parse.quote(f"^{re.escape(stat)}$", safe="")
        text = _admin(base, f"/stats?filter={pattern}")
    except (OSError, urllib.error.URLError):
        return None
    match = re.search(rf"^{re.escape(stat)}: (\d+)$", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def drain(admin: str, *, min_seconds: float, max_seconds: float, stat: str = DEFAULT_STAT) -> int:
    """Run the drain sequence against Envoy's admin ``host:port``; return the exit status."""
    started = time.monotonic()
    base = f"http://{admin}"

    def say(message: str) -> None:
        print(f"vmrouter-envoy-drain +{time.monotonic() - started:.1f}s: {message}", flush=True)

    try:
        _admin(base, "/healthcheck/fail", post=True)
        _admin(base, "/drain_listeners?graceful", post=True)
    except (OSError, urllib.error.URLError) as exc:
        say(f"Envoy's admin endpoint {admin} did not answer ({exc}); not waiting")
        return 1
    say("health check failed, graceful listener drain started")
    deadline = started + max_seconds
    time.sleep(max(0.0, min(started + min_seconds, deadline) - time.monotonic()))
    active = active_requests(base, stat)
    misses = 0 if active is not None else 1
    while active != 0 and time.monotonic() < deadline and misses < MAX_MISSES:
        time.sleep(POLL_SECONDS)
        active = active_requests(base, stat)
        misses = 0 if active is not None else misses + 1
    if active == 0:
        say("no request in flight: Envoy can stop")
    elif misses >= MAX_MISSES:
        say(f"Envoy's admin endpoint {admin} stopped answering; not waiting")
    else:
        say(f"bound of {max_seconds:g}s reached with {active} request(s) in flight ({stat})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line (the tests parse the Deployment's hook with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin", default=DEFAULT_ADMIN, help="Envoy's admin host:port")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=5.0,
        help="wait at least this long (match Envoy's --drain-time-s); default 5",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=25.0,
        help="stop waiting for requests in flight after this long in all; default 25",
    )
    parser.add_argument("--stat", default=DEFAULT_STAT, help="gauge of the requests in flight")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and drain; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.min_seconds <= args.max_seconds:
        parser.error("expected 0 <= --min-seconds <= --max-seconds")
    return drain(
        args.admin, min_seconds=args.min_seconds, max_seconds=args.max_seconds, stat=args.stat
    )


if __name__ == "__main__":
    sys.exit(main())
