"""Alembic environment: the engine comes from the server (config.attributes) or from the settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from demo.common.infra.db import engine_for
from demo.common.infra.migrate import include_name
from demo.conf import settings as demo_settings
from demo.models import Base

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # the alembic CLI: same resolution as the server (env, defaults)
    settings = demo_settings.load(argv=[])
    engine = engine_for(settings, pool_size=1, long_work=True)


def set_sqlite_foreign_keys(connection: Connection, on: bool) -> None:
    """SQLite changes a table by copying it, dropping the original and renaming the copy (Alembic's
    batch mode); with foreign keys on, that drop cascade-deletes every row that references the table
    (dropping ``users`` emptied ``auth_sessions`` and ``images``). SQLite's documented procedure for
    schema changes: keys off outside the transaction, ``foreign_key_check`` before commit, keys on."""
    connection.connection.driver_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")  # type: ignore[union-attr]


with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        set_sqlite_foreign_keys(connection, on=False)
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=sqlite,  # SQLite can only ALTER via table copies
            compare_type=True,
            include_name=include_name,  # the migration lock's table is made outside Alembic, not a model
        )
        with context.begin_transaction():
            context.run_migrations()
            if sqlite and (broken := connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()):
                raise RuntimeError(f"migration left rows whose foreign keys point nowhere: {broken[:5]}")
        # SQLite's migrations commit one by one (no transactional DDL); what is left open here is the
        # transaction SQLAlchemy began for the queries above. End it: the PRAGMA below is ignored
        # inside a transaction.
        connection.commit()
    finally:
        if sqlite:
            connection.rollback()  # nothing, or what a failed migration left
            set_sqlite_foreign_keys(connection, on=True)
