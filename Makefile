# Every target installs what it needs into .venv first, so each works on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := docker/constraints.txt

# One Python for dev, CI, the images (python:3.12-slim) and the benchmark: 3.12. PYTHON is the
# first that runs as 3.12 of: python3.12 on PATH, pyenv's 3.12 (the shim on PATH runs only with
# PYENV_VERSION set, so its versions are looked at directly). `make PYTHON=/path/python3.12`
# overrides; the install recipe says what to install when none is found.
PYTHON_VERSION := 3.12
PYENV_PYTHONS := $(sort $(wildcard $(HOME)/.pyenv/versions/$(PYTHON_VERSION).*/bin/python$(PYTHON_VERSION)))
IS_PYTHON_VERSION = $(if $(1),$(shell $(1) -c 'import sys; sys.exit("%d.%d" % sys.version_info[:2] != "$(PYTHON_VERSION)")' >/dev/null 2>&1 && echo $(1)))
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(foreach p,python$(PYTHON_VERSION) $(PYENV_PYTHONS),$(call IS_PYTHON_VERSION,$(p))))
endif

.PHONY: install test test-fast lint up bench soak lessons docs docs-check dashboard clean

DURATION ?= 10m

# A fresh venv each time the lock or pyproject.toml changes, so it holds exactly what the lock
# pins (the images install from the same file); the stamp names the version, so a venv of
# another Python is replaced too.
$(VENV)/.installed-$(PYTHON_VERSION): pyproject.toml $(LOCK)
	@if [ -z "$(PYTHON)" ] || [ -z "$(call IS_PYTHON_VERSION,$(PYTHON))" ]; then \
	  echo "make: needs CPython $(PYTHON_VERSION) (the images' version): $(if $(PYTHON),PYTHON=$(PYTHON) is not it,found none on PATH or in pyenv)." >&2; \
	  echo "  Install CPython $(PYTHON_VERSION) (Ubuntu 24.04: apt install python$(PYTHON_VERSION)-venv;" \
	    "elsewhere: pyenv install $(PYTHON_VERSION), or python.org), or run make PYTHON=/path/to/python$(PYTHON_VERSION)." >&2; \
	  exit 1; \
	fi
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $@

install: $(VENV)/.installed-$(PYTHON_VERSION)  ## create .venv (Python 3.12) and install the project with every extra, pinned by docker/constraints.txt

test: install  ## lint, format and type checks, then every test (the Docker ones need a running engine; see README)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest

test-fast: install  ## the quick tests only: no load, no Locust, no Docker
	$(PY) -m pytest -m "not slow and not docker and not locust"

lint: install  ## the checks `make test` starts with: ruff, ruff format, mypy (strict for services/)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

up: install  ## the whole stack as local processes (servers, Locust web UI, Prometheus if installed)
	$(PY) -m loadtest.tools.stack

bench: install  ## measure each server in isolation; writes results/
	$(PY) -m loadtest.bench

soak: install  ## the servers under the default Locust load for DURATION (make soak DURATION=24h); report in results/soak/
	$(PY) -m loadtest.tools.soak --duration $(DURATION) --report-dir results/soak

lessons: install  ## check each lesson's claim against each model alone; writes results/lessons/ (LESSONS_ARGS=--quick)
	$(PY) -m loadtest.lessons $(LESSONS_ARGS)

docs: install  ## write the measured figures from results/ into README.md and docs/ (check: make docs-check)
	$(PY) -m loadtest.tools.docfigures

docs-check: install  ## fail with a diff when a figure in README.md or docs/ differs from results/
	$(PY) -m loadtest.tools.docfigures --check

dashboard: install  ## write the Grafana dashboard and Prometheus's scrape config from the model registry
	$(PY) -m loadtest.tools.dashboard

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
