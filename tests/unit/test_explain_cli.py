"""``python -m extproc explain``: offline output, argument errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.__main__ import main
from extproc.explain_cli import parse_header_args

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
gateway: {metadata: {gateway_region: EU}}
providers:
  - name: eu
    type: openai-compatible
    base_url: http://127.0.0.1:9/v1
    models: [{name: m}]
  - name: us
    type: openai-compatible
    base_url: http://127.0.0.1:9/v1
    models: [{name: m}]
  - name: global
    type: openai-compatible
    base_url: http://127.0.0.1:9/v1
    models: [{name: m}]
virtual_model_groups:
  - name: prod
    virtual_models:
      - name: chat
        routing_config:
          type: priority-based-routing
          sticky_routing:
            ttl_seconds: 60
            session_identifiers: [{key: x-user-id, source: headers}]
          load_balance_targets:
            - {target: eu/m, priority: 0, metadata_match: {gateway_region: EU}}
            - {target: us/m, priority: 0, metadata_match: {gateway_region: US}}
            - {target: global/m, priority: 1, fallback_candidate: false}
"""


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    return path


def test_explain_cli_offline_report(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "explain",
            "--config",
            str(config),
            "--model",
            "prod/chat",
            "--metadata",
            '{"gateway_region": "US"}',
            "--header",
            "x-user-id=alice",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    # The gateway's own region wins over the client's claim.
    assert "metadata:      gateway_region=EU" in out
    assert "us/m: metadata_match gateway_region=US does not match" in out
    assert "global/m: fallback_candidate: false (never a fallback)" in out
    assert "primary:       eu/m" in out
    assert "fallbacks:     (none)" in out
    assert "session headers:x-user-id=alice has no assignment" in out


def test_explain_cli_demo_config(capsys: pytest.CaptureFixture[str]) -> None:
    demo = ROOT / "extproc" / "demo" / "gateway.yaml"
    assert main(["explain", "--config", str(demo), "--model", "prod-chat"]) == 0
    out = capsys.readouterr().out
    assert "alpha/small: weight 90 = 90.0%" in out
    assert "beta/large: weight 10 = 10.0%" in out


def test_explain_cli_errors(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--config", str(config), "--model", "prod/none"]) == 1
    assert "error 404" in capsys.readouterr().err
    assert main(["explain", "--model", "prod/chat"]) == 2
    assert "--config" in capsys.readouterr().err
    assert (
        main(["explain", "--config", str(config), "--model", "prod/chat", "--operation", "x"]) == 2
    )
    assert (
        main(["explain", "--config", str(config), "--model", "prod/chat", "--metadata", "[1]"]) == 1
    )
    assert "JSON object of strings" in capsys.readouterr().err


def test_explain_cli_header_args() -> None:
    assert parse_header_args(["X-User-Id=alice", "k: v"]) == {"x-user-id": "alice", "k": "v"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_header_args(["novalue"])
