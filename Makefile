# Every target installs what it needs into .venv first, so each works on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install test test-fast lint up bench soak lessons docs docs-check clean

DURATION ?= 10m

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install the project with every extra

test: install  ## lint, then every test (the Docker ones need a running engine; see README)
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: install  ## the quick tests only: no load, no Locust, no Docker
	$(PY) -m pytest -m "not slow and not docker and not locust"

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

up: install  ## the whole stack as local processes (servers, Locust web UI, Prometheus if installed)
	$(PY) -m services.stack

bench: install  ## measure each server in isolation; writes results/
	$(PY) -m loadtest.bench

soak: install  ## the servers under the default Locust load for DURATION (make soak DURATION=24h); report in results/soak/
	$(PY) -m loadtest.soak --duration $(DURATION) --report-dir results/soak

lessons: install  ## check each lesson's claim against each model alone; writes results/lessons/ (LESSONS_ARGS=--quick)
	$(PY) -m loadtest.lessons $(LESSONS_ARGS)

docs: install  ## write the measured figures from results/ into README.md and docs/ (check: make docs-check)
	$(PY) -m loadtest.docfigures

docs-check: install  ## fail with a diff when a figure in README.md or docs/ differs from results/
	$(PY) -m loadtest.docfigures --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
