"""Database access: one engine, units of work run on the DB thread pool, never on the event loop.

A unit of work is a plain function ``work(session) -> result``; ``Database.run`` commits when it
returns, rolls back when it raises, always closes the session, and turns "database unreachable"
into the domain error ``Unavailable`` (503) quickly instead of after a 30 s pool timeout.

The few units every request runs (token and H5 cookie checks, the home-page visit, the login) are
``work(cursor: Cursor)`` run by ``Database.run_direct``: ``Prepared`` Core statements, compiled once
per dialect, executed on the DBAPI cursor. SQLAlchemy's per-execution work (cache key, execution
context, result objects, Session state) cost 2-3x the CPU of those queries themselves (bench/README.md).
"""
from __future__ import annotations

import logging
import time
from collections import namedtuple
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.sql import ClauseElement
from sqlalchemy.orm import Session, sessionmaker

from demo.common.errors import Unavailable
from demo.common.infra.offload import Offloader

T = TypeVar("T")
log = logging.getLogger("demo.db")
# A pooled connection is pinged before use only after sitting idle this long. Pinging every checkout
# (pool_pre_ping) cost a round trip per unit of work; a busy pool's connections were used
# milliseconds ago. A connection that dies while in steady use fails its unit with Unavailable (503)
# once and is replaced.
PING_AFTER_IDLE = 5.0


def make_engine(url: str, *, pool_size: int = 8, connect_timeout: int = 2, pool_recycle: int = 1800,
                io_timeout: int = 30) -> Engine:
    """An engine tuned per backend: SQLite (embedded default) or MySQL/MariaDB via mysqlclient."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, pool_size)
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        query = dict(parsed.query)
        query.setdefault("charset", "utf8mb4")
        return _ping_idle_connections(create_engine(
            parsed.set(query=query),
            pool_size=pool_size,
            max_overflow=0,  # the DB thread pool has pool_size threads: nobody ever waits for a connection
            pool_timeout=connect_timeout,
            pool_recycle=pool_recycle,  # below MySQL's wait_timeout (8 h by default)
            isolation_level="READ COMMITTED",  # fewer gap locks; every rule here is a single-row check
            # Every unit of work ends in COMMIT or ROLLBACK (Database.run_sync), so the pool's extra
            # rollback on return was a wasted round trip per request.
            pool_reset_on_return=None,
            # A frozen server must not pin a worker thread for ever: reads and writes give up too.
            connect_args={"connect_timeout": connect_timeout, "read_timeout": io_timeout, "write_timeout": io_timeout},
        ))
    return create_engine(parsed, pool_size=pool_size, max_overflow=0, pool_pre_ping=True)


def _ping_idle_connections(engine: Engine) -> Engine:
    """Ping a connection at checkout only when it has been idle (PING_AFTER_IDLE); a dead one is
    replaced before use (DisconnectionError makes the pool retry), not surfaced as an error."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is not None and time.monotonic() - idle_since > PING_AFTER_IDLE:
            try:
                alive = engine.dialect.do_ping(dbapi_connection)
            except Exception as error:  # noqa: BLE001 - any failure means "use another connection"
                raise exc.DisconnectionError(str(error)) from error
            if not alive:
                raise exc.DisconnectionError("ping failed")

    return engine


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
    session.execute(upsert_add_statement(session.get_bind().dialect.name, model, values, key, column))


def upsert_add_statement(dialect: str, model: Any, values: dict[str, Any] | list[dict[str, Any]],
                         key: list[str], column: str) -> Any:
    """The statement of ``upsert_add`` for ``dialect`` (values may be ``bindparam``s, and a list of rows:
    they are inserted, and so locked, in the list's order)."""
    current = getattr(model, column)
    if dialect in ("mysql", "mariadb"):
        stmt = mysql.insert(model).values(values)
        return stmt.on_duplicate_key_update({column: current + stmt.inserted[column]})
    stmt = sqlite.insert(model).values(values)
    return stmt.on_conflict_do_update(index_elements=key, set_={column: current + stmt.excluded[column]})


class Prepared:
    """A Core statement compiled once per dialect, for ``Cursor``: positional SQL, the order of its
    parameters with their type conversions, and the result columns' conversions. Parameters are
    ``bindparam(name)``s given by name at each call; literals in the statement are fixed.
    ``statement`` may also be a function of the dialect's name, for statements that differ by backend."""

    def __init__(self, statement: ClauseElement | Callable[[str], ClauseElement]) -> None:
        self.statement = statement
        self._by_dialect: dict[str, _Compiled] = {}

    def compiled(self, dialect: Dialect) -> _Compiled:
        compiled = self._by_dialect.get(dialect.name)
        if compiled is None:
            statement = self.statement if isinstance(self.statement, ClauseElement) else self.statement(dialect.name)
            compiled = self._by_dialect[dialect.name] = _Compiled(statement, dialect)
        return compiled


class _Compiled:
    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if not dialect.positional or "POSTCOMPILE" in compiled.string:
            raise ValueError(f"cannot prepare for {dialect.name}: {compiled.string}")
        self.sql = compiled.string
        self.params = []  # (name, fixed value or None, bind processor or None), in SQL order
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            fixed = None if bind.required else bind.effective_value
            self.params.append((name if bind.required else None, fixed,
                                bind.type.dialect_impl(dialect).bind_processor(dialect)))
        columns = list(getattr(statement, "selected_columns", []))
        self.row = namedtuple("Row", [c.key for c in columns], rename=True) if columns else None
        processors = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns]
        self.processors = processors if any(processors) else None

    def arguments(self, values: Mapping[str, Any]) -> list[Any]:
        args = []
        for name, fixed, process in self.params:
            value = fixed if name is None else values[name]
            args.append(process(value) if process is not None and value is not None else value)
        return args

    def make_row(self, raw: tuple) -> Any:
        if self.processors is not None:
            raw = [p(v) if p is not None else v for p, v in zip(self.processors, raw)]
        return self.row._make(raw)


class Cursor:
    """What a ``run_direct`` unit of work gets: ``Prepared`` statements on one DBAPI cursor."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cursor = cursor
        self._dialect = dialect
        self.dialect = dialect.name

    def execute(self, prepared: Prepared, values: Mapping[str, Any] = {}) -> int:  # noqa: B006 - read only
        """Run a statement; returns the rows it matched (UPDATE, DELETE)."""
        self._run(prepared.compiled(self._dialect), values)
        return self._cursor.rowcount

    def insert(self, prepared: Prepared, values: Mapping[str, Any]) -> int:
        """Run an INSERT; returns the new row's autoincrement id."""
        self._run(prepared.compiled(self._dialect), values)
        return self._cursor.lastrowid

    def all(self, prepared: Prepared, values: Mapping[str, Any] = {}) -> list[Any]:  # noqa: B006
        """Run a SELECT; its rows as named tuples."""
        compiled = prepared.compiled(self._dialect)
        self._run(compiled, values)
        return [compiled.make_row(raw) for raw in self._cursor.fetchall()]

    def first(self, prepared: Prepared, values: Mapping[str, Any] = {}) -> Any:  # noqa: B006
        rows = self.all(prepared, values)
        return rows[0] if rows else None

    def _run(self, compiled: _Compiled, values: Mapping[str, Any]) -> None:
        self._cursor.execute(compiled.sql, compiled.arguments(values))


def _as_sqlalchemy_error(error: Exception, dialect: Dialect, invalidated: bool = False) -> exc.DBAPIError:
    """A DBAPI error as the SQLAlchemy error a Session would have raised (IntegrityError, ...)."""
    return exc.DBAPIError.instance(None, None, error, dialect.loaded_dbapi.Error,
                                   connection_invalidated=invalidated, dialect=dialect)


def session_cursor(session: Session) -> Cursor:
    """A ``Cursor`` inside an ORM unit of work: same connection, same transaction."""
    connection = session.connection()
    return Cursor(connection.connection.driver_connection.cursor(), connection.dialect)


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

    def run_direct_sync(self, work: Callable[..., T], *args: Any) -> T:
        """``run_sync`` for units of ``Prepared`` statements: ``work(cursor, *args)`` in one transaction.
        DBAPI errors come out as SQLAlchemy's (IntegrityError, OperationalError, ...), as from ``run_sync``."""
        dialect = self.engine.dialect
        try:
            connection = self.engine.raw_connection()
        except dialect.loaded_dbapi.Error as error:  # cannot connect (Engine.connect wraps this itself)
            raise _as_sqlalchemy_error(error, dialect) from error
        cursor = connection.cursor()
        try:
            if dialect.name == "sqlite":
                cursor.execute("BEGIN IMMEDIATE")  # as the engine's "begin" listener does for sessions
            result = work(Cursor(cursor, dialect), *args)
            connection.commit()
            return result
        except BaseException as error:
            invalidated = isinstance(error, dialect.loaded_dbapi.Error) and dialect.is_disconnect(
                error, connection.dbapi_connection, cursor)
            if invalidated:
                connection.invalidate(error)
            else:
                try:
                    connection.rollback()
                except dialect.loaded_dbapi.Error:
                    connection.invalidate()
            if isinstance(error, dialect.loaded_dbapi.Error):
                raise _as_sqlalchemy_error(error, dialect, invalidated) from error
            raise
        finally:
            try:
                cursor.close()
            except dialect.loaded_dbapi.Error:
                pass  # the connection is gone already (invalidated above)
            connection.close()

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """Run one unit of work on the DB thread pool; "unreachable" becomes ``Unavailable``."""
        return await self._offload(self.run_sync, work, *args)

    async def run_direct(self, work: Callable[..., T], *args: Any) -> T:
        """``run`` for ``work(cursor: Cursor, *args)`` units (see the module's docstring)."""
        return await self._offload(self.run_direct_sync, work, *args)

    async def _offload(self, runner: Callable[..., T], work: Callable[..., T], *args: Any) -> T:
        try:
            return await self.offloader.db(runner, work, *args)
        except Exception as error:
            if is_unreachable(error):
                log.warning("database unavailable: %s", error.__class__.__name__, exc_info=log.isEnabledFor(10))
                raise Unavailable() from error
            raise

    async def ping(self) -> None:
        await self.run(lambda session: session.execute(text("SELECT 1")).scalar_one())

    def dispose(self) -> None:
        self.engine.dispose()
