# The verbs people expect. Everything runs from the project's own venv (.venv).
STACK ?= staging
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PLAN_ARGS := $(if $(JSON),--json) $(if $(DIFF),--diff $(DIFF)) $(if $(DIAGRAM),--diagram $(DIAGRAM))

.PHONY: venv system-deps plan test lint

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt app/requirements.txt
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

# --- The local HA lab (docs/lab.md) --------------------------------------------------------
# make lab STACK=prod     the stack's data plane on loopback, in the background; prints its URL
# make lab-down           stops every lab process (state and logs stay in .lab/)
# make chaos STACK=prod   failure scenarios under load in a lab of their own; lab-report.json
# make drill STACK=prod   restore drill: a point in time restored into a new cluster (base backup
#                         + WAL archive), the app switched to it droplet by droplet, every write
#                         checked through the app (docs/lab.md, docs/runbook.md)
.PHONY: lab lab-down chaos drill

lab: venv system-deps
	$(PY) -m lab up $(STACK)

lab-down: venv
	$(PY) -m lab down

chaos: venv system-deps
	$(PY) -m lab chaos $(STACK) $(CHAOS_ARGS)

drill: venv system-deps
	$(PY) -m lab.drill $(STACK) $(DRILL_ARGS)

# --- Throughput and latency, layer by layer (docs/benchmarks.md) --------------------------
# make bench STACK=prod   gunicorn, droplet nginx, frontend, static ceiling, upstream keepalive
#                         on/off, sync/gthread, in a lab of its own; bench-report.json
.PHONY: bench

bench: venv system-deps
	$(PY) -m lab.bench $(STACK) $(BENCH_ARGS)

# --- Booting the droplets (README, "Booting the droplets") ---------------------------------
# make boot STACK=prod    every droplet of the stack booted from its registered user data in a
#                         systemd container (Debian 12 image built once, cached outside the
#                         repo); checks, boot-report.json; needs root. BOOT_ARGS="--break" boots a
#                         deliberately broken user data, whose report must fail.
.PHONY: boot

boot: venv system-deps
	$(PY) -m lab.boot $(STACK) $(BOOT_ARGS)
