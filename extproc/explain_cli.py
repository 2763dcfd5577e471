"""``python -m extproc explain``: the decision a request would get, and why.

This module owns the explain entry points: offline from a config file (no health samples: what a
fresh gateway would do), or live from a running ext_proc's metrics listener (``/explain``), which
answers with the process's real health, cooldowns and sticky sessions. Both build the request
facts the same way the servicer does and let ``RoutingTable.resolve`` fill an ``Explanation``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from random import Random

from extproc.config import load_config
from extproc.errors import GatewayError
from extproc.request import parse_metadata_header
from extproc.routing.explain import Explanation
from extproc.routing.model import Operation
from extproc.routing.strategy import NO_HEALTH, HealthView
from extproc.routing.table import RequestFacts, RoutingTable, compile_table
from extproc.state import StickyStore

OPERATIONS: Mapping[str, Operation] = {
    "chat": "chat",
    "completion": "completion",
    "completions": "completion",
    "embedding": "embedding",
    "embeddings": "embedding",
}


def parse_header_args(values: Sequence[str]) -> dict[str, str]:
    """``k=v`` (or ``k: v``) arguments as lower-cased header names to values."""
    headers: dict[str, str] = {}
    for item in values:
        sep = "=" if "=" in item else ":"
        name, _, value = item.partition(sep)
        if not name.strip() or not _:
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


async def explain(
    table: RoutingTable,
    model: str,
    *,
    operation: Operation = "chat",
    metadata_json: str | None = None,
    headers: Mapping[str, str] | None = None,
    message: str = "",
    health: HealthView = NO_HEALTH,
    sticky: StickyStore | None = None,
    rng: Random | None = None,
) -> Explanation:
    """Resolve like a live request would and return the filled explanation."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    metadata = parse_metadata_header(metadata_json)
    metadata.update(table.gateway_metadata)
    vm = table.lookup(model)
    sticky_target = None
    explanation = Explanation()
    if vm is not None and vm.sticky is not None:
        identity = vm.sticky.session(headers, metadata)
        if identity is None:
            explanation.notes.append("sticky routing: no session identifier in the request")
        else:
            session = f"{vm.name}|{identity}"
            sticky_target = await sticky.get(session) if sticky is not None else None
            if sticky_target is None:
                explanation.notes.append(f"sticky routing: session {identity} has no assignment")
    facts = RequestFacts(metadata=metadata, text=message, sticky_target=sticky_target)
    table.resolve(model, operation, rng or Random(), health, facts, explanation)
    return explanation


def run(
    config: Path | None,
    model: str,
    *,
    live: str | None,
    operation: str,
    metadata_json: str | None,
    header_args: Sequence[str],
    message: str,
) -> tuple[int, str]:
    """The CLI: (exit code, text to print)."""
    op = OPERATIONS.get(operation)
    if op is None:
        return 2, f"unknown operation {operation!r}; use chat, completion or embedding"
    try:
        headers = parse_header_args(header_args)
    except ValueError as exc:
        return 2, str(exc)
    if live:
        query = urllib.parse.urlencode(
            {
                "model": model,
                "operation": op,
                "metadata": metadata_json or "",
                "message": message,
                "headers": json.dumps(headers),
            }
        )
        url = live.rstrip("/") + "/explain?" + query
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return 0, response.read().decode()
        except urllib.error.HTTPError as exc:
            return 1, exc.read().decode(errors="replace")
        except OSError as exc:
            return 1, f"cannot reach {live}: {exc}"
    if config is None:
        return 2, "give --config (offline) or --live URL (a running ext_proc's metrics listener)"
    table = compile_table(load_config(config))
    try:
        explanation = asyncio.run(
            explain(
                table,
                model,
                operation=op,
                metadata_json=metadata_json,
                headers=headers,
                message=message,
            )
        )
    except GatewayError as exc:
        return 1, f"error {exc.http_status}: {exc.message}"
    header = "offline explanation (no health samples, no sticky sessions)\n"
    return 0, header + explanation.render()
