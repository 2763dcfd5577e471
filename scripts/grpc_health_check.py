#!/usr/bin/env python3
"""gRPC health check for the vmrouter ext_proc: exit 0 when it reports SERVING, else 1.

The ext_proc serves the standard ``grpc.health.v1.Health`` service on its listen address. This
script is the container image's HEALTHCHECK and the Kubernetes exec probe of the ext_proc
container (an exec probe, because the ext_proc listens on the pod's loopback only: a native
kubelet ``grpc`` probe would have to reach it on the pod IP).

Address, first match wins: the first argument, ``$VMROUTER_HEALTH_ADDR``, the ``--listen`` value
of the container's main process (``/proc/1/cmdline``), ``127.0.0.1:50051``. ``host:port``,
``/unix/socket`` and ``unix:/unix/socket`` are accepted; a wildcard host is checked on loopback.

    python3 scripts/grpc_health_check.py [ADDRESS] [--service NAME] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50051"


def listen_of_pid1(cmdline: Path = Path("/proc/1/cmdline")) -> str | None:
    """The ``--listen`` value of the container's main process, if it has one."""
    try:
        args = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(args):
        if arg == "--listen" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--listen="):
            return arg.partition("=")[2]
    return None


def target(address: str) -> str:
    """A gRPC channel target for a ``--listen`` style address."""
    if address.startswith("unix:"):
        return address
    if address.startswith("/"):
        return f"unix:{address}"
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    """Check once; print the status; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default=None)
    parser.add_argument("--service", default="", help="health service name ('' = whole server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    address = (
        args.address
        or os.environ.get("VMROUTER_HEALTH_ADDR")
        or listen_of_pid1()
        or DEFAULT_ADDRESS
    )

    import grpc  # imported late: argument errors stay fast
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    request = health_pb2.HealthCheckRequest(service=args.service)
    try:
        with grpc.insecure_channel(target(address)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
