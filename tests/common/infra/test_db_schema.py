"""Schema facts a Galera cluster relies on, checked on the migrated database (SQLite, then MariaDB):
every table has a primary key (Galera certifies and applies row events by it; a table without one
replicates by full scans, or not at all under wsrep_mode=REQUIRED_PRIMARY_KEY), the migration lock's
table and Alembic's version table included."""

from __future__ import annotations

from sqlalchemy import inspect

from demo.common.infra import migrate
from demo.models import Base
from tests.helpers import make_test_engine


def test_every_table_has_a_primary_key(database_url):
    engine = make_test_engine(database_url)
    try:
        inspector = inspect(engine)
        tables = set(inspector.get_table_names())
        expected = set(Base.metadata.tables) | {"alembic_version"}
        if engine.dialect.name in ("mysql", "mariadb"):
            expected.add(migrate.LOCK_TABLE)  # made before the first migration, outside the models
        assert expected <= tables, sorted(expected - tables)
        without = [name for name in sorted(tables) if not inspector.get_pk_constraint(name)["constrained_columns"]]
        assert without == []
    finally:
        engine.dispose()
