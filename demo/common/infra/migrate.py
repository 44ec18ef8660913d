"""Alembic, driven from code: the server upgrades the schema to head before it listens.

Several processes may start at once (systemd instances, hosts sharing one database): a lock makes
sure only one migrates while the others wait and then find nothing left to do (Alembic's version
table says so).

On MySQL/MariaDB the lock is a row, ``demo_migration_lock`` (id 1), not ``GET_LOCK()``: a named lock
belongs to the server it was taken on, is not replicated, and MariaDB Galera does not support it, so
hosts that reach different nodes through one endpoint would all migrate at once. ``SELECT ... FOR
UPDATE`` on a row is no better there: its row lock is local to the node too, and Galera certifies
optimistically at commit, so two nodes can both "hold" it and one learns it lost only when it
commits, after it has run DDL that cannot be rolled back. An INSERT of a fixed key, committed on its
own before anything is migrated, is decided at that commit instead: on one server the primary key
lets one through (the others get a duplicate key), on a cluster certification does (the others get
a deadlock error, 1213). The holder deletes its row when done, also after a failure; a holder that
died leaves a row that stops being renewed (a heartbeat renews it while migrating) and is taken over
once it is older than the lease. The table is made here, outside Alembic, because the lock must
exist before the first migration runs; the models-vs-migrations comparison skips it (include_name).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import TextClause, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from demo.common.infra.locks import file_lock
from demo.conf.settings import PACKAGE_DIR

log = logging.getLogger("demo.migrate")

MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
LOCK_TABLE = "demo_migration_lock"
LOCK_TIMEOUT = 300.0  # seconds a starting process waits for another one's migration
# A lock row not renewed for this long is a dead migrator's. The holder renews it every tenth of
# that, so only a holder that stopped (killed, host gone) loses it, however long its migration runs.
LOCK_LEASE = 600.0
LOCK_POLL = 1.0  # seconds between two looks at a held lock
_LOCK_DEADLOCK = 1213  # InnoDB deadlock, and how Galera reports a transaction that lost certification

_CREATE = text(
    f"CREATE TABLE IF NOT EXISTS {LOCK_TABLE} "
    "(id INT NOT NULL PRIMARY KEY, holder VARCHAR(64) NOT NULL, taken_at DATETIME NOT NULL) ENGINE=InnoDB"
)
# The database's clock, not the hosts': hosts whose clocks disagree still agree on a row's age.
_TAKE = text(f"INSERT INTO {LOCK_TABLE} (id, holder, taken_at) VALUES (1, :holder, UTC_TIMESTAMP())")
_LOOK = text(f"SELECT holder, TIMESTAMPDIFF(SECOND, taken_at, UTC_TIMESTAMP()) FROM {LOCK_TABLE} WHERE id = 1")
_TAKE_OVER = text(
    f"UPDATE {LOCK_TABLE} SET holder = :holder, taken_at = UTC_TIMESTAMP() "
    "WHERE id = 1 AND holder = :stale AND taken_at < UTC_TIMESTAMP() - INTERVAL :lease SECOND"
)
_RENEW = text(f"UPDATE {LOCK_TABLE} SET taken_at = UTC_TIMESTAMP() WHERE id = 1 AND holder = :holder")
_RELEASE = text(f"DELETE FROM {LOCK_TABLE} WHERE id = 1 AND holder = :holder")


class MigrationLockTimeout(RuntimeError):
    """Another process held the migration lock for LOCK_TIMEOUT seconds."""


def alembic_config(engine: Engine | None = None) -> Config:
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def schema_revision(engine: Engine) -> tuple[str | None, str | None]:
    """(the database's schema revision, None before any migration; this release's head revision)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision(), head


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's filter for comparing the database with the models: the lock table is not a model."""
    return not (type_ == "table" and name == LOCK_TABLE)


def upgrade(
    engine: Engine, revision: str = "head", *, timeout: float = LOCK_TIMEOUT, lease: float = LOCK_LEASE
) -> None:
    """Bring the schema to ``revision``; the engine needs a pool of 2 (Alembic's connection and the
    lock's heartbeat)."""
    with migration_lock(engine, timeout=timeout, lease=lease):
        command.upgrade(alembic_config(engine), revision)


@contextmanager
def migration_lock(engine: Engine, *, timeout: float = LOCK_TIMEOUT, lease: float = LOCK_LEASE) -> Iterator[None]:
    if engine.dialect.name in ("mysql", "mariadb"):
        with row_lock(engine, timeout, lease):
            yield
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with file_lock(f"{engine.url.database}.migrate-lock"):
            yield
    else:
        yield


@contextmanager
def row_lock(engine: Engine, timeout: float, lease: float) -> Iterator[None]:
    """Hold the lock row for the ``with`` block (MigrationLockTimeout after ``timeout`` seconds)."""
    holder = f"{socket.gethostname()[:40]} pid {os.getpid()} {secrets.token_hex(4)}"
    with engine.begin() as conn:
        conn.execute(_CREATE)
    _take(engine, holder, timeout, lease)
    stop = threading.Event()
    heartbeat = threading.Thread(
        target=_renew, args=(engine, holder, lease / 10, stop), name="migration-lock", daemon=True
    )
    heartbeat.start()
    try:
        yield
    finally:
        stop.set()
        heartbeat.join()
        with engine.begin() as conn:
            if conn.execute(_RELEASE, {"holder": holder}).rowcount != 1:
                log.error("the migration lock of %s was taken over while it migrated", holder)


def _take(engine: Engine, holder: str, timeout: float, lease: float) -> None:
    deadline = time.monotonic() + timeout
    waiting_for = None
    while True:
        if _attempt(engine, _TAKE, {"holder": holder}):
            return
        with engine.begin() as conn:
            row = conn.execute(_LOOK).first()
        if row is not None:
            stale, age = row[0], row[1]
            if age >= lease and _attempt(
                engine, _TAKE_OVER, {"holder": holder, "stale": stale, "lease": int(lease)}, updates=True
            ):
                log.warning("took over the migration lock of %s, not renewed for %d s", stale, age)
                return
            if stale != waiting_for:
                log.info("waiting for the migration lock held by %s (%d s)", stale, age)
                waiting_for = stale
        if time.monotonic() >= deadline:
            raise MigrationLockTimeout("another process has held the migration lock for too long")
        if row is not None:  # else it was released in between: try again at once
            time.sleep(LOCK_POLL)  # start-up (or a command), before any event loop runs


def _attempt(engine: Engine, statement: TextClause, params: dict[str, object], *, updates: bool = False) -> bool:
    """Run ``statement`` in a transaction of its own: False when another taker won (duplicate key, or
    the deadlock/certification failure of two takers at once), or when an UPDATE matched no row."""
    try:
        with engine.begin() as conn:
            result = conn.execute(statement, params)
            return not updates or result.rowcount == 1
    except IntegrityError:
        return False
    except OperationalError as error:
        if error.orig is not None and error.orig.args[:1] == (_LOCK_DEADLOCK,):
            return False
        raise


def _renew(engine: Engine, holder: str, every: float, stop: threading.Event) -> None:
    """Keep the lock row fresh while the migration runs, so that the lease only ends a dead holder's."""
    while not stop.wait(every):
        try:
            with engine.begin() as conn:
                if conn.execute(_RENEW, {"holder": holder}).rowcount != 1:
                    log.error("the migration lock of %s was taken over while it migrated", holder)
        except SQLAlchemyError as error:  # a failed renewal is retried; the lease leaves ten of them
            log.warning("could not renew the migration lock: %s", error)
