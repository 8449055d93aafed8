# edgefl: `make demo` and `make test` do all their own set-up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: help demo test lint typecheck pytest venv sim-deps dev-deps brokers mosquitto clean

help:
	@echo "make demo   - set up .venv with edgefl[sim] and run 'edgefl demo'"
	@echo "make test   - set up .venv with edgefl[dev] (+ Mosquitto, NATS, RabbitMQ) and run ruff, mypy, pytest"
	@echo "make clean  - remove .venv and caches"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "edgefl needs Python >= 3.10, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(BIN)/python

$(VENV)/.sim-installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[sim]'
	@touch $@

# PyTorch is a test-only tool (gradient parity). It is installed only from a
# local CPU wheel (pip's find-links, as on the project's machines) or when
# TORCH=1; PyPI's default torch is a multi-GB CUDA build. Without it the
# parity tests skip.
TORCH ?= auto
TORCH_VERSION ?= 2.13.0

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[dev]'
	@if [ "$(TORCH)" = 1 ] || { [ "$(TORCH)" = auto ] && \
		ls $${PIP_FIND_LINKS:-/nonexistent}/torch-$(TORCH_VERSION)* >/dev/null 2>&1; }; then \
		echo "installing torch==$(TORCH_VERSION) (test-only)"; \
		$(PIP) install --quiet torch==$(TORCH_VERSION) || echo "warning: torch not installed; parity tests will skip"; \
	else \
		echo "torch: no local CPU wheel found (TORCH=1 forces PyPI); parity tests will skip"; \
	fi
	@touch $@ $(VENV)/.sim-installed

sim-deps: $(VENV)/.sim-installed
dev-deps: $(VENV)/.dev-installed

# The brokers are system packages (Debian 12: mosquitto, nats-server,
# rabbitmq-server): install those absent when we may (root + apt-get). The
# harness never uses the services these packages start; it runs its own
# processes on free ports.
BROKER_PACKAGES := mosquitto:/usr/sbin/mosquitto nats-server:/usr/sbin/nats-server \
	rabbitmq-server:/usr/lib/rabbitmq/bin/rabbitmq-server

brokers:
	@missing=""; for entry in $(BROKER_PACKAGES); do \
		pkg=$${entry%%:*}; path=$${entry#*:}; \
		command -v $$pkg >/dev/null 2>&1 || [ -x $$path ] || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "warning:$$missing not found and cannot be installed here (need root + apt-get);"; \
		echo "         their broker tests are skipped (a failure when CI=true)"; \
	fi

mosquitto: brokers

demo: sim-deps
	$(BIN)/edgefl demo

lint: dev-deps
	$(BIN)/ruff check edge_sdk aggregator firmware_sim tests benchmarks examples
	$(BIN)/ruff format --check edge_sdk aggregator firmware_sim tests benchmarks examples

typecheck: dev-deps
	$(BIN)/mypy

pytest: dev-deps brokers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
