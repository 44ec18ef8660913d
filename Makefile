# Two entry points: `make run` (dev server on :8000, SQLite) and `make test` (whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: run test clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@# mysqlclient compiles against the MySQL/MariaDB client headers; without them we stay on SQLite.
	@if pkg-config --exists mysqlclient 2>/dev/null || pkg-config --exists libmariadb 2>/dev/null; then \
		$(BIN)/pip install -q -e '.[mysql]'; \
	else \
		echo "note: MySQL client headers not found (apt-get install libmariadb-dev pkg-config); SQLite only"; \
	fi
	touch $@

run: $(STAMP)
	$(BIN)/python -m demo.main --debug --port=8000 $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) demo/data .pytest_cache

# Benchmarks, not part of `make test` (bench/README.md): `make bench` takes a few minutes and prints
# the table (ARGS=--check fails on a missed target); `make bench-smoke` checks the harness in seconds.
.PHONY: bench bench-smoke

bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

bench-smoke: $(STAMP)
	$(BIN)/python bench/run.py --smoke $(ARGS)

# 10 minutes of the benchmark workload, mixed: zero 5xx, RSS and open fds flat after warm-up.
.PHONY: soak
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(ARGS)
