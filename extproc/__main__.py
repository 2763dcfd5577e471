"""Command line: ``python -m extproc {serve,run,envoy-config,check}``.

This module only parses arguments and wires the pieces together; each command's work lives in the
module it names.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from extproc.config import load_config
from extproc.envoy_config import EnvoySettings, render
from extproc.errors import ConfigError
from extproc.processor import Runtime
from extproc.routing.table import compile_table


def _split_host_port(value: str) -> tuple[str, int]:
    if value.startswith("/"):
        return value, 0
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _serve(config_path: Path, listen: str) -> int:
    from extproc.server import start_server

    runtime = Runtime(compile_table(load_config(config_path)))
    server = await start_server(runtime, listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=10)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m extproc", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_proc gRPC server")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--listen", default="127.0.0.1:50051", help="host:port or /unix/socket")

    run = sub.add_parser("run", help="run ext_proc + Envoy (+ demo upstreams without --config)")
    run.add_argument("--config", type=Path, default=None)
    run.add_argument("--port", type=int, default=10000)
    run.add_argument("--admin-port", type=int, default=9901)
    run.add_argument("--extproc-port", type=int, default=50051)

    gen = sub.add_parser("envoy-config", help="print the Envoy bootstrap for a gateway config")
    gen.add_argument("--config", type=Path, required=True)
    gen.add_argument("--port", type=int, default=10000)
    gen.add_argument("--listen-address", default="0.0.0.0")
    gen.add_argument("--admin-port", type=int, default=9901)
    gen.add_argument("--extproc", default="127.0.0.1:50051", help="host:port or /unix/socket")
    gen.add_argument("-o", "--output", type=Path, default=None)

    check = sub.add_parser("check", help="validate a gateway config")
    check.add_argument("--config", type=Path, required=True)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args.config, args.listen))
        if args.command == "run":
            from extproc.launcher import StackOptions, run_stack

            options = StackOptions(
                config=args.config,
                port=args.port,
                admin_port=args.admin_port,
                extproc_port=args.extproc_port,
            )
            return asyncio.run(run_stack(options))
        if args.command == "envoy-config":
            host, port = _split_host_port(args.extproc)
            settings = EnvoySettings(
                listen_address=args.listen_address,
                listen_port=args.port,
                admin_port=args.admin_port,
                extproc_address=host,
                extproc_port=port,
            )
            text = render(compile_table(load_config(args.config)), settings)
            if args.output:
                args.output.write_text(text, encoding="utf-8")
            else:
                sys.stdout.write(text)
            return 0
        if args.command == "check":
            config = load_config(args.config)
            count = sum(len(g.virtual_models) for g in config.virtual_model_groups)
            print(f"{args.config}: OK ({len(config.providers)} providers, {count} virtual models)")
            return 0
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
