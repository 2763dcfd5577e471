"""Hot reload of the gateway config: watch the file, validate, compile, swap.

This module owns *when* and *whether* a changed config is served. ``ConfigReloader`` polls the
config file (default every second): it resolves the path again each time, so a Kubernetes ConfigMap
volume, which updates by atomically re-pointing a ``..data`` symlink, is followed like a file that
was edited or renamed over. A change is detected through (real path, inode, mtime, size) and
confirmed by a content hash, which is also re-checked every few polls. A changed file is parsed,
validated and compiled into a new ``RoutingTable``; when the ext_proc manages Envoy's clusters
(``extproc.cds``), new provider clusters are handed to Envoy *before* the table is swapped, so no
request is routed to a cluster Envoy lacks. The swap is ``Runtime.swap``: requests in flight keep
the decision they already hold. A config that fails validation is rejected with one logged line
per problem, and the last good config keeps serving. Counters for telemetry live on the reloader.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.cds import ClusterChange, ClusterPublisher
from extproc.config import parse_config
from extproc.errors import ConfigError
from extproc.memory import release_memory
from extproc.processor import Runtime
from extproc.routing.table import RoutingTable, compile_table

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A config file's compiled table and the hash of the exact bytes it came from."""

    table: RoutingTable
    digest: str


def digest_of(data: bytes) -> str:
    """The content hash used to tell config versions apart."""
    return hashlib.sha256(data).hexdigest()


def load_config_file(path: str | Path, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read, validate and compile a config file; ``ConfigError`` lists every problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc.strerror or exc}"]) from exc
    loaded = LoadedConfig(_compile(data, environ), digest_of(data))
    release_memory()
    return loaded


def _compile(data: bytes, environ: Mapping[str, str] | None) -> RoutingTable:
    """Parse, validate and compile; only the table outlives the call (see extproc.memory)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"the config file is not UTF-8 text: {exc}"]) from None
    return compile_table(parse_config(text), environ=environ)


def in_use_clusters(runtime: Runtime) -> set[str]:
    """Clusters that requests in flight may still send an attempt to."""
    return {
        target.model.provider.cluster
        for context in list(runtime.requests.values())
        for target in context.decision.plan.members()  # no need to draw the plans' order
    }


@dataclass(frozen=True, slots=True)
class _FileKey:
    realpath: str
    inode: int
    mtime_ns: int
    size: int


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of one reload attempt, as passed to ``on_reload`` listeners."""

    ok: bool
    digest: str | None
    problems: tuple[str, ...] = ()
    clusters: ClusterChange | None = None


class ConfigReloader:
    """Watches one config file and swaps the runtime's routing table when it changes.

    Counters (read them directly; they only grow): ``reload_success_total``,
    ``reload_failure_total``; ``last_reload_ok`` is False while the file on disk is one that was
    rejected (the previous good config still serving), with ``last_problems`` saying why.
    """

    def __init__(
        self,
        path: str | Path,
        runtime: Runtime,
        *,
        loaded: LoadedConfig | None = None,
        publisher: ClusterPublisher | None = None,
        interval: float = 1.0,
        settle: float = 0.05,
        verify_every: int = 10,
        environ: Mapping[str, str] | None = None,
        on_reload: Callable[[ReloadResult], None] | None = None,
    ) -> None:
        """Watch ``path`` for ``runtime``.

        Args:
            path: The config file as configured (a symlink is resolved on every poll).
            runtime: Whose table is swapped.
            loaded: What the runtime serves now (its digest avoids a pointless first reload).
            publisher: Writes Envoy's provider clusters; None when they are static.
            interval: Seconds between polls; 0 polls only when ``trigger`` is called.
            settle: After seeing a change, wait this long and skip the round if the file is still
                changing (an editor writing in place); 0 disables.
            verify_every: Hash the content every this many polls even if the file looks unchanged.
            environ: Where provider API keys are read from (default: the process environment).
            on_reload: Called with every result, e.g. to feed telemetry.
        """
        self.path = Path(path)
        self.runtime = runtime
        self.publisher = publisher
        self.interval = interval
        self.settle = settle
        self.verify_every = max(1, verify_every)
        self.environ = environ
        self.on_reload = on_reload
        self.reload_success_total = 0
        self.reload_failure_total = 0
        self.last_reload_ok = True
        self.last_problems: tuple[str, ...] = ()
        self.last_reload_unix: float | None = None
        """Wall-clock time of the last reload attempt, successful or not."""
        self.digest = loaded.digest if loaded else None
        """Hash of the config being served."""
        self._rejected: str | None = None
        self._unreadable: str | None = None
        self._key: _FileKey | None = None
        self._polls = 0
        self._force = False
        self._wake = asyncio.Event()

    def stats(self) -> dict[str, Any]:
        """The counters and state as one plain mapping (for logs, tests and telemetry)."""
        return {
            "reload_success_total": self.reload_success_total,
            "reload_failure_total": self.reload_failure_total,
            "last_reload_ok": self.last_reload_ok,
            "last_problems": list(self.last_problems),
            "last_reload_unix": self.last_reload_unix,
            "config_digest": self.digest,
        }

    def trigger(self) -> None:
        """Re-read and re-apply the file now, even if it looks unchanged (e.g. on SIGHUP)."""
        self._force = True
        self._wake.set()

    async def run(self) -> None:
        """Poll until cancelled; a failing poll is logged and never ends the watch."""
        if self.interval > 0:
            log.info("watching %s for config changes every %gs", self.path, self.interval)
        else:
            log.info("config %s is reloaded on SIGHUP only", self.path)
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("config watch: unexpected error; still serving the current config")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval or None)
            self._wake.clear()

    def start(self) -> asyncio.Task[None]:
        """Run the watch as a task on the current loop."""
        return asyncio.get_running_loop().create_task(self.run(), name="config-reloader")

    async def check(self) -> bool | None:
        """One poll: None if nothing new, True if a new config is served, False if rejected."""
        force, self._force = self._force, False
        self._polls += 1
        if self.publisher is not None and self.publisher.lingering:
            self.publisher.prune(in_use_clusters(self.runtime))
        try:
            key = self._stat()
            if not force and key == self._key and self._polls % self.verify_every:
                return None
            data = Path(key.realpath).read_bytes()
            if self.settle > 0 and key != self._key:
                await asyncio.sleep(self.settle)
                if self._stat() != key:
                    return None  # still being written: look again next poll
        except OSError as exc:
            problem = f"cannot read config file {self.path}: {exc.strerror or exc}"
            if problem == self._unreadable and not force:
                return None
            self._unreadable = problem
            self._key = None
            return self._reject((problem,), None)
        self._unreadable = None
        self._key = key
        digest = digest_of(data)
        if not force and digest in (self.digest, self._rejected):
            if digest == self.digest and not self.last_reload_ok:
                # Back to the config being served (e.g. a bad edit was reverted).
                self.last_reload_ok, self.last_problems, self._rejected = True, (), None
            return None
        return await self._apply(data, digest)

    def _stat(self) -> _FileKey:
        real = os.path.realpath(self.path)
        st = os.stat(real)
        return _FileKey(real, st.st_ino, st.st_mtime_ns, st.st_size)

    async def _apply(self, data: bytes, digest: str) -> bool:
        try:
            table = _compile(data, self.environ)
        except ConfigError as exc:
            return self._reject(tuple(exc.problems), digest)
        except Exception as exc:
            log.exception("config reload: compiling %s failed", self.path)
            return self._reject((f"cannot compile the config: {exc}",), digest)
        old = self.runtime.table
        change: ClusterChange | None = None
        if self.publisher is not None:
            try:
                change = await self.publisher.publish(table)
            except OSError as exc:
                where = self.publisher.path
                return self._reject((f"cannot write Envoy clusters to {where}: {exc}",), digest)
        else:
            _warn_static_clusters(old, table)
        self.runtime.swap(table)
        old_timeout = old.first_byte_timeout_ms
        del old  # the previous table goes as soon as no request in flight holds it
        release_memory()  # hand what the load (and maybe the old table) freed back to the kernel
        if self.publisher is not None and self.publisher.lingering:
            self.publisher.prune(in_use_clusters(self.runtime))
        if table.first_byte_timeout_ms != old_timeout:
            log.warning(
                "gateway.first_byte_timeout_ms changed (%d -> %d ms): it is part of Envoy's route, "
                "which is static; regenerate the bootstrap and restart Envoy to apply it",
                old_timeout,
                table.first_byte_timeout_ms,
            )
        log.info(
            "config reloaded from %s (%s): %d virtual models, %d providers%s",
            self.path,
            digest[:12],
            len(table.virtual_models),
            len(table.providers),
            _describe(change),
        )
        self.digest = digest
        self._rejected = None
        self.last_reload_ok = True
        self.last_problems = ()
        self.last_reload_unix = time.time()
        self.reload_success_total += 1
        self._notify(ReloadResult(True, digest, (), change))
        return True

    def _reject(self, problems: tuple[str, ...], digest: str | None) -> bool:
        log.error(
            "config reload rejected (%d problem%s); still serving the last good config (%s):\n  %s",
            len(problems),
            "" if len(problems) == 1 else "s",
            (self.digest or "none")[:12],
            "\n  ".join(problems),
        )
        self._rejected = digest
        self.last_reload_ok = False
        self.last_problems = problems
        self.last_reload_unix = time.time()
        self.reload_failure_total += 1
        self._notify(ReloadResult(False, digest, problems))
        return False

    def _notify(self, result: ReloadResult) -> None:
        if self.on_reload is not None:
            try:
                self.on_reload(result)
            except Exception:
                log.exception("config reload listener failed")


def _describe(change: ClusterChange | None) -> str:
    if change is None:
        return ""
    parts = [
        f"{label} {', '.join(names)}"
        for label, names in (
            ("added", change.added),
            ("changed", change.changed),
            ("retiring", change.removed),
        )
        if names
    ]
    return f"; Envoy clusters {'; '.join(parts)}" if parts else ""


def _warn_static_clusters(old: RoutingTable, new: RoutingTable) -> None:
    def shape(table: RoutingTable) -> dict[str, tuple[str, int, bool]]:
        return {p.cluster: (p.host, p.port, p.tls) for p in table.providers.values()}

    before, after = shape(old), shape(new)
    moved = sorted(name for name, value in after.items() if before.get(name) != value)
    if moved:
        log.warning(
            "providers changed (%s) but Envoy's clusters are static in its bootstrap: requests to "
            "them fail until Envoy restarts with a regenerated bootstrap (run the ext_proc with "
            "--xds-dir to update Envoy's clusters live)",
            ", ".join(moved),
        )
