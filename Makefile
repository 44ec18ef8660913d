# Two entry points: `make run` (dev server on :8000, SQLite) and `make test` (whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: run test lint format clean lock messages

# Installs come from the locks (exact versions, hashes checked); the ranges in setup.cfg are for those
# who install demo as a library. mysqlclient compiles against the MySQL/MariaDB client headers, so its
# lock (the same versions plus mysqlclient) is used only where pkg-config finds them: else SQLite only.
LOCK       := requirements.lock
MYSQL_LOCK := requirements-mysql.lock
HAVE_MYSQL_HEADERS = pkg-config --exists mysqlclient 2>/dev/null || pkg-config --exists libmariadb 2>/dev/null

$(STAMP): setup.cfg pyproject.toml $(LOCK) $(MYSQL_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if $(HAVE_MYSQL_HEADERS); then lock=$(MYSQL_LOCK); else lock=$(LOCK); \
		echo "note: MySQL client headers not found (apt-get install libmariadb-dev pkg-config); SQLite only"; \
	fi; \
	echo "$(BIN)/pip install -q --require-hashes -r $$lock"; \
	$(BIN)/pip install -q --require-hashes -r $$lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

run: $(STAMP)
	$(BIN)/python -m demo.main --debug --port=8000 $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The checks CI runs before the tests: ruff's lint and format check over everything, mypy strict on demo/
# (pyproject.toml). `make format` rewrites the tree in ruff's style.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) demo/data .pytest_cache

# The gettext catalogues (demo/locale, README "Languages"): extracts the msgids of the code (_() and N_())
# and of the templates into demo.pot, merges them into each language's demo.po (a new one untranslated,
# a changed one fuzzy, a dropped one obsolete) and compiles the .mo files the server reads. Translate
# what is new or fuzzy in each demo.po, run it again, and commit the .pot, .po and .mo files: the tests
# fail on a catalogue that is behind the code, untranslated, or not compiled from its .po.
MESSAGES := $(BIN)/pybabel
messages: $(STAMP)
	$(MESSAGES) extract -F babel.cfg -k N_ --no-location --sort-output --project demo \
		--copyright-holder "demo's authors" -o demo/locale/demo.pot .
	$(MESSAGES) update -i demo/locale/demo.pot -d demo/locale -D demo
	$(MESSAGES) compile -d demo/locale -D demo --statistics

# Refreshes both locks from setup.cfg: the newest versions within its ranges, the MySQL lock held to the
# versions of the other. The resolver is installed on demand into a throwaway folder, never into the
# product or its venv.
UV_VERSION    := 0.13.9
LOCK_OPTIONS  := --quiet --universal --python-version 3.11 --generate-hashes --custom-compile-command 'make lock'
lock:
	@tool=$$(mktemp -d) && trap 'rm -rf "$$tool"' EXIT && \
	$(PYTHON) -m venv "$$tool" && "$$tool/bin/pip" install -q uv==$(UV_VERSION) && \
	"$$tool/bin/uv" pip compile $(LOCK_OPTIONS) --upgrade --extra test setup.cfg -o $(LOCK) && \
	"$$tool/bin/uv" pip compile $(LOCK_OPTIONS) --extra test --extra mysql -c $(LOCK) setup.cfg -o $(MYSQL_LOCK)

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
