# Two entry points: `make run` (the demo, or CONFIG=FILE) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?=
# System packages come from apt-get, through sudo when not root; no Recommends (prometheus
# would pull in node-exporter, a service listening on every interface).
SUDO     := $(if $(filter 0,$(shell id -u)),,sudo)
apt      = { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1) >/dev/null; }

.PHONY: install run test lint typecheck bench bench-deps system-deps clean

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "authproxy needs Python 3.11 or newer: make PY=python3.11 ...")'
	@$(PY) -c 'import ensurepip' 2>/dev/null || $(call apt,python3-venv)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Servers the tests drive for real; installed from Debian's packages when missing.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || $(call apt,redis-server)
	@command -v curl >/dev/null 2>&1 || $(call apt,curl)
	@command -v promtool >/dev/null 2>&1 || $(call apt,prometheus)

run: $(STAMP)
ifeq ($(CONFIG),)
	$(BIN)/authproxy demo
else
	$(BIN)/authproxy run -c $(CONFIG)
endif

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest tests

# nginx (upstream and contender) and wrk (load generator), from Debian's packages when missing.
bench-deps:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || $(call apt,nginx)
	@command -v wrk >/dev/null 2>&1 || $(call apt,wrk)

# Separate from `make test`: about 11 minutes on 2 CPUs. BENCH_ARGS='--quick' for a smoke run.
bench: $(STAMP) bench-deps
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
