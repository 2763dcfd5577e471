"""scripts/ is outside `make lint`'s paths: lint and format-check it here."""

from __future__ import annotations

import subprocess

import pytest

from tests.deploy.tools import ROOT, require_tool


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_scripts_pass_ruff(command: list[str]) -> None:
    ruff = require_tool("ruff", "ruff")
    result = subprocess.run(
        [ruff, *command, "scripts"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
