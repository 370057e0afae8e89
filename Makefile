# The two commands a newcomer needs: `make run` and `make test`.
# Both create the virtualenv on first use: `make run` installs what running needs (the
# package with the extras app.yaml uses), `make test` the development tools on top.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime
INSTALLED := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
PROTOS := $(wildcard pb/*.proto orchestrator/proto/*.proto)

.PHONY: run test lint typecheck docs proto bench bench-async bench-throttling clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(RUNTIME): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[console]'
	touch $(RUNTIME)

# The bench extra too: tests/test_bench_temporal.py runs the comparison with Temporal.
$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev,bench]'
	touch $(INSTALLED) $(RUNTIME)

proto: $(INSTALLED)
	$(PY) tools/genproto.py

run: $(RUNTIME)
	$(PY) main.py

lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(INSTALLED)
	$(PY) -m mypy orchestrator

# The console's browser tests drive Debian's Chromium: installed here when it is missing
# (CI starts from a fresh machine). Where apt-get cannot, they skip, except under CI.
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  echo "installing chromium for the browser tests (apt-get, about 1.5 minutes)"; \
	  ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null ) \
	    || { [ -z "$$CI" ] || exit 1; echo "no chromium: the browser tests will be skipped"; }; \
	fi

test: $(INSTALLED) browser lint typecheck
	$(PY) -m pytest

# The API reference from the docstrings, into site/; a warning fails it (tests/test_docs.py too).
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: $(INSTALLED)
	$(PY) bench/sync_booking.py

bench-async: $(INSTALLED)
	$(PY) bench/async_booking.py

bench-throttling: $(INSTALLED)
	$(PY) bench/throttling_booking.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
