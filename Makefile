# Every target sets up .venv itself, so a fresh clone needs only `make test` or `make run`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test check fmt bench bench-tools run clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/ruff check tokenpool tests
	$(BIN)/ruff format --check tokenpool tests
	$(BIN)/mypy tokenpool

fmt: $(STAMP)
	$(BIN)/ruff format tokenpool tests
	$(BIN)/ruff check --fix tokenpool tests

# The service on its embedded default: SQLite in data/tokenpool.db, RESP on 127.0.0.1:7379.
run: $(STAMP)
	$(BIN)/tokenpool serve $(RUN_ARGS)

# redis-benchmark (and redis-server, the ceiling) for the server figures: installed
# with apt-get when we can, else the bench says what is missing and skips them.
bench-tools:
	@command -v redis-benchmark >/dev/null && command -v redis-server >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && apt-get install -y -qq redis-tools redis-server >/dev/null; } || \
	  echo "note: install redis-tools and redis-server for the server benchmarks"

bench: $(STAMP) bench-tools
	$(BIN)/python -m tokenpool.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
