"""Alembic, driven from code: the server upgrades the schema to head before it listens.

Several processes may start at once (systemd instances, hosts sharing one MySQL): a lock makes
sure only one migrates while the others wait and then find nothing left to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Engine

from demo.common.infra.locks import file_lock
from demo.conf.settings import PACKAGE_DIR

MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
LOCK_NAME = "demo_migrations"
LOCK_TIMEOUT = 300  # seconds a starting process waits for another one's migration


class MigrationLockTimeout(RuntimeError):
    """Another process held the migration lock for LOCK_TIMEOUT seconds."""


def alembic_config(engine: Engine | None = None) -> Config:
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; the engine needs a pool of 2 (one connection holds the lock)."""
    with migration_lock(engine):
        command.upgrade(alembic_config(engine), revision)


@contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name in ("mysql", "mariadb"):
        with engine.connect() as conn:  # GET_LOCK belongs to this connection until released
            acquired = conn.execute(
                text("SELECT GET_LOCK(:name, :timeout)"), {"name": LOCK_NAME, "timeout": LOCK_TIMEOUT}
            ).scalar()
            if acquired != 1:
                raise MigrationLockTimeout("another process has held the migration lock for too long")
            try:
                yield
            finally:
                conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME})
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with file_lock(f"{engine.url.database}.migrate-lock"):
            yield
    else:
        yield
