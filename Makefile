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
	$(PY) -m ruff check callora_credits tests examples migrations scripts
	$(PY) -m ruff format --check callora_credits tests examples migrations scripts

typecheck: $(STAMP)
	$(PY) -m mypy

# The docs site, built in strict mode (a broken link or missing page fails).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir build/site

# The whole suite: lint, types, and tests on SQLite plus every database
# server that answers (under CI=true, one that does not is a failure).
test: $(STAMP) lint typecheck docs
	@urls=$$($(PY) scripts/db_urls.py) || exit 1; eval "$$urls"; \
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache demo.sqlite3
