"""State that outlives one request: sticky session assignments (memory or Redis).

This module owns where a session's target is remembered. The in-memory store serves one
process; the Redis store shares assignments between replicas and degrades to its in-memory copy,
with a logged warning, whenever Redis does not answer quickly, so that a Redis outage never fails
a request. Health sharing between replicas lives in ``extproc.sync``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

MAX_SESSIONS = 200_000
"""In-memory bound; the least recently used session is forgotten first."""


class StickyStore(Protocol):
    """Remembers which target serves a session."""

    async def get(self, session: str) -> str | None:
        """The session's target, if it has one that has not expired."""
        ...

    async def set(self, session: str, target: str, ttl_s: int) -> None:
        """Stick the session to ``target`` for ``ttl_s`` seconds from now."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryStickyStore:
    """Sessions in a bounded LRU dict with expiry times."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Use ``clock`` for expiry."""
        self.clock = clock
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def get(self, session: str) -> str | None:
        """The live assignment, refreshed as recently used."""
        return self.get_now(session)

    def get_now(self, session: str) -> str | None:
        """Synchronous ``get``."""
        entry = self._sessions.get(session)
        if entry is None:
            return None
        target, expires = entry
        if expires <= self.clock():
            del self._sessions[session]
            return None
        self._sessions.move_to_end(session)
        return target

    async def set(self, session: str, target: str, ttl_s: int) -> None:
        """Assign and (re)start the TTL."""
        self.set_now(session, target, ttl_s)

    def set_now(self, session: str, target: str, ttl_s: int) -> None:
        """Synchronous ``set``."""
        self._sessions[session] = (target, self.clock() + ttl_s)
        self._sessions.move_to_end(session)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)

    async def close(self) -> None:
        """Nothing to release."""


class RedisStickyStore:
    """Sessions in Redis (``SET key target EX ttl``), with an in-memory fallback.

    Every operation has a short timeout. On any Redis error the store logs one warning, serves
    from its local copy, and tries Redis again after ``retry_after_s``.
    """

    def __init__(
        self,
        client: Any,
        key_prefix: str = "vmrouter:",
        *,
        timeout_s: float = 0.1,
        retry_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Wrap a ``redis.asyncio.Redis`` client."""
        self.client = client
        self.prefix = key_prefix + "sticky:"
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.local = MemoryStickyStore(clock)
        self._down_until = 0.0
        self.degraded = False

    def _available(self) -> bool:
        return self.clock() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        if not self.degraded:
            log.warning("redis unavailable (%s): sticky sessions use local state", exc)
        self.degraded = True
        self._down_until = self.clock() + self.retry_after_s

    def _recovered(self) -> None:
        if self.degraded:
            log.warning("redis is back: sticky sessions are shared again")
        self.degraded = False

    async def get(self, session: str) -> str | None:
        """Redis first; the local copy when Redis is down."""
        if self._available():
            try:
                value = await asyncio.wait_for(
                    self.client.get(self.prefix + session), self.timeout_s
                )
            except Exception as exc:
                self._failed(exc)
            else:
                self._recovered()
                if value is None:
                    return None
                return value.decode() if isinstance(value, bytes) else str(value)
        return self.local.get_now(session)

    async def set(self, session: str, target: str, ttl_s: int) -> None:
        """Write through to Redis and the local copy."""
        self.local.set_now(session, target, ttl_s)
        if not self._available():
            return
        try:
            await asyncio.wait_for(
                self.client.set(self.prefix + session, target, ex=ttl_s), self.timeout_s
            )
        except Exception as exc:
            self._failed(exc)
        else:
            self._recovered()

    async def close(self) -> None:
        """Close the Redis connection pool."""
        try:
            await self.client.aclose()
        except Exception:
            log.debug("redis close failed", exc_info=True)
