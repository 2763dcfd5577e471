"""The config reloader and the CDS publisher, on temporary directories (no Envoy, no sleeps).

Each test drives ``ConfigReloader.check()`` (one poll) directly; the one test of the polling loop
uses a 10 ms interval.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from extproc.cds import ClusterChange, ClusterPublisher
from extproc.envoy_config import CLUSTER_TYPE_URL, EnvoySettings
from extproc.errors import ConfigError
from extproc.processor import RouterStream, Runtime
from extproc.reload import ConfigReloader, ReloadResult, load_config_file
from extproc.routing.table import RoutingTable
from tests.integration.stack import ConfigMapDir
from tests.unit.support import body_message, client_headers, headers_message

CONFIG = """
providers:
  - name: a
    type: openai-compatible
    base_url: http://127.0.0.1:18001/v1
    models: [{{name: m1}}]
  - name: b
    type: openai-compatible
    base_url: http://127.0.0.1:18002/v1
    models: [{{name: m1}}]
{extra_provider}
virtual_model_groups:
  - name: prod
    virtual_models:
      - name: chat
        routing_config:
          type: weight-based-routing
          load_balance_targets:
            - {{target: a/m1, weight: {wa}}}
            - {{target: b/m1, weight: {wb}}}
"""
PROVIDER_C = """  - name: c
    type: openai-compatible
    base_url: http://127.0.0.1:18003/v1
    models: [{name: m1}]"""


def config(wa: int = 90, wb: int = 10, *, with_c: bool = False) -> str:
    return CONFIG.format(wa=wa, wb=wb, extra_provider=PROVIDER_C if with_c else "")


def weights(table: RoutingTable) -> dict[str, int]:
    vm = table.lookup("prod/chat")
    assert vm is not None
    return {t.key: t.weight for t in vm.targets}


def make(path: Path, **kwargs: Any) -> tuple[Runtime, ConfigReloader]:
    loaded = load_config_file(path, environ={})
    runtime = Runtime(loaded.table)
    kwargs.setdefault("settle", 0)
    reloader = ConfigReloader(path, runtime, loaded=loaded, environ={}, **kwargs)
    return runtime, reloader


def check(reloader: ConfigReloader) -> bool | None:
    return asyncio.run(reloader.check())


def test_reload_configmap_symlink_swap_serves_new_table(tmp_path: Path) -> None:
    volume = ConfigMapDir(tmp_path / "config")
    volume.publish(config(90, 10))
    runtime, reloader = make(volume.path)
    old = runtime.table
    first_real = os.path.realpath(volume.path)
    assert check(reloader) is None  # nothing new yet
    assert reloader.reload_success_total == 0

    volume.publish(config(20, 80))  # the kubelet's ..data swap; the old version dir is gone
    assert os.path.realpath(volume.path) != first_real and not os.path.exists(first_real)
    assert check(reloader) is True
    assert runtime.table is not old
    assert weights(runtime.table) == {"a/m1": 20, "b/m1": 80}
    assert weights(old) == {"a/m1": 90, "b/m1": 10}  # in-flight decisions keep the old objects
    assert reloader.stats() == {
        "reload_success_total": 1,
        "reload_failure_total": 0,
        "last_reload_ok": True,
        "last_problems": [],
        "last_reload_unix": reloader.last_reload_unix,
        "config_digest": reloader.digest,
    }
    assert check(reloader) is None  # served: not applied again


def test_reload_same_content_under_a_new_name_is_not_a_reload(tmp_path: Path) -> None:
    volume = ConfigMapDir(tmp_path / "config")
    volume.publish(config())
    runtime, reloader = make(volume.path)
    table = runtime.table
    volume.publish(config())  # new realpath, same bytes
    assert check(reloader) is None
    assert runtime.table is table and reloader.reload_success_total == 0


def test_reload_in_place_edit_with_same_size_and_mtime_is_caught_by_the_hash(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config(90, 10))
    runtime, reloader = make(path, verify_every=3)
    assert check(reloader) is None  # poll 1 records the file's identity
    st = os.stat(path)
    path.write_text(config(80, 20))  # same size, written in place (same inode)...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the same mtime
    assert os.stat(path).st_size == st.st_size
    assert check(reloader) is None  # poll 2: looks unchanged, not hashed
    assert check(reloader) is True  # poll 3: the periodic hash sees the change
    assert weights(runtime.table) == {"a/m1": 80, "b/m1": 20}


def test_reload_invalid_config_keeps_old_table_and_logs_every_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume = ConfigMapDir(tmp_path / "config")
    volume.publish(config(90, 10))
    results: list[ReloadResult] = []
    runtime, reloader = make(volume.path, on_reload=results.append)
    good = runtime.table
    bad = config(90, 10).replace("target: b/m1, weight: 10", "target: b/zz, weight: 5")
    volume.publish(bad)
    with caplog.at_level(logging.ERROR, logger="extproc.reload"):
        assert check(reloader) is False
    assert runtime.table is good
    assert reloader.reload_failure_total == 1 and reloader.reload_success_total == 0
    assert reloader.last_reload_ok is False
    assert len(reloader.last_problems) == 2
    assert any("unknown model 'b/zz'" in p for p in reloader.last_problems)
    assert any("sum to 95, expected 100" in p for p in reloader.last_problems)
    (record,) = caplog.records
    assert "config reload rejected (2 problems)" in record.getMessage()
    assert all(p in record.getMessage() for p in reloader.last_problems)
    assert [r.ok for r in results] == [False]

    assert check(reloader) is None  # the same bad file is not counted again
    assert reloader.reload_failure_total == 1

    volume.publish(config(50, 50))
    assert check(reloader) is True
    assert weights(runtime.table) == {"a/m1": 50, "b/m1": 50}
    assert reloader.last_reload_ok is True and reloader.last_problems == ()
    assert [r.ok for r in results] == [False, True]


def test_reload_reverting_a_bad_edit_clears_the_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config())
    _, reloader = make(path)
    path.write_text("providers: [")
    assert check(reloader) is False
    assert "not valid YAML" in reloader.last_problems[0]
    path.write_text(config())
    assert check(reloader) is None  # what is served already
    assert reloader.last_reload_ok is True
    assert (reloader.reload_success_total, reloader.reload_failure_total) == (0, 1)


def test_reload_missing_file_keeps_serving_and_counts_once(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config())
    runtime, reloader = make(path)
    table = runtime.table
    path.unlink()
    assert check(reloader) is False
    assert check(reloader) is None
    assert reloader.reload_failure_total == 1
    assert "cannot read config file" in reloader.last_problems[0]
    assert runtime.table is table
    path.write_text(config(10, 90))
    assert check(reloader) is True
    assert weights(runtime.table) == {"a/m1": 10, "b/m1": 90}


def test_reload_trigger_reapplies_even_an_unchanged_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config())
    runtime, reloader = make(path)
    table = runtime.table
    reloader.trigger()
    assert check(reloader) is True
    assert runtime.table is not table
    assert check(reloader) is None


def test_load_config_file_reports_unreadable_and_invalid(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config_file(bad)


def test_reload_run_loop_picks_up_a_change(tmp_path: Path) -> None:
    volume = ConfigMapDir(tmp_path / "config")
    volume.publish(config())
    runtime, reloader = make(volume.path, interval=0.01)

    async def scenario() -> None:
        task = reloader.start()
        try:
            volume.publish(config(30, 70))
            for _ in range(500):  # at most ~5 s
                if reloader.reload_success_total:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert reloader.reload_success_total == 1
    assert weights(runtime.table) == {"a/m1": 30, "b/m1": 70}


# --- with Envoy's clusters (file-based CDS) ------------------------------------------------------


def cds_clusters(xds: Path) -> dict[str, dict[str, Any]]:
    document = yaml.safe_load((xds / "cds.yaml").read_text())
    assert all(r["@type"] == CLUSTER_TYPE_URL for r in document["resources"])
    return {r["name"]: r for r in document["resources"]}


class RecordingPublisher(ClusterPublisher):
    """Notes which table the runtime served while Envoy was being waited for."""

    def __init__(self, xds: Path, runtime: list[Runtime]) -> None:
        super().__init__(xds, settle_seconds=0)
        self.runtime = runtime
        self.served_while_waiting: list[RoutingTable] = []

    async def wait_for_envoy(self, change: ClusterChange) -> bool:
        self.served_while_waiting.append(self.runtime[0].table)
        return True


def test_reload_new_provider_reaches_the_cds_file_before_the_swap(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config())
    xds = tmp_path / "xds"
    holder: list[Runtime] = []
    publisher = RecordingPublisher(xds, holder)
    runtime, reloader = make(path, publisher=publisher)
    holder.append(runtime)
    first = publisher.write(runtime.table)
    assert first.written and first.added == ("provider_a", "provider_b")
    old = runtime.table
    assert set(cds_clusters(xds)) == {"provider_a", "provider_b"}

    path.write_text(config(with_c=True))
    assert check(reloader) is True
    assert publisher.served_while_waiting == [old]  # Envoy first, then the table
    assert set(cds_clusters(xds)) == {"provider_a", "provider_b", "provider_c"}
    assert "provider_c" in {p.cluster for p in runtime.table.providers.values()}

    # A weight change needs no new cluster: the file stays as it is and nobody waits.
    before = (xds / "cds.yaml").read_text()
    path.write_text(config(10, 90, with_c=True))
    assert check(reloader) is True
    assert publisher.served_while_waiting == [old]
    assert (xds / "cds.yaml").read_text() == before


def test_reload_removed_provider_lingers_while_a_request_in_flight_uses_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config(0, 100, with_c=True).replace("b/m1", "c/m1"))
    xds = tmp_path / "xds"
    publisher = ClusterPublisher(xds, settle_seconds=0)
    runtime, reloader = make(path, publisher=publisher)
    publisher.write(runtime.table)
    assert set(cds_clusters(xds)) == {"provider_a", "provider_b", "provider_c"}

    async def scenario() -> None:
        router = await open_request(runtime, "prod/chat")  # in flight, planned on c
        path.write_text(config(0, 100))  # c is gone from the config
        assert await reloader.check() is True
        assert publisher.lingering == ("provider_c",)
        assert "provider_c" in cds_clusters(xds)  # a retry of the request can still go there
        assert await reloader.check() is None
        assert "provider_c" in cds_clusters(xds)

        router.close()  # the request ends
        assert await reloader.check() is None
        assert publisher.lingering == ()
        assert set(cds_clusters(xds)) == {"provider_a", "provider_b"}

    asyncio.run(scenario())


def test_reload_unwritable_cds_dir_rejects_and_keeps_serving(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config())
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    runtime, reloader = make(path, publisher=ClusterPublisher(blocker / "xds", settle_seconds=0))
    table = runtime.table
    path.write_text(config(with_c=True))
    assert check(reloader) is False
    assert runtime.table is table
    assert "cannot write Envoy clusters" in reloader.last_problems[0]


def test_publisher_skips_rewriting_an_identical_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config())
    table = load_config_file(path, environ={}).table
    xds = tmp_path / "xds"
    assert ClusterPublisher(xds).write(table).written
    inode = os.stat(xds / "cds.yaml").st_ino
    # e.g. the ext_proc starting after an initContainer wrote the same clusters
    assert not ClusterPublisher(xds).write(table).written
    assert os.stat(xds / "cds.yaml").st_ino == inode
    assert [p.name for p in xds.iterdir()] == ["cds.yaml"]  # no temporary files left


def test_publisher_waits_for_envoy_admin_to_report_the_new_version(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config(with_c=True))
    table = load_config_file(path, environ={}).table
    dumps: list[dict[str, Any]] = []

    async def config_dump(request: web.Request) -> web.Response:
        assert request.query["resource"] == "dynamic_active_clusters"
        return web.json_response(dumps.pop(0) if len(dumps) > 1 else dumps[0])

    async def scenario() -> tuple[bool, bool, int]:
        app = web.Application()
        app.router.add_get("/config_dump", config_dump)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            publisher = ClusterPublisher(
                tmp_path / "xds",
                EnvoySettings(),
                envoy_admin=f"127.0.0.1:{port}",
                confirm_timeout=2,
            )
            change = publisher.write(table)
            stale = {"configs": [{"version_info": "old", "cluster": {"name": "provider_a"}}]}
            fresh = {
                "configs": [
                    {"version_info": change.version, "cluster": {"name": n}} for n in change.added
                ]
            }
            dumps.extend([stale, stale, fresh])
            confirmed = await publisher.wait_for_envoy(change)
            polls_left = len(dumps)
            publisher.confirm_timeout = 0.2
            dumps[:] = [stale]
            timed_out = await publisher.wait_for_envoy(change)
            return confirmed, timed_out, polls_left
        finally:
            await runner.cleanup()

    confirmed, timed_out, polls_left = asyncio.run(scenario())
    assert confirmed is True and polls_left == 1
    assert timed_out is False


# --- helpers -------------------------------------------------------------------------------------


async def open_request(runtime: Runtime, model: str) -> RouterStream:
    """A request whose router stream has resolved and planned, and is still open."""
    router = RouterStream(runtime)
    headers = headers_message("request_headers", client_headers(authority=None))
    message = body_message("request_body", json.dumps({"model": model, "messages": []}).encode())
    for step in (headers, message):
        reply = router.handle(step)
        if inspect.isawaitable(reply):
            await reply
    assert runtime.requests, "the request was not planned"
    return router


def test_reload_results_are_counted_in_the_reloads_metric(tmp_path: Path) -> None:
    from extproc.server import count_reloads
    from extproc.telemetry import Telemetry

    volume = ConfigMapDir(tmp_path / "config")
    volume.publish(config(90, 10))
    runtime, _ = make(volume.path)
    runtime.telemetry = Telemetry()
    reloader = ConfigReloader(volume.path, runtime, on_reload=count_reloads(runtime))
    bad = config(90, 10).replace("target: b/m1, weight: 10", "target: b/zz, weight: 10")
    volume.publish(bad)
    assert check(reloader) is False
    volume.publish(config(50, 50))
    assert check(reloader) is True
    lines = runtime.telemetry.render_prometheus().decode().splitlines()
    for result in ("failure", "success"):
        (line,) = [
            x
            for x in lines
            if x.startswith("vmrouter_config_reloads_total{") and f'vmrouter_result="{result}"' in x
        ]
        assert line.endswith(" 1.0")
