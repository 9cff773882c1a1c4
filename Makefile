# Set-up and checks for callora-credits. Needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test lint typecheck docs demo clean

$(STAMP): setup.py pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[postgres,mysql]' -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check callora_credits tests examples migrations scripts stress bench
	$(PY) -m ruff format --check callora_credits tests examples migrations scripts stress bench

typecheck: $(STAMP)
	$(PY) -m mypy

# The docs site, built in strict mode (a broken link or missing page fails).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir build/site

# The whole suite: lint, types, and tests on SQLite plus every database
# server that answers (under CI=true, one that does not is a failure).
test: $(STAMP) lint typecheck docs
	@urls=$$($(PY) scripts/db_urls.py) || exit 1; eval "$$urls"; \
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache demo.sqlite3

# The long load-and-faults run of docs/reliability.md: minutes of mixed load per
# engine through gunicorn, faults rotating (connections terminated, workers
# SIGKILLed, the database unreachable), every invariant checked at the end.
# STRESS_ENGINES: postgresql, mysql, pgbouncer (PostgreSQL through a PgBouncer
# in transaction pooling mode), galera (a three-node MariaDB Galera cluster of
# its own; faults: connections killed, a node SIGKILLed and restarted, a node
# isolated), e.g. make stress STRESS_ENGINES=pgbouncer, or make stress-galera
STRESS_ENGINES ?= postgresql mysql pgbouncer
STRESS_ARGS ?= --seconds 180 --clients 3 --threads 3 --workers 4 --fault all --phase-seconds 20
.PHONY: stress stress-galera
stress: $(STAMP)
	@urls=$$($(PY) scripts/db_urls.py) || exit 1; eval "$$urls"; \
	$(PY) -m stress.run $(foreach engine,$(STRESS_ENGINES),--engine $(engine)) $(STRESS_ARGS)

stress-galera: $(STAMP)
	$(PY) -m stress.run --engine galera $(STRESS_ARGS)

# Benchmarks against same-run baselines (PostgreSQL at 127.0.0.1:5432); not
# part of `make test`. See docs/benchmarks.md.
.PHONY: bench
bench: $(STAMP)
	$(PY) bench/run.py

# Mutation testing of the money core with the fast SQLite tests (mutmut, on a
# copy under build/mutation/); not part of `make test`. See docs/testing.md.
# One module: make mutation MUTATION_ARGS="core/money.py"
MUTATION_ARGS ?=
.PHONY: mutation
mutation: $(STAMP)
	$(PY) scripts/mutation.py $(MUTATION_ARGS)
