# tapgate: `make run` (the daemon on its simulator) and `make test` (everything the
# tests need, system packages included, then the whole suite) on a fresh Debian 12 or
# Raspberry Pi OS machine.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/tapgate.toml

# Debian packages: building pyscard, the PC/SC stack with the vpcd virtual reader.
SYSTEM_PACKAGES := python3-venv python3-dev build-essential swig libpcsclite-dev \
                   pcscd vsmartcard-vpcd
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test check lint typecheck system-deps bench clean

run: $(VENV)/.run-deps
	$(VENV)/bin/tapgate run --config $(CONFIG)

test: system-deps $(VENV)/.test-deps
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory check

check: lint typecheck

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check daemon hal tests bench

typecheck: $(VENV)/.test-deps
	$(VENV)/bin/mypy

bench: system-deps $(VENV)/.test-deps
	$(PY) -m bench.run_all

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.run-deps: $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test-deps: $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.run-deps

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
