# The verbs people expect. Everything runs from the project's own venv (.venv).
STACK ?= staging
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PLAN_ARGS := $(if $(JSON),--json) $(if $(DIFF),--diff $(DIFF)) $(if $(DIAGRAM),--diagram $(DIAGRAM))

.PHONY: venv system-deps plan test lint

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

system-deps:  ## Debian packages the tests run for real (nginx, PostgreSQL, pgbouncer, ...)
	bash scripts/install-system-deps.sh

plan: venv  ## offline plan: make plan STACK=prod [JSON=1] [DIFF=staging] [DIAGRAM=docs/prod.png]
	$(PY) -m tools.plan $(STACK) $(PLAN_ARGS)

test: venv system-deps  ## the whole test suite
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .
