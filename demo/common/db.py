"""Database access: one engine, units of work run on the DB thread pool, never on the event loop.

A unit of work is a plain function ``work(session) -> result``; ``Database.run`` commits when it
returns, rolls back when it raises, always closes the session, and turns "database unreachable"
into the domain error ``Unavailable`` (503) quickly instead of after a 30 s pool timeout.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from demo.common.errors import Unavailable
from demo.common.offload import Offloader

T = TypeVar("T")
log = logging.getLogger("demo.db")


def make_engine(url: str, *, pool_size: int = 8, connect_timeout: int = 2, pool_recycle: int = 1800,
                io_timeout: int = 30) -> Engine:
    """An engine tuned per backend: SQLite (embedded default) or MySQL/MariaDB via mysqlclient."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, pool_size)
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        query = dict(parsed.query)
        query.setdefault("charset", "utf8mb4")
        return create_engine(
            parsed.set(query=query),
            pool_size=pool_size,
            max_overflow=0,  # the DB thread pool has pool_size threads: nobody ever waits for a connection
            pool_timeout=connect_timeout,
            pool_pre_ping=True,  # a dead connection is replaced before use, not surfaced as a 500
            pool_recycle=pool_recycle,  # below MySQL's wait_timeout (8 h by default)
            isolation_level="READ COMMITTED",  # fewer gap locks; every rule here is a single-row check
            # Every unit of work ends in COMMIT or ROLLBACK (Database.run_sync), so the pool's extra
            # rollback on return was a wasted round trip per request.
            pool_reset_on_return=None,
            # A frozen server must not pin a worker thread for ever: reads and writes give up too.
            connect_args={"connect_timeout": connect_timeout, "read_timeout": io_timeout, "write_timeout": io_timeout},
        )
    return create_engine(parsed, pool_size=pool_size, max_overflow=0, pool_pre_ping=True)


def _sqlite_engine(url: str, pool_size: int) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        connect_args={"check_same_thread": False, "timeout": 15},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so that "begin" below decides how to begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: a read-then-write unit of work can never fail
        # with "database is locked" halfway (SQLite cannot upgrade a read lock while others read).
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def is_unreachable(error: BaseException) -> bool:
    """Errors that mean "the database cannot serve us now" rather than "this request is wrong"."""
    return isinstance(error, (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)) or (
        isinstance(error, exc.DBAPIError) and error.connection_invalidated
    )


def upsert_add(session: Session, model: Any, values: dict[str, Any], key: list[str], column: str) -> None:
    """INSERT ``values``, or add ``values[column]`` to the existing row: atomic, and the row stays
    locked until commit, so concurrent callers on one key are serialised (MySQL and SQLite alike)."""
    current = getattr(model, column)
    if session.get_bind().dialect.name in ("mysql", "mariadb"):
        stmt = mysql.insert(model).values(**values)
        stmt = stmt.on_duplicate_key_update({column: current + stmt.inserted[column]})
    else:
        stmt = sqlite.insert(model).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=key, set_={column: current + values[column]})
    session.execute(stmt)


class Database:
    def __init__(self, engine: Engine, offloader: Offloader) -> None:
        self.engine = engine
        self.offloader = offloader
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def run_sync(self, work: Callable[..., T], *args: Any) -> T:
        """Run one unit of work in this thread: commit on success, roll back on error, always close."""
        session: Session = self._sessions()
        try:
            result = work(session, *args)
            session.commit()
            return result
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """Run one unit of work on the DB thread pool; "unreachable" becomes ``Unavailable``."""
        try:
            return await self.offloader.db(self.run_sync, work, *args)
        except Exception as error:
            if is_unreachable(error):
                log.warning("database unavailable: %s", error.__class__.__name__, exc_info=log.isEnabledFor(10))
                raise Unavailable() from error
            raise

    async def ping(self) -> None:
        await self.run(lambda session: session.execute(text("SELECT 1")).scalar_one())

    def dispose(self) -> None:
        self.engine.dispose()
