"""Sticky routing: session keys, resolve with a sticky target, memory and Redis stores, sync."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from random import Random
from typing import Any

import pytest

from extproc import state
from extproc.health import HealthTracker, Outcome
from extproc.routing.explain import Explanation
from extproc.routing.table import RequestFacts, RoutingTable, StickyPolicy
from extproc.state import MemoryStickyStore, RedisStickyStore
from extproc.sync import HealthSync, decode, encode
from tests.unit.support import FakeClock

CONFIG = """
providers:
  - name: provider-a
    type: openai-compatible
    base_url: http://127.0.0.1:8001/v1
    models: [{name: model-a}]
  - name: provider-b
    type: openai-compatible
    base_url: http://127.0.0.1:8002/v1
    models: [{name: model-b}]
  - name: provider-c
    type: openai-compatible
    base_url: http://127.0.0.1:8003/v1
    models: [{name: model-c}]
virtual_model_groups:
  - name: sticky
    virtual_models:
      - name: seed
        routing_config:
          type: weight-based-routing
          sticky_routing:
            ttl_seconds: 3600
            session_identifiers:
              - key: x-user-id
                source: headers
              - key: x-conversation-id
                source: headers
          load_balance_targets:
            - target: provider-a/model-a
              weight: 70
              fallback_candidate: true
            - target: provider-b/model-b
              weight: 30
              fallback_candidate: true
      - name: meta
        routing_config:
          type: round-robin-routing
          sticky_routing:
            ttl_seconds: 60
            session_identifiers:
              - {key: X-Session, source: headers}
              - {key: session_id, source: metadata}
          load_balance_targets:
            - {target: provider-a/model-a}
            - {target: provider-b/model-b}
            - {target: provider-c/model-c, metadata_match: {region: EU}}
      - name: plain
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {target: provider-a/model-a, priority: 0}
"""

A, B, C = "provider-a/model-a", "provider-b/model-b", "provider-c/model-c"


def policy(table: RoutingTable, name: str) -> StickyPolicy:
    vm = table.lookup(name)
    assert vm is not None
    assert vm.sticky is not None
    return vm.sticky


# --- StickyPolicy.session ----------------------------------------------------------------------


def test_sticky_policy_compiled_from_config(table: RoutingTable) -> None:
    assert policy(table, "sticky/seed") == StickyPolicy(
        ttl_s=3600, identifiers=(("headers", "x-user-id"), ("headers", "x-conversation-id"))
    )
    # header names are lower-cased (Envoy sends them so); metadata keys are kept as written
    assert policy(table, "sticky/meta").identifiers == (
        ("headers", "x-session"),
        ("metadata", "session_id"),
    )
    plain = table.lookup("sticky/plain")
    assert plain is not None
    assert plain.sticky is None


def test_sticky_policy_session_from_headers(table: RoutingTable) -> None:
    sticky = policy(table, "sticky/seed")
    both = sticky.session({"x-user-id": "u1", "x-conversation-id": "c9"}, {})
    assert both == "headers:x-user-id=u1|headers:x-conversation-id=c9"
    only_user = sticky.session({"x-user-id": "u1", "other": "x"}, {})
    assert only_user == "headers:x-user-id=u1|"
    assert only_user != sticky.session({"x-conversation-id": "u1"}, {})
    assert sticky.session({"x-user-id": "u2"}, {}) != only_user


def test_sticky_policy_session_from_metadata(table: RoutingTable) -> None:
    sticky = policy(table, "sticky/meta")
    assert sticky.session({}, {"session_id": "s1"}) == "|metadata:session_id=s1"
    assert sticky.session({"x-session": "h"}, {"session_id": "s1"}) == (
        "headers:x-session=h|metadata:session_id=s1"
    )
    # a metadata identifier is not read from headers, nor a header identifier from metadata
    assert sticky.session({"session_id": "s1"}, {"x-session": "h"}) is None


def test_sticky_policy_session_none_without_identifiers(table: RoutingTable) -> None:
    sticky = policy(table, "sticky/seed")
    assert sticky.session({}, {}) is None
    assert sticky.session({"authorization": "Bearer x"}, {"x-user-id": "u1"}) is None


def test_sticky_policy_session_empty_value_counts_as_present(table: RoutingTable) -> None:
    assert policy(table, "sticky/seed").session({"x-user-id": ""}, {}) == "headers:x-user-id=|"


# --- resolve with a sticky target --------------------------------------------------------------


def test_resolve_sticky_target_goes_first(table: RoutingTable, health: HealthTracker) -> None:
    rng = Random(1)
    facts = RequestFacts(sticky_target=B)  # B has only 30% of the weight
    for _ in range(200):
        decision = table.resolve("sticky/seed", "chat", rng, health, facts)
        assert [t.key for t in decision.plan] == [B, A]
        assert decision.sticky_hit


def test_resolve_without_sticky_target_routes_by_weight(
    table: RoutingTable, health: HealthTracker
) -> None:
    rng = Random(2)
    decisions = [table.resolve("sticky/seed", "chat", rng, health) for _ in range(4_000)]
    assert not any(d.sticky_hit for d in decisions)
    firsts = Counter(d.primary.key for d in decisions)
    assert 0.67 < firsts[A] / 4_000 < 0.73


def test_resolve_sticky_hit_false_when_strategy_picked_it_anyway(
    table: RoutingTable, health: HealthTracker
) -> None:
    decision = table.resolve(
        "sticky/meta", "chat", Random(3), health, RequestFacts(sticky_target=A)
    )
    assert decision.primary.key == A
    assert decision.sticky_hit


def test_resolve_cooling_sticky_target_is_ignored(
    table: RoutingTable, health: HealthTracker, clock: FakeClock
) -> None:
    for _ in range(3):
        health.observe(Outcome(target=B, status=503))
    assert not health.available(B)
    rng = Random(4)
    facts = RequestFacts(sticky_target=B)
    for _ in range(100):
        decision = table.resolve("sticky/seed", "chat", rng, health, facts)
        assert [t.key for t in decision.plan] == [A, B]
        assert not decision.sticky_hit
    explanation = Explanation()
    table.resolve("sticky/seed", "chat", rng, health, facts, explanation)
    assert explanation.sticky == (
        f"session stuck to {B}, which is not eligible now: routing normally"
    )
    clock.now += 60  # cooldown over: sticky again
    decision = table.resolve("sticky/seed", "chat", rng, health, facts)
    assert decision.sticky_hit
    assert decision.primary.key == B


def test_resolve_sticky_target_filtered_by_metadata_is_ignored(
    table: RoutingTable, health: HealthTracker
) -> None:
    facts = RequestFacts(metadata={"region": "US"}, sticky_target=C)
    decision = table.resolve("sticky/meta", "chat", Random(5), health, facts)
    assert C not in [t.key for t in decision.plan]
    assert not decision.sticky_hit
    facts = RequestFacts(metadata={"region": "EU"}, sticky_target=C)
    decision = table.resolve("sticky/meta", "chat", Random(5), health, facts)
    assert decision.primary.key == C
    assert decision.sticky_hit


def test_resolve_unknown_sticky_target_routes_normally(
    table: RoutingTable, health: HealthTracker
) -> None:
    facts = RequestFacts(sticky_target="gone/model")
    decision = table.resolve("sticky/seed", "chat", Random(6), health, facts)
    assert not decision.sticky_hit
    assert sorted(t.key for t in decision.plan) == [A, B]


def test_resolve_explain_sticky_hit(table: RoutingTable, health: HealthTracker) -> None:
    explanation = Explanation()
    facts = RequestFacts(sticky_target=B)
    table.resolve("sticky/seed", "chat", Random(7), health, facts, explanation)
    assert explanation.sticky == f"session stuck to {B}"
    assert explanation.plan == [B, A]
    assert f"sticky:        session stuck to {B}" in explanation.render()
    assert f"sticky=session stuck to {B}" in explanation.compact()


# --- MemoryStickyStore -------------------------------------------------------------------------


def test_memory_sticky_store_get_set(clock: FakeClock) -> None:
    store = MemoryStickyStore(clock)

    async def run() -> None:
        assert await store.get("s1") is None
        await store.set("s1", A, 60)
        assert await store.get("s1") == A
        await store.set("s1", B, 60)
        assert await store.get("s1") == B
        assert await store.get("s2") is None
        await store.close()

    asyncio.run(run())


def test_memory_sticky_store_expiry(clock: FakeClock) -> None:
    store = MemoryStickyStore(clock)
    store.set_now("s1", A, 60)
    clock.now += 59.9
    assert store.get_now("s1") == A
    clock.now += 0.1  # exactly the TTL: expired
    assert store.get_now("s1") is None
    clock.now -= 10  # an expired entry was forgotten, not just hidden
    assert store.get_now("s1") is None


def test_memory_sticky_store_set_restarts_ttl(clock: FakeClock) -> None:
    store = MemoryStickyStore(clock)
    store.set_now("s1", A, 60)
    clock.now += 50
    store.set_now("s1", A, 60)
    clock.now += 50
    assert store.get_now("s1") == A
    clock.now += 10
    assert store.get_now("s1") is None


def test_memory_sticky_store_get_does_not_extend_ttl(clock: FakeClock) -> None:
    store = MemoryStickyStore(clock)
    store.set_now("s1", A, 60)
    clock.now += 30
    assert store.get_now("s1") == A
    clock.now += 30
    assert store.get_now("s1") is None


def test_memory_sticky_store_lru_bound(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "MAX_SESSIONS", 3)
    store = MemoryStickyStore(clock)
    for name in ("s1", "s2", "s3"):
        store.set_now(name, A, 600)
    assert store.get_now("s1") == A  # s1 is now the most recently used
    store.set_now("s4", B, 600)  # evicts s2, the least recently used
    assert store.get_now("s2") is None
    assert [store.get_now(s) for s in ("s1", "s3", "s4")] == [A, A, B]
    store.set_now("s3", C, 600)  # re-setting refreshes recency too
    store.set_now("s5", C, 600)  # evicts s1 (s3, s4 were used after it)
    assert store.get_now("s1") is None
    assert [store.get_now(s) for s in ("s3", "s4", "s5")] == [C, B, C]


# --- RedisStickyStore --------------------------------------------------------------------------


class FakeRedis:
    """The three coroutines RedisStickyStore uses, on a dict; ``down`` makes them raise."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttls: dict[str, int | None] = {}
        self.down = False
        self.calls: list[str] = []
        self.closed = False

    async def get(self, key: str) -> bytes | None:
        self.calls.append(f"get {key}")
        if self.down:
            raise ConnectionError("Connection refused")
        return self.data.get(key)

    async def set(self, key: str, value: str, ex: int | None = None) -> bool:
        self.calls.append(f"set {key}")
        if self.down:
            raise ConnectionError("Connection refused")
        self.data[key] = value.encode()
        self.ttls[key] = ex
        return True

    async def aclose(self) -> None:
        if self.down:
            raise ConnectionError("Connection refused")
        self.closed = True


class HangingRedis(FakeRedis):
    """A Redis that never answers."""

    async def get(self, key: str) -> bytes | None:
        self.calls.append(f"get {key}")
        await asyncio.Event().wait()
        return None


def redis_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "extproc.state" and r.levelno == logging.WARNING
    ]


def test_redis_sticky_store_shares_sessions_through_redis(clock: FakeClock) -> None:
    client = FakeRedis()
    one = RedisStickyStore(client, "gw:", clock=clock)
    two = RedisStickyStore(client, "gw:", clock=clock)

    async def run() -> None:
        await one.set("s1", A, 3600)
        assert client.data == {"gw:sticky:s1": A.encode()}
        assert client.ttls == {"gw:sticky:s1": 3600}
        assert await two.get("s1") == A  # another replica sees it
        assert await two.get("s2") is None

    asyncio.run(run())
    assert not one.degraded
    assert not two.degraded


def test_redis_sticky_store_decodes_str_values(clock: FakeClock) -> None:
    client = FakeRedis()
    store = RedisStickyStore(client, clock=clock)
    client.data["vmrouter:sticky:s1"] = A  # type: ignore[assignment]  # decode_responses=True
    assert asyncio.run(store.get("s1")) == A


def test_redis_sticky_store_outage_falls_back_to_local_copy(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    client = FakeRedis()
    store = RedisStickyStore(client, clock=clock, retry_after_s=2.0)
    caplog.set_level(logging.WARNING, logger="extproc.state")

    async def run() -> None:
        await store.set("s1", A, 3600)
        client.down = True
        assert await store.get("s1") == A  # served from the local copy, no exception
        assert store.degraded
        await store.set("s2", B, 3600)  # written locally while Redis is down
        assert await store.get("s2") == B

    asyncio.run(run())
    [warning] = redis_warnings(caplog)
    assert "redis unavailable" in warning
    assert "Connection refused" in warning


def test_redis_sticky_store_does_not_call_redis_until_retry_after(clock: FakeClock) -> None:
    client = FakeRedis()
    store = RedisStickyStore(client, clock=clock, retry_after_s=2.0)
    client.down = True

    async def run() -> None:
        await store.set("s1", A, 3600)
        assert client.calls == ["set vmrouter:sticky:s1"]
        for _ in range(5):
            assert await store.get("s1") == A
            await store.set("s1", A, 3600)
        assert len(client.calls) == 1  # backed off: Redis is not asked again
        clock.now += 1.9
        await store.get("s1")
        assert len(client.calls) == 1
        clock.now += 0.1
        assert await store.get("s1") == A  # retried, failed again, local copy
        assert client.calls[-1] == "get vmrouter:sticky:s1"
        assert len(client.calls) == 2

    asyncio.run(run())
    assert store.degraded


def test_redis_sticky_store_recovers_after_retry_after(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    client = FakeRedis()
    store = RedisStickyStore(client, clock=clock, retry_after_s=2.0)
    caplog.set_level(logging.WARNING, logger="extproc.state")

    async def run() -> None:
        client.down = True
        await store.set("s1", A, 3600)
        assert store.degraded
        client.down = False
        client.data["vmrouter:sticky:s1"] = B.encode()  # another replica re-stuck it
        assert await store.get("s1") == A  # still backing off: local copy
        clock.now += 2.0
        assert await store.get("s1") == B  # Redis is asked again, and answers
        assert not store.degraded

    asyncio.run(run())
    assert redis_warnings(caplog) == [
        "redis unavailable (Connection refused): sticky sessions use local state",
        "redis is back: sticky sessions are shared again",
    ]


def test_redis_sticky_store_warns_once_per_outage(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    client = FakeRedis()
    store = RedisStickyStore(client, clock=clock, retry_after_s=1.0)
    caplog.set_level(logging.WARNING, logger="extproc.state")
    client.down = True

    async def run() -> None:
        for _ in range(10):
            await store.set("s1", A, 60)
            await store.get("s1")
            clock.now += 1.0

    asyncio.run(run())
    assert len(client.calls) >= 10  # it kept retrying...
    assert len(redis_warnings(caplog)) == 1  # ...and said so once


def test_redis_sticky_store_timeout_degrades(clock: FakeClock) -> None:
    client = HangingRedis()
    store = RedisStickyStore(client, clock=clock, timeout_s=0)
    store.local.set_now("s1", A, 60)
    assert asyncio.run(store.get("s1")) == A
    assert store.degraded


def test_redis_sticky_store_close(clock: FakeClock) -> None:
    client = FakeRedis()
    asyncio.run(RedisStickyStore(client, clock=clock).close())
    assert client.closed
    broken = FakeRedis()
    broken.down = True
    asyncio.run(RedisStickyStore(broken, clock=clock).close())  # errors are swallowed
    assert not broken.closed


# --- sync encode / decode ----------------------------------------------------------------------


def test_sync_encode_decode_round_trip() -> None:
    outcome = Outcome(
        target=A,
        status=200,
        ttfb_s=0.25,
        duration_s=1.5,
        output_tokens=120,
        tpot_s=0.0104,
        retry_after_s=None,
        input_tokens=33,
    )
    fields = encode(outcome, "replica-1")
    assert fields == {
        "replica": "replica-1",
        "target": A,
        "status": "200",
        "ttfb_s": "0.25",
        "duration_s": "1.5",
        "output_tokens": "120",
        "tpot_s": "0.0104",
        "input_tokens": "33",
    }
    assert decode(fields) == ("replica-1", outcome)


def test_sync_encode_decode_minimal_outcome() -> None:
    outcome = Outcome(target=B, status=None)
    fields = encode(outcome, "r")
    assert fields == {"replica": "r", "target": B}
    assert decode(fields) == ("r", outcome)
    limited = Outcome(target=B, status=429, retry_after_s=30.0)
    assert decode(encode(limited, "r")) == ("r", limited)


def test_sync_decode_bytes_from_redis() -> None:
    raw: dict[Any, Any] = {
        b"replica": b"r2",
        b"target": A.encode(),
        b"status": b"503",
        b"ttfb_s": b"0.1",
    }
    assert decode(raw) == ("r2", Outcome(target=A, status=503, ttfb_s=0.1))
    decoded = decode(raw)
    assert decoded is not None
    assert isinstance(decoded[1].status, int)


@pytest.mark.parametrize(
    "fields",
    [
        {"target": A, "status": "200"},
        {"replica": "r", "status": "200"},
        {"replica": "r", "target": A, "status": "OK"},
        {"replica": "r", "target": A, "tpot_s": ""},
        {"replica": "r", "target": A, "status": "nan"},
        {"replica": "r", "target": A, "status": "inf"},
        {"replica": "r", "target": A, "output_tokens": "1e999"},
        {},
    ],
    ids=[
        "no-replica",
        "no-target",
        "text-status",
        "empty-number",
        "nan-status",
        "infinite-status",
        "infinite-tokens",
        "empty",
    ],
)
def test_sync_decode_malformed_entry_is_none(fields: dict[str, str]) -> None:
    assert decode(fields) is None


def test_sync_decode_ignores_unknown_fields() -> None:
    fields = {"replica": "r", "target": A, "status": "200", "extra": "x"}
    assert decode(fields) == ("r", Outcome(target=A, status=200))


class FakeStreamRedis:
    """xinfo_stream/xread for HealthSync's reader: one batch of entries, then cancellation."""

    def __init__(self, entries: list[tuple[bytes, dict[str, str]]]) -> None:
        self.entries = entries
        self.reads = 0

    async def xinfo_stream(self, stream: str) -> dict[str, bytes]:
        return {"last-generated-id": b"0-0"}

    async def xread(self, streams: dict[str, str], count: int, block: int) -> Any:
        self.reads += 1
        if self.reads > 1:
            raise asyncio.CancelledError  # ends the reader loop for the test
        return [(b"vmrouter:outcomes", self.entries)]


def test_health_sync_reader_applies_remote_outcomes_including_no_response(
    clock: FakeClock,
) -> None:
    # A timeout or connection failure elsewhere (status None) must reach this replica's health
    # like any other outcome, and must not stop the reader.
    health = HealthTracker(clock=clock)
    entries = [
        (b"1-0", encode(Outcome(target=A, status=None, duration_s=2.0), "other")),
        (b"2-0", encode(Outcome(target=A, status=503), "other")),
        (b"3-0", encode(Outcome(target=B, status=503), "self")),
        (b"4-0", {"replica": "other"}),  # malformed: skipped
        (b"5-0", encode(Outcome(target=A, status=502), "other")),
    ]
    sync = HealthSync(FakeStreamRedis(entries), lambda: health, replica="self")

    async def run() -> None:
        with pytest.raises(asyncio.CancelledError):
            await sync._reader()

    asyncio.run(run())
    assert sync.applied == 3
    assert health.failures(A) == 3  # three consecutive failures: A is cooling
    assert not health.available(A)
    assert health.failures(B) == 0  # its own outcomes are not applied twice
