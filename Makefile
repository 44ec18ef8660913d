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
