"""Every hand-written statement (``Sql``) of the queries modules and of ratelimit matches the migrated
schema on SQLite and MariaDB: SELECTs run (and name the datetime columns they declare), writes are
EXPLAINed. A column renamed in models.py and its migration, but not in the SQL, fails here (the
queries' own tests also execute every statement on both databases)."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest
from sqlalchemy import text

import demo.common
from demo.common.infra import ratelimit
from demo.common.infra.db import Sql, SqlCursor, sql_unit

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def statements() -> dict[str, Sql]:
    """Every ``Sql`` at the top level (or in a dict) of each ``queries`` module, and ratelimit's."""
    modules = [
        importlib.import_module(m.name)
        for m in pkgutil.walk_packages(demo.common.__path__, "demo.common.")
        if m.name.endswith(".queries")
    ]
    found: dict[str, Sql] = {}
    for module in [*modules, ratelimit]:
        for name, value in vars(module).items():
            values = value.items() if isinstance(value, dict) else [(None, value)]
            for key, sql in values:
                if isinstance(sql, Sql):
                    found[f"{module.__name__}.{name}" + (f"[{key}]" if key else "")] = sql
    for size in (1, 2, 4):  # the sizes the rules use
        reserve, give_back = ratelimit.statements(size)
        found[f"ratelimit reserve({size})"], found[f"ratelimit refund({size})"] = reserve, give_back
    return found


STATEMENTS = statements()


def test_the_queries_modules_are_found():
    names = {name.rsplit(".", 1)[0] for name in STATEMENTS}
    assert {
        "demo.common.accounts.queries",
        "demo.common.h5.queries",
        "demo.common.sms.queries",
        "demo.common.infra.ratelimit",
    } <= names


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_the_statement_matches_the_schema(app, name):
    sql, db = STATEMENTS[name], app.services.db
    dialect = db.engine.dialect.name
    statement = sql.for_dialect(dialect)
    source = sql.text or sql.by_backend["sqlite" if dialect == "sqlite" else "mysql"]
    params = dict.fromkeys(_PARAM.findall(source), 1)

    @sql_unit
    def check(c: SqlCursor) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            c.all(sql, params)  # also checks that its declared datetimes are among its columns
        else:
            c.cursor.execute(f"EXPLAIN {statement}", params)
            c.cursor.fetchall()

    db.run_sync(check)
    # Nothing was written by the check (EXPLAIN only plans a write).
    assert db.run_sync(lambda s: s.execute(text("SELECT COUNT(*) FROM rate_counters")).scalar()) == 0
