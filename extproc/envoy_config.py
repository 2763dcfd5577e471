"""Generate the Envoy bootstrap that pairs with a gateway config.

This module owns the Envoy side of the contract: one cluster per provider (TLS with SNI for https
base URLs), the router-level ext_proc filter, the upstream-level ext_proc filter inside every
provider cluster, the priority-group cluster specifier that lets the ext_proc choose a cluster per
attempt, and the retry policy that lets the ext_proc decide whether an attempt is retried. The
header and metadata names it writes are the ones ``extproc.processor`` reads; both import them from
here so they cannot drift. Users never hand-write clusters: ``python -m extproc envoy-config``.

Provider clusters either sit in the bootstrap (static) or, with ``EnvoySettings.xds_dir``, in a
file-based CDS document (``<xds_dir>/cds.yaml``) that the bootstrap points Envoy at; the ext_proc
rewrites that file when the gateway config changes (``extproc.cds``), so new providers need no
Envoy restart. The listener, route, ext_proc cluster and unrouted cluster are always static.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.request import EXPLAIN_HEADER
from extproc.routing.model import Provider
from extproc.routing.table import RoutingTable

FILTER_ROLE_HEADER = "x-vm-filter"
"""gRPC initial metadata that tells the ext_proc which filter opened a stream."""
ROLE_ROUTER = "router"
ROLE_UPSTREAM = "upstream"
UPSTREAM_FORWARDED_HEADERS = (":status", "retry-after", "x-envoy-attempt-count")
"""The only headers the upstream-level filter sends the ext_proc (see ``processor``)."""

REQUEST_NS = "io.vmrouter.request"
"""Dynamic metadata namespace holding ``request_id``: written by the router-level stream and
forwarded to every upstream-level stream of the same request, which finds its context with it.
(A header would reach the providers: Envoy keeps header changes from one attempt to the next.)"""
RETRY_HEADER = "x-vm-retry"
"""Added by the upstream-level stream to an attempt's response when the plan wants one more."""
INTERNAL_HEADER_PREFIX = "x-vm-"
"""Every internal header starts with this; client-sent ones are removed before routing."""

METADATA_NS = "io.vmrouter"
"""Dynamic metadata namespace for values Envoy filters read: the rewritten content length, and the
gateway response headers (keyed by header name), which the route renders into every response."""
PRIORITY_GROUP_NS = "io.vmrouter.pg"
"""Dynamic metadata namespace the priority-group cluster specifier reads the attempt order from."""

HEADER_VIRTUAL_MODEL = "x-gateway-virtual-model"
HEADER_TARGET = "x-gateway-target"
HEADER_SERVED_MODEL = "x-gateway-served-model"
HEADER_ATTEMPTS = "x-gateway-attempts"
GATEWAY_HEADERS = (
    HEADER_VIRTUAL_MODEL,
    HEADER_TARGET,
    HEADER_SERVED_MODEL,
    HEADER_ATTEMPTS,
    EXPLAIN_HEADER,
)
"""Response headers the client gets. The ext_proc writes their values into ``METADATA_NS`` (one
key per header name) and the route adds them to the response, Envoy's own local replies included:
those never pass through an ext_proc filter. A header whose key is missing is left out."""

UNROUTED_CLUSTER = "vmrouter_unrouted"
"""A cluster with no endpoints: the route's default when the ext_proc chose nothing."""
EXTPROC_CLUSTER = "vmrouter_extproc"

CDS_FILE = "cds.yaml"
"""File name of the CDS document inside the xDS directory."""
DEFAULT_XDS_DIR = "/var/run/vmrouter"
"""Where deployments share the CDS document between the ext_proc and Envoy (an emptyDir in k8s)."""
NODE_ID = "vmrouter"
"""Envoy's node id and cluster: required by any xDS subscription, file-based ones included."""
CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

MAX_ATTEMPTS = 10
"""Upper bound of attempts per client request; the ext_proc lowers it per request."""
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True, slots=True)
class EnvoySettings:
    """Where Envoy listens and how it reaches the ext_proc."""

    listen_address: str = "0.0.0.0"
    listen_port: int = 10000
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    extproc_address: str = "127.0.0.1"
    """IP address of the ext_proc gRPC server, or a path starting with '/' for a Unix socket."""
    extproc_port: int = 50051
    body_limit_bytes: int = 32 * 1024 * 1024
    """Largest request body the router buffers; larger requests get 413."""
    ca_bundle: str = SYSTEM_CA_BUNDLE
    xds_dir: str | None = None
    """Directory of the file-based CDS document: provider clusters are dynamic (read by Envoy from
    ``<xds_dir>/cds.yaml``, watched for atomic renames) when set, static in the bootstrap if not."""


def _address(host: str, port: int) -> dict[str, Any]:
    if host.startswith("/"):
        return {"pipe": {"path": host}}
    return {"socket_address": {"address": host, "port_value": port}}


def _ext_proc(role: str, settings: EnvoySettings) -> dict[str, Any]:
    router = role == ROLE_ROUTER
    config: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {
            "envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
            "initial_metadata": [{"key": FILTER_ROLE_HEADER, "value": role}],
        },
        "failure_mode_allow": False,
        # The router-level filter sees the client's request only (headers, then the whole body);
        # every response phase belongs to the upstream-level filter, which sees each attempt's
        # response headers and asks for the answering attempt's body when it needs it.
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED" if router else "NONE",
            "response_header_mode": "SKIP" if router else "SEND",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        # The upstream stream may hold an attempt for a configured retry delay (<= 60 s).
        "message_timeout": "10s" if router else "65s",
        "metadata_options": {
            "receiving_namespaces": {"untyped": [METADATA_NS, PRIORITY_GROUP_NS, REQUEST_NS]},
            **({} if router else {"forwarding_namespaces": {"untyped": [REQUEST_NS]}}),
        },
    }
    if router:
        # Lets the ext_proc set x-envoy-max-retries and the per-try timeout per request.
        config["mutation_rules"] = {"allow_envoy": True}
    else:
        config["mutation_rules"] = {"allow_all_routing": True}
        # The response_headers reply picks the response body mode (mode_override).
        config["allow_mode_override"] = True
        # Of an attempt's headers the upstream phases read only these: Envoy need not copy the
        # rest into every message (nor the ext_proc decode them).
        config["forward_rules"] = {
            "allowed_headers": {
                "patterns": [{"exact": name} for name in UPSTREAM_FORWARDED_HEADERS]
            }
        }
    return {"name": "envoy.filters.http.ext_proc", "typed_config": config}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def provider_cluster(provider: Provider, settings: EnvoySettings) -> dict[str, Any]:
    """One Envoy cluster for a provider, with the upstream-level ext_proc in its filter chain."""
    cluster: dict[str, Any] = {
        "name": provider.cluster,
        "type": "STATIC" if _is_ip(provider.host) else "LOGICAL_DNS",
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": provider.cluster,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _address(provider.host, provider.port)}}
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                ".HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": [
                    _ext_proc(ROLE_UPSTREAM, settings),
                    {
                        # A body replaced at request-headers time goes out chunked; restore the
                        # length the ext_proc computed for this attempt.
                        "name": "envoy.filters.http.header_mutation",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http"
                            ".header_mutation.v3.HeaderMutation",
                            "mutations": {
                                "request_mutations": [
                                    {
                                        "append": {
                                            "header": {
                                                "key": "content-length",
                                                "value": f"%DYNAMIC_METADATA({METADATA_NS}"
                                                ":content_length)%",
                                            },
                                            "append_action": "ADD_IF_ABSENT",
                                        }
                                    }
                                ]
                            },
                        },
                    },
                    {
                        "name": "envoy.filters.http.upstream_codec",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http"
                            ".upstream_codec.v3.UpstreamCodec"
                        },
                    },
                ],
            }
        },
    }
    if provider.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                ".UpstreamTlsContext",
                "sni": provider.host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": settings.ca_bundle},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": provider.host}}
                        ],
                    }
                },
            },
        }
    return cluster


def provider_clusters(table: RoutingTable, settings: EnvoySettings) -> list[dict[str, Any]]:
    """Every provider's cluster, sorted by provider name (stable output for diffs and hashes)."""
    return [
        provider_cluster(p, settings)
        for p in sorted(table.providers.values(), key=lambda p: p.name)
    ]


def cds_path(xds_dir: str | Path) -> str:
    """The CDS document's path inside an xDS directory."""
    return os.path.join(str(xds_dir), CDS_FILE)


def clusters_version(clusters: list[dict[str, Any]]) -> str:
    """A content hash of a cluster list: the CDS document's ``version_info``."""
    canonical = json.dumps(clusters, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def cds_document(clusters: list[dict[str, Any]]) -> dict[str, Any]:
    """A CDS DiscoveryResponse (as a dict) holding ``clusters``, versioned by their content.

    File-based CDS is state of the world: a cluster missing from the document is removed.
    """
    return {
        "version_info": clusters_version(clusters),
        "resources": [{"@type": CLUSTER_TYPE_URL, **cluster} for cluster in clusters],
    }


def render_cds(clusters: list[dict[str, Any]]) -> str:
    """The CDS document for ``clusters`` as YAML text."""
    header = "# Written by the vmrouter ext_proc from the gateway config; do not edit.\n"
    return header + yaml.safe_dump(cds_document(clusters), sort_keys=False)


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` by renaming a finished temporary file of the same directory.

    Readers (Envoy's file watch included) see the old file or the new one, never a partial one.
    The file is world-readable: Envoy may run as another user sharing the directory.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _route() -> dict[str, Any]:
    return {
        "name": "vmrouter",
        "match": {"prefix": "/"},
        "response_headers_to_add": [
            {
                "header": {"key": name, "value": f"%DYNAMIC_METADATA({METADATA_NS}:{name})%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
            for name in GATEWAY_HEADERS
        ],
        "response_headers_to_remove": [RETRY_HEADER],
        "route": {
            "timeout": "0s",
            "retry_policy": {
                "retry_on": "retriable-headers,connect-failure,reset,refused-stream",
                "num_retries": MAX_ATTEMPTS - 1,
                "retriable_headers": [{"name": RETRY_HEADER, "string_match": {"exact": "1"}}],
                "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"},
                "refresh_cluster_on_retry": True,
            },
            "inline_cluster_specifier_plugin": {
                "extension": {
                    "name": "envoy.router.cluster_specifier_plugin.priority_group",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers"
                        ".priority_group.v3.PriorityGroupClusterSpecifier",
                        "priority_groups": [
                            {
                                "name": "unrouted",
                                "clusters": [{"cluster_name": UNROUTED_CLUSTER, "weight": 1}],
                            }
                        ],
                        "override_metadata_namespace": PRIORITY_GROUP_NS,
                    },
                }
            },
        },
    }


RUNTIME = {"envoy.reloadable_features.grpc_side_stream_flow_control": False}
"""Envoy runtime overrides. Envoy 1.40 crashes (segfault) when an upstream-level ext_proc's gRPC
stream goes over its write-buffer high watermark, which a buffered response body of 1 MiB or more
does (the ext_proc cluster's connection buffer, then the 16 MiB HTTP/2 stream window): the
watermark is passed on to the upstream filter's stream callbacks. Without gRPC side-stream flow
control Envoy buffers what it sends to the ext_proc instead, as before that feature; request and
response bodies stay bounded by ``EnvoySettings.body_limit_bytes``."""

UPSTREAM_FAILURE_FLAGS = ("UH", "UF", "UO", "URX", "UC", "UR", "UT", "UMSDR", "UPE", "NC", "DF")
"""Envoy response flags of its own replies to a routed request: no healthy upstream, connection
failure, overflow, retries exhausted, connection terminated, reset, timeout, stream duration,
protocol error, no cluster, DNS failure."""


def _local_reply_config() -> dict[str, Any]:
    """Envoy's own replies to a routed request, in OpenAI's error shape.

    Such a reply never passes through an ext_proc filter, so Envoy renders it itself, saying which
    target failed the way the ext_proc words an upstream's non-OpenAI error body. Other local
    replies (the ext_proc's own answers among them) are left alone.
    """
    target = f"%DYNAMIC_METADATA({METADATA_NS}:{HEADER_TARGET})%"
    return {
        "mappers": [
            {
                "filter": {"response_flag_filter": {"flags": list(UPSTREAM_FAILURE_FLAGS)}},
                "body_format_override": {
                    "json_format": {
                        "error": {
                            "message": f"{target} answered %RESPONSE_CODE%: %LOCAL_REPLY_BODY%",
                            "type": "upstream_error",
                            "param": None,
                            "code": "%RESPONSE_CODE%",
                        }
                    }
                },
            }
        ]
    }


def bootstrap(table: RoutingTable, settings: EnvoySettings) -> dict[str, Any]:
    """The Envoy bootstrap (as a dict) for a compiled routing table."""
    route = _route()
    # The ext_proc sets each request's per-try timeout (x-envoy-upstream-rq-per-try-timeout-ms);
    # the first-byte (idle) timeout exists only per route, so it is gateway-wide.
    policy = route["route"]["retry_policy"]
    policy["per_try_idle_timeout"] = f"{table.first_byte_timeout_ms / 1000:g}s"
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "vmrouter",
        "codec_type": "AUTO",
        "route_config": {
            "name": "vmrouter",
            "virtual_hosts": [
                {
                    "name": "vmrouter",
                    "domains": ["*"],
                    "include_request_attempt_count": True,
                    "routes": [route],
                }
            ],
        },
        "local_reply_config": _local_reply_config(),
        "http_filters": [
            _ext_proc(ROLE_ROUTER, settings),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    clusters: list[dict[str, Any]] = [] if settings.xds_dir else provider_clusters(table, settings)
    clusters.append(
        {
            "name": UNROUTED_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": UNROUTED_CLUSTER, "endpoints": []},
        }
    )
    clusters.append(
        {
            "name": EXTPROC_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                    ".HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": EXTPROC_CLUSTER,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": _address(
                                        settings.extproc_address, settings.extproc_port
                                    )
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    config: dict[str, Any] = {}
    if settings.xds_dir:
        config["node"] = {"id": NODE_ID, "cluster": NODE_ID}
    config["admin"] = {"address": _address(settings.admin_address, settings.admin_port)}
    config["layered_runtime"] = {"layers": [{"name": "vmrouter", "static_layer": RUNTIME}]}
    if settings.xds_dir:
        # Envoy reloads the file when an entry of the directory is renamed into place; our writer
        # renames a finished temporary file over cds.yaml, so Envoy never reads a partial file.
        config["dynamic_resources"] = {
            "cds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": cds_path(settings.xds_dir),
                    "watched_directory": {"path": settings.xds_dir},
                },
            }
        }
    config["static_resources"] = {
        "listeners": [
            {
                "name": "vmrouter",
                "address": _address(settings.listen_address, settings.listen_port),
                "per_connection_buffer_limit_bytes": settings.body_limit_bytes,
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": hcm,
                            }
                        ]
                    }
                ],
            }
        ],
        "clusters": clusters,
    }
    return config


def render(table: RoutingTable, settings: EnvoySettings) -> str:
    """The Envoy bootstrap as YAML text."""
    header = (
        "# Generated by `python -m extproc envoy-config` from the gateway config; do not edit.\n"
    )
    return header + yaml.safe_dump(bootstrap(table, settings), sort_keys=False)
