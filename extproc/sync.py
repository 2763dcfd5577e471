"""Sharing health between replicas: attempt outcomes through one Redis stream.

This module owns replication of the health model. Every replica appends the outcomes it observes
to a Redis stream and folds the outcomes of the other replicas into its own ``HealthTracker``,
so cooldowns, latency windows and SLA state converge across replicas while each request is still
decided from local memory (the hot path never waits for Redis). When Redis is unreachable each
replica keeps working on its own observations and logs a warning; it resumes sharing when Redis
comes back (outcomes from the outage are not replayed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from extproc.health import HealthTracker, Outcome

log = logging.getLogger(__name__)

STREAM_MAXLEN = 100_000
_INT_FIELDS = ("status", "output_tokens", "input_tokens")
_FIELDS = (*_INT_FIELDS, "ttfb_s", "duration_s", "tpot_s", "retry_after_s")


def encode(outcome: Outcome, replica: str) -> dict[str, str]:
    """Stream entry fields for an outcome (absent values are omitted)."""
    fields = {"replica": replica, "target": outcome.target}
    for name in _FIELDS:
        value = getattr(outcome, name)
        if value is not None:
            fields[name] = repr(value)
    return fields


def decode(fields: dict[Any, Any]) -> tuple[str, Outcome] | None:
    """(replica, outcome) from a stream entry, or None if it is malformed."""
    text = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in fields.items()
    }
    try:
        values: dict[str, Any] = {"status": None}
        for name in _FIELDS:
            if name in text:
                raw = float(text[name])
                values[name] = int(raw) if name in _INT_FIELDS else raw
        return text["replica"], Outcome(target=text["target"], **values)
    except (KeyError, ValueError, OverflowError):
        return None


class HealthSync:
    """Publishes local outcomes and applies remote ones."""

    def __init__(
        self,
        client: Any,
        health: Callable[[], HealthTracker],
        key_prefix: str = "vmrouter:",
        *,
        replica: str | None = None,
        retry_s: float = 1.0,
    ) -> None:
        """Share through ``client`` (a ``redis.asyncio.Redis``) into ``health()``."""
        self.client = client
        self.health = health
        self.stream = key_prefix + "outcomes"
        self.replica = replica or f"{os.uname().nodename}-{os.getpid()}-{os.urandom(3).hex()}"
        self.retry_s = retry_s
        self._queue: asyncio.Queue[Outcome] = asyncio.Queue(maxsize=10_000)
        self._tasks: list[asyncio.Task[None]] = []
        self.degraded = False
        self.applied = 0

    def publish(self, outcome: Outcome) -> None:
        """Queue a local outcome for the other replicas (dropped if the queue is full)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(outcome)

    def start(self) -> None:
        """Start the writer and reader tasks on the running loop."""
        self._tasks = [
            asyncio.create_task(self._writer(), name="vmrouter-sync-writer"),
            asyncio.create_task(self._reader(), name="vmrouter-sync-reader"),
        ]

    async def stop(self) -> None:
        """Stop both tasks."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    def _down(self, exc: BaseException) -> None:
        if not self.degraded:
            log.warning("redis unavailable (%s): health is not shared until it is back", exc)
        self.degraded = True

    def _up(self) -> None:
        if self.degraded:
            log.warning("redis is back: health is shared again")
        self.degraded = False

    async def _writer(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 500:
                batch.append(self._queue.get_nowait())
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for outcome in batch:
                        pipe.xadd(
                            self.stream,
                            encode(outcome, self.replica),
                            maxlen=STREAM_MAXLEN,
                            approximate=True,
                        )
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._down(exc)
                await asyncio.sleep(self.retry_s)
            else:
                self._up()

    async def _reader(self) -> None:
        last = "$"
        while True:
            try:
                if last == "$":
                    info = await self.client.xinfo_stream(self.stream)
                    last = _text(info.get("last-generated-id", b"0-0")) if info else "0-0"
                replies = await self.client.xread({self.stream: last}, count=1000, block=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if "no such key" in str(exc).lower():
                    last = "0-0"
                else:
                    self._down(exc)
                    last = "$"
                await asyncio.sleep(self.retry_s if self.degraded else 0.05)
                continue
            self._up()
            for _, entries in replies or ():
                for entry_id, fields in entries:
                    last = _text(entry_id)
                    decoded = decode(fields)
                    if decoded is None or decoded[0] == self.replica:
                        continue
                    try:
                        self.health().observe(decoded[1], share=False)
                    except Exception:  # one bad entry must not stop sharing
                        log.warning("ignored a malformed shared outcome", exc_info=True)
                        continue
                    self.applied += 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
