"""The generated Envoy bootstrap: shape, TLS, drift of checked-in files, Envoy validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from extproc.__main__ import main as cli
from extproc.config import load_config
from extproc.envoy_config import (
    GATEWAY_HEADERS,
    METADATA_NS,
    EnvoySettings,
    bootstrap,
    cds_document,
    clusters_version,
    provider_clusters,
    render,
    render_cds,
    write_atomic,
)
from extproc.routing.table import compile_table
from tests.integration.stack import validate_with_envoy
from tests.unit.support import table_from_yaml

ROOT = Path(__file__).resolve().parents[2]

TLS_CONFIG = """
gateway: {first_byte_timeout_ms: 45000}
providers:
  - name: openai
    type: openai
    base_url: https://api.openai.com/v1
    models: [{name: gpt-4o}]
  - name: local.vllm
    type: openai-compatible
    base_url: http://vllm.default.svc.cluster.local:8000/v1
    models: [{name: llama}]
"""


def _validate(text: str, tmp_path: Path) -> None:
    validate_with_envoy(text, tmp_path)


def test_envoy_config_https_provider_gets_tls_with_sni() -> None:
    table = table_from_yaml(TLS_CONFIG)
    config = bootstrap(table, EnvoySettings())
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    openai = clusters["provider_openai"]
    tls = openai["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.openai.com"
    assert openai["type"] == "LOGICAL_DNS"
    endpoint = openai["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "api.openai.com", "port_value": 443}
    local = clusters["provider_local.vllm"]
    assert "transport_socket" not in local
    route = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["route"]["retry_policy"]["per_try_idle_timeout"] == "45s"


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return dict(hcm["typed_config"])


def _ext_proc(filters: list[dict[str, Any]]) -> dict[str, Any]:
    [ext_proc] = [f for f in filters if f["name"] == "envoy.filters.http.ext_proc"]
    return dict(ext_proc["typed_config"])


def test_envoy_config_router_filter_sees_requests_and_upstream_filter_responses() -> None:
    config = bootstrap(table_from_yaml(TLS_CONFIG), EnvoySettings())
    router = _ext_proc(_hcm(config)["http_filters"])
    assert router["processing_mode"] == {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    assert "allow_mode_override" not in router
    cluster = config["static_resources"]["clusters"][0]
    options = cluster["typed_extension_protocol_options"]
    upstream = _ext_proc(
        options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    )
    assert upstream["processing_mode"]["response_header_mode"] == "SEND"
    assert upstream["processing_mode"]["response_body_mode"] == "NONE"
    # The response_headers reply picks the body mode; sending the body without waiting for that
    # reply would silently disable every mode_override.
    assert upstream["allow_mode_override"] is True
    assert "send_body_without_waiting_for_header_response" not in upstream
    # Only the headers the upstream phases read travel to the ext_proc; the router-level filter
    # gets them all (metadata, sticky identifiers, per-attempt restores need the client's).
    forwarded = upstream["forward_rules"]["allowed_headers"]["patterns"]
    assert forwarded == [
        {"exact": ":status"},
        {"exact": "retry-after"},
        {"exact": "x-envoy-attempt-count"},
    ]
    assert "forward_rules" not in router


def test_envoy_config_route_renders_the_gateway_headers_from_metadata() -> None:
    config = bootstrap(table_from_yaml(TLS_CONFIG), EnvoySettings())
    route = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"][0]
    added = {h["header"]["key"]: h for h in route["response_headers_to_add"]}
    assert list(added) == list(GATEWAY_HEADERS)
    for name, option in added.items():
        assert option["header"]["value"] == f"%DYNAMIC_METADATA({METADATA_NS}:{name})%"
        assert option["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    assert route["response_headers_to_remove"] == ["x-vm-retry"]


def test_envoy_config_envoy_local_replies_are_openai_errors() -> None:
    config = bootstrap(table_from_yaml(TLS_CONFIG), EnvoySettings())
    [mapper] = _hcm(config)["local_reply_config"]["mappers"]
    assert {"UH", "UF", "URX", "UT"} <= set(mapper["filter"]["response_flag_filter"]["flags"])
    error = mapper["body_format_override"]["json_format"]["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "%RESPONSE_CODE%"
    assert error["message"].startswith(f"%DYNAMIC_METADATA({METADATA_NS}:x-gateway-target)%")
    # Envoy 1.40 crashes when an upstream-level ext_proc stream passes its gRPC watermark.
    [layer] = config["layered_runtime"]["layers"]
    assert layer["static_layer"] == {
        "envoy.reloadable_features.grpc_side_stream_flow_control": False
    }


def test_envoy_config_https_provider_validates(tmp_path: Path) -> None:
    table = table_from_yaml(TLS_CONFIG)
    _validate(render(table, EnvoySettings()), tmp_path)


def test_envoy_config_unix_socket_extproc_validates(tmp_path: Path) -> None:
    table = table_from_yaml(TLS_CONFIG)
    text = render(table, EnvoySettings(extproc_address="/tmp/vmrouter.sock"))
    assert yaml.safe_load(text)["static_resources"]["clusters"][-1]["load_assignment"]["endpoints"][
        0
    ]["lb_endpoints"][0]["endpoint"]["address"] == {"pipe": {"path": "/tmp/vmrouter.sock"}}
    _validate(text, tmp_path)


def test_envoy_config_checked_in_demo_is_current_and_valid(tmp_path: Path) -> None:
    checked_in = (ROOT / "envoy" / "demo.yaml").read_text()
    table = compile_table(load_config(ROOT / "extproc" / "demo" / "gateway.yaml"), environ={})
    fresh = render(table, EnvoySettings(listen_address="127.0.0.1"))
    assert checked_in == fresh, "envoy/demo.yaml is stale: run `make envoy-config`"
    _validate(checked_in, tmp_path)


def test_envoy_config_every_checked_in_envoy_yaml_validates(tmp_path: Path) -> None:
    files = sorted((ROOT / "envoy").glob("*.yaml"))
    assert files
    for path in files:
        _validate(path.read_text(), tmp_path)


def test_generated_protos_are_current(tmp_path: Path) -> None:
    from grpc_tools import protoc

    code = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "protos" / "extproc" / "_gen" / "ext_proc.proto"),
        ]
    )
    assert code == 0
    for name in ("ext_proc_pb2.py", "ext_proc_pb2.pyi", "ext_proc_pb2_grpc.py"):
        fresh = (tmp_path / "extproc" / "_gen" / name).read_text()
        committed = (ROOT / "extproc" / "_gen" / name).read_text()
        assert fresh == committed, f"extproc/_gen/{name} is stale: run `make protos`"


def test_envoy_config_xds_dir_moves_provider_clusters_to_file_cds(tmp_path: Path) -> None:
    table = table_from_yaml(TLS_CONFIG)
    xds = tmp_path / "xds"
    config = bootstrap(table, EnvoySettings(xds_dir=str(xds)))
    static = [c["name"] for c in config["static_resources"]["clusters"]]
    assert static == ["vmrouter_unrouted", "vmrouter_extproc"]
    assert config["node"] == {"id": "vmrouter", "cluster": "vmrouter"}
    source = config["dynamic_resources"]["cds_config"]["path_config_source"]
    assert source == {"path": str(xds / "cds.yaml"), "watched_directory": {"path": str(xds)}}
    document = cds_document(provider_clusters(table, EnvoySettings()))
    assert [r["name"] for r in document["resources"]] == ["provider_local.vllm", "provider_openai"]
    assert document["version_info"] == clusters_version(provider_clusters(table, EnvoySettings()))


def test_envoy_config_dynamic_bootstrap_and_its_clusters_validate(tmp_path: Path) -> None:
    table = table_from_yaml(TLS_CONFIG)
    xds = tmp_path / "xds"
    xds.mkdir()
    settings = EnvoySettings(xds_dir=str(xds))
    write_atomic(xds / "cds.yaml", render_cds(provider_clusters(table, settings)))
    _validate(render(table, settings), tmp_path)
    # Validate mode does not load CDS files, so check the clusters as static ones too.
    inlined = bootstrap(table, settings)
    del inlined["dynamic_resources"]
    resources = yaml.safe_load((xds / "cds.yaml").read_text())["resources"]
    inlined["static_resources"]["clusters"] += [
        {k: v for k, v in r.items() if k != "@type"} for r in resources
    ]
    _validate(yaml.safe_dump(inlined), tmp_path)


def test_envoy_config_cli_writes_bootstrap_and_initial_cds(tmp_path: Path) -> None:
    xds = tmp_path / "shared"
    out = tmp_path / "envoy.yaml"
    code = cli(
        [
            "envoy-config",
            "--config",
            str(ROOT / "extproc" / "demo" / "gateway.yaml"),
            "--xds-dir",
            str(xds),
            "--write-cds",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    written = yaml.safe_load((xds / "cds.yaml").read_text())
    assert {r["name"] for r in written["resources"]} == {"provider_alpha", "provider_beta"}
    dynamic = yaml.safe_load(out.read_text())["dynamic_resources"]
    assert dynamic["cds_config"]["path_config_source"]["path"] == str(xds / "cds.yaml")
    _validate(out.read_text(), tmp_path)
