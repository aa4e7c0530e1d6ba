# crm-integration — `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROJECT ?= examples/demo
export CRM_PROJECT ?= $(PROJECT)
export DAGSTER_HOME ?= $(CURDIR)/var/dagster_home
STEWARD_PORT ?= 8765

.DEFAULT_GOAL := help
.PHONY: help demo sync-demo finance-demo steward test check lint typecheck pytest ui ui-prod bench bench-mapping bench-connectors bench-validate bench-dedup bench-dedup-components bench-e2e bench-load bench-dedup-storage bench-sync bench-finance bench-steward bench-write-floor clean schema

help:  ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

$(DAGSTER_HOME):
	mkdir -p $(DAGSTER_HOME)
	@test -f $(DAGSTER_HOME)/dagster.yaml || printf 'telemetry:\n  enabled: false\n' > $(DAGSTER_HOME)/dagster.yaml

demo: $(VENV)/.installed $(DAGSTER_HOME)  ## generate the demo sources and run the whole migration through Dagster
	$(BIN)/python $(PROJECT)/generate_sources.py
	$(BIN)/crmi core upgrade
	$(BIN)/crmi run --project $(PROJECT)

sync-demo: demo  ## after the demo: the sync loop with U8 against the local U8 OpenAPI test server
	$(BIN)/python $(PROJECT)/sync_loop.py

finance-demo: demo  ## after the demo: the 业财 loop with K3Cloud (won deal → receivable → receipt) against the local K3Cloud server
	$(BIN)/python $(PROJECT)/finance_loop.py

test: check  ## ruff + mypy + pytest in .venv (dev extras)

check: lint typecheck pytest  ## ruff, mypy and pytest

lint: $(VENV)/.installed  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed  ## mypy
	$(BIN)/mypy

pytest: $(VENV)/.installed  ## the test suite
	$(BIN)/pytest

ui: $(VENV)/.installed $(DAGSTER_HOME)  ## Dagster UI on 127.0.0.1:3000 (DAGSTER_HOME under var/)
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

ui-prod: $(VENV)/.installed  ## webserver + daemon as deployed: deploy/dagster.yaml on PostgreSQL, settings in deploy/dagster.env
	@test -f deploy/dagster.env || { echo "copy deploy/dagster.env.example to deploy/dagster.env and fill it in (docs/deploy.md)"; exit 2; }
	mkdir -p var/prod/dagster_home var/prod/work
	cp deploy/dagster.yaml var/prod/dagster_home/dagster.yaml
	set -a; . deploy/dagster.env; set +a; \
	export DAGSTER_HOME=$(CURDIR)/var/prod/dagster_home CRMI_WORK_DIR=$(CURDIR)/var/prod/work; \
	$(BIN)/python deploy/preflight.py || exit 1; \
	$(BIN)/dagster-daemon run -w deploy/workspace.yaml & daemon=$$!; \
	trap 'kill $$daemon; wait $$daemon' EXIT INT TERM; \
	$(BIN)/dagster-webserver -h $${DAGSTER_WEBSERVER_HOST:-127.0.0.1} -p $${DAGSTER_WEBSERVER_PORT:-3000} -w deploy/workspace.yaml

steward: $(VENV)/.installed  ## the steward workbench on 127.0.0.1:8765 (STEWARD_PORT=N for another) for CRM_PROJECT, default the demo (first: crmi steward users add NAME --role admin)
	$(BIN)/python -m integration.steward serve --project $(CRM_PROJECT) --port $(STEWARD_PORT)

schema: $(VENV)/.installed  ## regenerate mapping.schema.json, docs/transforms.md and docs/targets.md from the code
	$(BIN)/crmi mapping schema > integration/mappings/mapping.schema.json
	$(BIN)/crmi mapping transforms --format markdown > docs/transforms.md
	$(BIN)/crmi mapping targets --format markdown > docs/targets.md

bench: bench-mapping bench-connectors bench-validate bench-dedup bench-dedup-components bench-load bench-dedup-storage bench-e2e bench-write-floor bench-sync bench-finance bench-steward  ## all benchmarks

bench-connectors: $(VENV)/.installed  ## extraction throughput vs naive pandas (JSON line)
	$(BIN)/python bench/bench_connectors.py

bench-mapping: $(VENV)/.installed  ## mapping throughput (JSON line)
	$(BIN)/python bench/bench_mapping.py

bench-dedup: $(VENV)/.installed  ## matching quality end to end: tuning + held-out sets, 50k customers each, through crmi run (JSON line)
	$(BIN)/python bench/bench_dedup.py

bench-dedup-components: $(VENV)/.installed  ## comparisons/s, FEBRL, Chinese set vs Splink, 10k/100k/1M scale, online match (JSON line)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/bench_dedup.py --components

bench-validate: $(VENV)/.installed  ## all rules on 1M opportunities + reconciliation of 1M rows (JSON line)
	$(BIN)/python bench/bench_validate.py

bench-sync: $(VENV)/.installed  ## U8 sync at 1,000,000 customers: round trip of 100 changes vs full-table diff, outbound, outage drain (JSON line)
	$(BIN)/python bench/bench_sync.py

bench-finance: $(VENV)/.installed  ## K3Cloud inbound of 200,000 receivables + receipts, order_to_cash over 1,000,000 orders (JSON line)
	$(BIN)/python bench/bench_finance.py

bench-load: $(VENV)/.installed  ## core loader with crosswalk + journal: customers/contacts/opportunities, re-load, rollback vs to_sql (JSON line)
	$(BIN)/python bench/bench_load.py

bench-dedup-storage: $(VENV)/.installed  ## candidate storage, set-based merges, undo and rollback at N customers (JSON line)
	$(BIN)/python bench/bench_dedup_storage.py

bench-steward: $(VENV)/.installed  ## steward workbench: queue/cluster pages at 100k pending pairs, match API under 20 clients (JSON line)
	$(BIN)/python bench/bench_steward.py

bench-write-floor: $(VENV)/.installed  ## the writes alone of a kept 1M core (make bench-e2e first, or CORE=path): what bounds any loader (JSON line)
	$(BIN)/python bench/bench_write_floor.py --core $(or $(CORE),var/bench_e2e/sqlite-1000000/core.sqlite) --without-crosswalk-entity-indexes

bench-e2e: $(VENV)/.installed  ## 3-source engagement, 100k + 1M rows, crmi run on SQLite + PostgreSQL (JSON line)
	$(BIN)/python bench/bench_e2e.py

clean:  ## remove var/ and generated demo data (keeps .venv)
	rm -rf var $(PROJECT)/data
