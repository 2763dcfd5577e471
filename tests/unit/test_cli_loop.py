"""Which event loop ``serve`` and ``run`` use: uvloop by default, asyncio if asked or for grpcio."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

import extproc.__main__ as cli
from extproc.launcher import DEMO_CONFIG


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_run_helper_runs_on_the_loop_asked_for() -> None:
    assert cli._run(_loop_module(), "uvloop").startswith("uvloop")
    assert cli._run(_loop_module(), "asyncio").startswith("asyncio")


@pytest.mark.parametrize(
    ("args", "loop"),
    [
        (["serve", "--config", str(DEMO_CONFIG)], "uvloop"),
        (["serve", "--config", str(DEMO_CONFIG), "--loop", "asyncio"], "asyncio"),
        # grpc.aio keeps its own event-loop integration: always Python's loop.
        (["serve", "--config", str(DEMO_CONFIG), "--transport", "grpcio"], "asyncio"),
        (["run"], "uvloop"),
        (["run", "--loop", "asyncio"], "asyncio"),
    ],
)
def test_commands_pick_their_event_loop(
    monkeypatch: pytest.MonkeyPatch, args: list[str], loop: str
) -> None:
    chosen: list[str] = []

    def fake_run(main: Coroutine[Any, Any, int], name: str) -> int:
        main.close()  # never started: nothing listens
        chosen.append(name)
        return 0

    monkeypatch.setattr(cli, "_run", fake_run)
    assert cli.main(args) == 0
    assert chosen == [loop]
