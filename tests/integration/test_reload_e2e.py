"""Hot reload through a real Envoy: weights under load, a new provider, an invalid config.

The config lives in a ConfigMap-style directory (``..data`` symlink swaps) and the ext_proc's
watch polls it every 0.1 s; Envoy's provider clusters come from the file-based CDS document the
ext_proc rewrites. Envoy is never restarted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from tests.integration.stack import Stack, fake_provider, fake_providers, require_envoy, wait_until

pytestmark = pytest.mark.envoy

MESSAGES = [{"role": "user", "content": "hello there"}]

PROVIDERS = fake_providers("a", "b")
PROVIDER_D = fake_provider("d")
LIVE = """
virtual_model_groups:
  - name: test
    virtual_models:
      - name: live
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - {{target: a/m1, weight: {weight_a}}}
            - {{target: b/m1, weight: {weight_b}}}
"""
NEWCOMER = """
      - name: newcomer
        routing_config:
          type: priority-based-routing
          load_balance_targets:
            - {{target: d/m1, priority: 0}}
"""


def config(weight_a: int = 100, weight_b: int = 0, *, with_d: bool = False) -> str:
    """A config template (ports still to fill in) with the given split for test/live."""
    live = LIVE.replace("{weight_a}", str(weight_a)).replace("{weight_b}", str(weight_b))
    if with_d:
        return PROVIDERS + PROVIDER_D + live + NEWCOMER
    return PROVIDERS + live


@pytest.fixture(scope="module")
def rs() -> Iterator[Stack]:
    require_envoy()
    with Stack(config(), ["a", "b"], reload_interval=0.1) as s:
        yield s


@pytest.fixture()
def client(rs: Stack) -> Iterator[openai.OpenAI]:
    rs.reset()
    with openai.OpenAI(base_url=rs.base_url, api_key="k", max_retries=0, timeout=30) as c:
        yield c


def apply(rs: Stack, template: str) -> None:
    """Publish a config and wait until the ext_proc serves it."""
    assert rs.reloader is not None
    if template.format(**rs.ports) == rs.config_text:
        return
    before = rs.reloader.reload_success_total
    rs.write_config(template)
    wait_until(lambda: rs.reloader.reload_success_total > before, 10, "the reload")  # type: ignore[union-attr]


def target_of(client: openai.OpenAI, model: str) -> str:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    return raw.headers["x-gateway-target"]


def test_reload_weights_change_under_load_with_zero_failures(
    rs: Stack, client: openai.OpenAI
) -> None:
    apply(rs, config(100, 0))
    assert rs.reloader is not None
    results: list[tuple[float, float, str]] = []  # (started, ended, target or error)
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        with openai.OpenAI(base_url=rs.base_url, api_key="k", max_retries=0, timeout=10) as c:
            for _ in range(400):  # bounded; normally stopped far earlier
                if stop.is_set():
                    return
                started = time.monotonic()
                try:
                    outcome = target_of(c, "test/live")
                except Exception as exc:  # every failure is recorded and fails the test below
                    outcome = f"error: {exc!r}"
                with lock:
                    results.append((started, time.monotonic(), outcome))

    def count(pred: object) -> int:
        with lock:
            return sum(1 for r in results if pred(r))  # type: ignore[operator]

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: count(lambda r: True) >= 100, 30, "100 requests before the change")
        written = time.monotonic()
        before = rs.reloader.reload_success_total
        rs.write_config(config(20, 80))
        wait_until(lambda: rs.reloader.reload_success_total > before, 10, "the reload")  # type: ignore[union-attr]
        swapped = time.monotonic()
        wait_until(
            lambda: count(lambda r: r[0] > swapped) >= 250, 30, "250 requests after the change"
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    errors = [r for r in results if r[2].startswith("error")]
    assert errors == [], errors[:3]
    early = [r[2] for r in results if r[1] < written]
    late = [r[2] for r in results if r[0] > swapped]
    assert early and set(early) == {"a/m1"}
    share_b = late.count("b/m1") / len(late)
    assert 0.65 <= share_b <= 0.93, (len(late), share_b)
    assert set(late) == {"a/m1", "b/m1"}


def test_reload_new_provider_routes_without_envoy_restart(rs: Stack, client: openai.OpenAI) -> None:
    apply(rs, config())
    assert rs.envoy is not None
    pid = rs.envoy.pid
    if "port_d" not in rs.ports:
        rs.add_upstream("d")
    with pytest.raises(openai.NotFoundError):
        target_of(client, "test/newcomer")

    apply(rs, config(with_d=True))
    raw = client.chat.completions.with_raw_response.create(model="test/newcomer", messages=MESSAGES)
    assert raw.headers["x-gateway-target"] == "d/m1"
    assert raw.headers["x-gateway-served-model"] == "d-model-1"
    assert [r["json"]["model"] for r in rs.received("d")] == ["d-model-1"]
    assert rs.envoy.pid == pid and rs.envoy.poll() is None
    active = rs.admin_json("/config_dump?resource=dynamic_active_clusters")["configs"]
    assert "provider_d" in {c["cluster"]["name"] for c in active}
    assert target_of(client, "test/live") == "a/m1"  # the rest is untouched

    # Removing the provider again takes its cluster out of Envoy once no request needs it.
    apply(rs, config())
    with pytest.raises(openai.NotFoundError):
        target_of(client, "test/newcomer")

    def names() -> set[str]:
        dump = rs.admin_json("/config_dump?resource=dynamic_active_clusters")
        return {c["cluster"]["name"] for c in dump["configs"]}

    wait_until(lambda: "provider_d" not in names(), 5, "provider_d to leave Envoy")
    assert names() == {"provider_a", "provider_b"}
    assert rs.envoy.pid == pid and rs.envoy.poll() is None


def test_reload_invalid_config_is_rejected_and_old_one_keeps_serving(
    rs: Stack, client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    apply(rs, config(0, 100))
    reloader = rs.reloader
    assert reloader is not None
    failures, successes = reloader.reload_failure_total, reloader.reload_success_total
    cds_before = (rs.workdir / "xds" / "cds.yaml").read_text()
    bad = config(0, 100).replace("target: b/m1, weight: 100", "target: b/nope, weight: 90")
    with caplog.at_level(logging.ERROR, logger="extproc.reload"):
        rs.write_config(bad)
        wait_until(lambda: reloader.reload_failure_total > failures, 10, "the rejection")
    assert reloader.last_reload_ok is False
    assert reloader.reload_success_total == successes
    problems = "\n".join(reloader.last_problems)
    assert "unknown model 'b/nope'" in problems
    assert "weights of" in problems and "sum to 90, expected 100" in problems
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "config reload rejected (2 problems)" in logged
    for problem in reloader.last_problems:
        assert problem in logged
    # The last good config keeps serving, and Envoy's clusters were not touched.
    assert [target_of(client, "test/live") for _ in range(5)] == ["b/m1"] * 5
    assert (rs.workdir / "xds" / "cds.yaml").read_text() == cds_before
    # The rejected file is not retried on every poll...
    time.sleep(0.35)
    assert reloader.reload_failure_total == failures + 1
    # ...and a fixed config is taken up.
    apply(rs, config(100, 0))
    assert reloader.last_reload_ok is True and reloader.last_problems == ()
    assert target_of(client, "test/live") == "a/m1"
