"""File-based CDS: handing provider clusters to a running Envoy without restarting it.

This module owns the CDS document (``<xds_dir>/cds.yaml``) while the ext_proc runs: it writes the
provider clusters of the served routing table (atomically: a temporary file renamed into place, the
move Envoy's ``watched_directory`` reacts to), keeps a removed provider's cluster while in-flight
requests may still retry on it, and, given Envoy's admin address, waits until Envoy has activated
new or changed clusters so the ext_proc never routes to a cluster Envoy does not have yet. What a
cluster looks like lives in ``envoy_config``; when a reload happens lives in ``reload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from extproc.envoy_config import (
    EnvoySettings,
    cds_path,
    clusters_version,
    provider_clusters,
    render_cds,
    write_atomic,
)
from extproc.routing.table import RoutingTable

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class ClusterChange:
    """What one publication changed, by cluster name."""

    version: str
    """The CDS document's ``version_info`` after the publication."""
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    """Clusters the new table no longer has; they linger in the file while requests need them."""
    written: bool = False
    """Whether the file was rewritten (false when its content was already current)."""

    @property
    def needs_envoy(self) -> bool:
        """Whether requests on the new table need clusters Envoy may not have loaded yet."""
        return bool(self.added or self.changed)


class ClusterPublisher:
    """Writes the provider clusters of the served table to Envoy's file-based CDS document."""

    def __init__(
        self,
        xds_dir: str | Path,
        settings: EnvoySettings | None = None,
        *,
        envoy_admin: str | None = None,
        confirm_timeout: float = 10.0,
        settle_seconds: float = 1.0,
    ) -> None:
        """Publish into ``xds_dir``.

        Args:
            xds_dir: The directory Envoy's bootstrap watches (created if missing).
            settings: Envoy settings the clusters are rendered with (CA bundle).
            envoy_admin: ``host:port`` of Envoy's admin API. With it, a publication that adds or
                changes clusters waits until Envoy reports them active (at most
                ``confirm_timeout`` seconds); without it, it waits ``settle_seconds``.
            confirm_timeout: Bound of the wait for Envoy's confirmation.
            settle_seconds: Fixed wait after adding clusters when there is no admin address.
        """
        self.directory = Path(xds_dir)
        self.path = Path(cds_path(self.directory))
        self.settings = settings or EnvoySettings(xds_dir=str(self.directory))
        self.envoy_admin = envoy_admin
        self.confirm_timeout = confirm_timeout
        self.settle_seconds = settle_seconds
        self.version = ""
        self._current: dict[str, dict[str, Any]] = {}
        self._lingering: dict[str, dict[str, Any]] = {}

    @property
    def lingering(self) -> tuple[str, ...]:
        """Removed clusters still in the file because an in-flight request may use them."""
        return tuple(sorted(self._lingering))

    def write(self, table: RoutingTable) -> ClusterChange:
        """Put ``table``'s provider clusters in the file (plus lingering removed ones)."""
        fresh = {c["name"]: c for c in provider_clusters(table, self.settings)}
        added = tuple(sorted(n for n in fresh if n not in self._current))
        changed = tuple(
            sorted(n for n, c in fresh.items() if n in self._current and self._current[n] != c)
        )
        removed = tuple(sorted(n for n in self._current if n not in fresh))
        for name in removed:
            self._lingering[name] = self._current[name]
        for name in fresh:
            self._lingering.pop(name, None)
        self._current = fresh
        written = self._flush()
        return ClusterChange(self.version, added, changed, removed, written)

    def prune(self, in_use: Set[str]) -> tuple[str, ...]:
        """Drop lingering clusters no in-flight request uses; return the dropped names."""
        dropped = tuple(sorted(n for n in self._lingering if n not in in_use))
        if dropped:
            for name in dropped:
                del self._lingering[name]
            self._flush()
            log.info("removed Envoy clusters no longer in use: %s", ", ".join(dropped))
        return dropped

    async def publish(self, table: RoutingTable) -> ClusterChange:
        """Write ``table``'s clusters and, if it adds or changes any, wait until Envoy has them."""
        change = self.write(table)
        if change.needs_envoy:
            await self.wait_for_envoy(change)
        return change

    async def wait_for_envoy(self, change: ClusterChange) -> bool:
        """Wait until Envoy serves ``change``'s new and changed clusters; False if it did not."""
        names = set(change.added + change.changed)
        if self.envoy_admin is None:
            await asyncio.sleep(self.settle_seconds)
            return True
        url = f"http://{self.envoy_admin}/config_dump?resource=dynamic_active_clusters"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.confirm_timeout
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while loop.time() < deadline:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            active = _active_versions(json.loads(await response.text()))
                            if all(active.get(n) == change.version for n in names):
                                return True
                await asyncio.sleep(_POLL_SECONDS)
        log.error(
            "Envoy at %s did not activate clusters %s (version %s) within %.0fs; "
            "requests routed to them fail until it does (see Envoy's log for a rejected update)",
            self.envoy_admin,
            ", ".join(sorted(names)),
            change.version,
            self.confirm_timeout,
        )
        return False

    def _flush(self) -> bool:
        clusters = [
            (self._current | self._lingering)[name]
            for name in sorted(self._current.keys() | self._lingering.keys())
        ]
        self.version = clusters_version(clusters)
        text = render_cds(clusters)
        with contextlib.suppress(OSError):
            if self.path.read_text(encoding="utf-8") == text:
                return False
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, text)
        return True


def _active_versions(dump: Any) -> dict[str, str]:
    """Map cluster name to ``version_info`` from an admin ``dynamic_active_clusters`` dump."""
    versions: dict[str, str] = {}
    for entry in dump.get("configs", []) if isinstance(dump, dict) else []:
        cluster = entry.get("cluster", {})
        name = cluster.get("name")
        if isinstance(name, str):
            versions[name] = str(entry.get("version_info", ""))
    return versions
