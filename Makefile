# Every target sets up .venv itself, so a fresh clone needs only `make test` or `make run`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# One .venv, a stamp per set of extras: `make run` installs the service alone, the
# tests and checks add the dev extra, the bench adds its own. They share the .venv, so
# they work in any order: each installs what its targets lack.
RUN_STAMP := $(VENV)/.run-installed
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: test test-tools check fmt bench bench-tools chaos run clean

$(RUN_STAMP): EXTRAS :=
$(STAMP): EXTRAS := [dev]
$(BENCH_STAMP): EXTRAS := [dev,bench]
$(RUN_STAMP) $(STAMP) $(BENCH_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.$(EXTRAS)'
	touch $@

# Tools some tests drive (redis-cli; libfaketime for the clock runs; curl for the seed's
# examples; Debian's chromium for the dashboard test, driven by Playwright), installed
# with apt-get when we can; else those tests say what is missing (and fail under CI=true).
test-tools:
	@missing=""; \
	  command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	  command -v faketime >/dev/null || missing="$$missing faketime"; \
	  command -v curl >/dev/null || missing="$$missing curl"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	        (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null)) || \
	        echo "note: could not install$$missing"; \
	    else echo "note: install$$missing for every test to run"; fi; \
	  fi

test: $(STAMP) test-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/ruff check tokenpool tests bench
	$(BIN)/ruff format --check tokenpool tests bench
	$(BIN)/mypy tokenpool bench tests/chaos tests/reference.py

fmt: $(STAMP)
	$(BIN)/ruff format tokenpool tests bench
	$(BIN)/ruff check --fix tokenpool tests bench

# The service on its embedded default: SQLite in data/tokenpool.db, RESP on 127.0.0.1:7379.
run: $(RUN_STAMP)
	$(BIN)/tokenpool serve $(RUN_ARGS)

# The peers' drivers: redis-benchmark and redis-server (redis-tools, redis-server) and
# pgbench (the PostgreSQL server package), installed with apt-get when we can; else the
# bench says exactly what is missing and skips what needs it.
bench-tools:
	@missing=""; \
	  command -v redis-benchmark >/dev/null || missing="$$missing redis-tools"; \
	  command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	  command -v pgbench >/dev/null || missing="$$missing postgresql"; \
	  command -v wrk >/dev/null || missing="$$missing wrk"; \
	  command -v valgrind >/dev/null || missing="$$missing valgrind"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && apt-get install -y -qq $$missing >/dev/null || \
	        echo "note: could not install$$missing; the bench skips what needs them"; \
	    else echo "note: install$$missing for the peer benchmarks"; fi; \
	  fi

# BENCH_ARGS=--quick for a short run (under 2 minutes); the full run takes under 20.
bench: $(BENCH_STAMP) bench-tools
	$(BIN)/python -m bench $(BENCH_ARGS)

# The long reliability runs (the short ones are in `make test`): histories checked for
# linearizability, SIGKILL/SIGTERM under load, hostile clients; prints a summary table.
CHAOS_DSN ?= $(or $(TOKENPOOL_TEST_DSN),postgresql://postgres@127.0.0.1:5432/test)
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos --clients 64 --operations 200000 --dsn $(CHAOS_DSN) $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
