"""Database access: one engine, units of work run on the DB thread pool, never on the event loop.

A unit of work is a plain function. ``Database.run(unit, *args)`` runs it in one transaction: commit
when it returns, roll back when it raises, always close; an integrity violation comes out as
``Conflict``, "database unreachable" as the domain error ``Unavailable`` (503), quickly instead of
after a 30 s pool timeout. How a unit runs is the choice of the module that declares it:

- a plain unit is ``unit(session: Session, *args)``: the ORM and Core, public API only;
- a unit marked ``@sql_unit`` is ``unit(c: SqlCursor, *args)``: hand-written ``Sql`` on the DBAPI
  cursor, for the few units every request runs (token and H5 cookie checks, the home-page visit,
  the login). SQLAlchemy's per-execution work costs more CPU than those queries themselves
  (figures: bench/README.md). Inside a plain unit, ``sql_cursor(session)`` runs ``Sql`` on the
  session's own connection and transaction.

``Sql`` uses only documented interfaces: PEP 249 cursors, ``Engine.raw_connection``,
``Dialect.is_disconnect``, ``PoolProxiedConnection.invalidate``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import time
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import ClauseElement

from demo.common.errors import Unavailable
from demo.common.infra.offload import Offloader

T = TypeVar("T")
U = TypeVar("U", bound=Callable[..., Any])
_NO_PARAMS: Mapping[str, Any] = MappingProxyType({})
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
            except Exception as error:
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


class _Invalidated(Exception):
    """A ``sql_unit`` lost its connection (``Dialect.is_disconnect``): the connection was invalidated."""


def is_unreachable(error: BaseException) -> bool:
    """Errors that mean "the database cannot serve us now" rather than "this request is wrong"."""
    return isinstance(error, (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)) or (
        isinstance(error, exc.DBAPIError) and error.connection_invalidated
    )


class Conflict(Exception):
    """A unit of work broke a unique or foreign key constraint (the DBAPI's IntegrityError); rolled back."""


# -- hand-written SQL on the DBAPI cursor ----------------------------------------------------------

# What SQLAlchemy's SQLite DateTime stores (documented: microseconds always), so rows written by
# either path compare and sort alike.
SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"
# A quoted literal or identifier (copied as is), or a :name parameter (not a "::" cast, not "a:b").
_TOKEN = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|(?<![:\w]):([A-Za-z_]\w*)""")
_PARAMSTYLE = {"sqlite": "named", "mysql": "pyformat", "mariadb": "pyformat"}


def to_paramstyle(text: str, paramstyle: str) -> str:
    """``text`` with its ``:name`` parameters written in a DBAPI ``paramstyle`` ("named" or "pyformat";
    for "pyformat" every literal ``%`` is doubled, as ``%`` is the driver's format character)."""
    if paramstyle == "named":
        return text
    if paramstyle != "pyformat":
        raise ValueError(f"unsupported paramstyle {paramstyle!r}")

    def convert(match: re.Match[str]) -> str:
        name = match.group(1)
        return match.group(0).replace("%", "%%") if name is None else f"%({name})s"

    pieces, end = [], 0
    for match in _TOKEN.finditer(text):
        pieces += [text[end:match.start()].replace("%", "%%"), convert(match)]
        end = match.end()
    return "".join(pieces) + text[end:].replace("%", "%%")


class Row(tuple):  # type: ignore[type-arg]
    """A result row: a named tuple with a field per column (``cursor.description``)."""

    def __getattr__(self, name: str) -> Any: ...  # for the type checker: fields are found by name


class Sql:
    """A hand-written statement with ``:name`` parameters, for a ``SqlCursor``.

    ``Sql(text)`` is one text for every backend; ``Sql(sqlite=..., mysql=...)`` one per backend (the
    "mysql" text serves MariaDB too). The text is written once per backend in its DBAPI's paramstyle.
    Parameters are passed by name at each call (extra names are ignored). On SQLite, datetime
    parameters are written as SQLAlchemy's DateTime writes them, and the result columns named in
    ``datetimes`` are read back as datetimes (mysqlclient returns datetimes itself)."""

    def __init__(self, text: str | None = None, /, *, datetimes: Iterable[str] = (), **by_backend: str) -> None:
        unknown = set(by_backend) - {"sqlite", "mysql"}
        if unknown or (text is None) == (not by_backend) or (by_backend and len(by_backend) < 2):
            raise TypeError("Sql(text) or Sql(sqlite=..., mysql=...)")
        self.text = text
        self.by_backend = by_backend
        self.datetimes = frozenset(datetimes)
        self._prepared: dict[str, str] = {}
        self._rows: dict[str, tuple[type[Row], tuple[int, ...]]] = {}

    def for_dialect(self, dialect: str) -> str:
        """The statement as the DBAPI of ``dialect`` takes it."""
        sql = self._prepared.get(dialect)
        if sql is None:
            backend = "mysql" if dialect in ("mysql", "mariadb") else dialect
            text = self.text if self.text is not None else self.by_backend.get(backend)
            if text is None or dialect not in _PARAMSTYLE:
                raise ValueError(f"no SQL for {dialect}")
            sql = self._prepared[dialect] = to_paramstyle(text, _PARAMSTYLE[dialect])
        return sql

    def row_type(self, dialect: str, description: Sequence[Sequence[Any]]) -> tuple[type[Row], tuple[int, ...]]:
        """The named tuple of this statement's rows, and the positions of the datetimes to parse."""
        if dialect not in self._rows:
            names = [column[0] for column in description]
            missing = self.datetimes - set(names)
            if missing:
                raise ValueError(f"datetimes {sorted(missing)} are not among the result's columns {names}")
            parse = tuple(i for i, name in enumerate(names) if name in self.datetimes) if dialect == "sqlite" else ()
            self._rows[dialect] = (_named_tuple(names), parse)
        return self._rows[dialect]

    def __repr__(self) -> str:
        return f"Sql({self.text or self.by_backend!r})"


def _named_tuple(names: list[str]) -> Any:
    return namedtuple("Row", names, rename=True)  # fields known at run time only


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.strftime(SQLITE_DATETIME)
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _sqlite_datetime(value: Any) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


class SqlCursor:
    """``Sql`` statements on one PEP 249 cursor, inside the caller's transaction."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self.cursor = cursor
        self.dialect = dialect
        self._sqlite = dialect == "sqlite"

    def run(self, sql: Sql, params: Mapping[str, Any]) -> Any:
        """Execute ``sql``; the DBAPI cursor, to read its results."""
        if self._sqlite:
            params = {name: _sqlite_value(value) for name, value in params.items()}
        self.cursor.execute(sql.for_dialect(self.dialect), params)
        return self.cursor

    def execute(self, sql: Sql, params: Mapping[str, Any] = _NO_PARAMS) -> int:
        """Run an UPDATE, DELETE, ...; the number of rows it matched."""
        return int(self.run(sql, params).rowcount)

    def insert(self, sql: Sql, params: Mapping[str, Any] = _NO_PARAMS) -> int:
        """Run an INSERT; the new row's autoincrement id."""
        return int(self.run(sql, params).lastrowid)

    def all(self, sql: Sql, params: Mapping[str, Any] = _NO_PARAMS) -> list[Row]:
        """Run a SELECT; its rows."""
        cursor = self.run(sql, params)
        raw = cursor.fetchall()
        row, parse = sql.row_type(self.dialect, cursor.description)
        if parse:
            raw = [[_sqlite_datetime(v) if i in parse else v for i, v in enumerate(r)] for r in raw]
        return [row._make(r) for r in raw]  # type: ignore[attr-defined]

    def first(self, sql: Sql, params: Mapping[str, Any] = _NO_PARAMS) -> Row | None:
        """Run a SELECT; its first row, or None."""
        rows = self.all(sql, params)
        return rows[0] if rows else None


def sql_cursor(session: Session) -> SqlCursor:
    """A ``SqlCursor`` inside a plain (ORM) unit of work: the session's connection and transaction."""
    connection = session.connection()
    driver_connection: Any = connection.connection.driver_connection
    return SqlCursor(driver_connection.cursor(), connection.dialect.name)


def sql_unit(unit: U) -> U:
    """Mark ``unit`` as taking a ``SqlCursor`` (not a Session): ``Database.run`` runs it on the DBAPI cursor."""
    unit.__dict__["sql_unit"] = True
    return unit


def is_sql_unit(unit: Callable[..., Any]) -> bool:
    return getattr(unit, "sql_unit", False) is True


# -- legacy: Prepared Core statements compiled with SQLAlchemy internals -----------------------------
# Still used by images/rules.py on main; the images branch moves it to images/queries.py (Sql). Once
# both are merged, delete from here to "end of legacy", and the _Legacy base of Database.

def upsert_add_statement(dialect: str, model: Any, values: dict[str, Any] | list[dict[str, Any]],
                         key: list[str], column: str) -> Any:
    """The statement of ``upsert_add`` for ``dialect`` (values may be ``bindparam``s, and a list of rows:
    they are inserted, and so locked, in the list's order)."""
    current = getattr(model, column)
    if dialect in ("mysql", "mariadb"):
        on_mysql = mysql.insert(model).values(values)
        return on_mysql.on_duplicate_key_update({column: current + on_mysql.inserted[column]})
    on_sqlite = sqlite.insert(model).values(values)
    return on_sqlite.on_conflict_do_update(index_elements=key, set_={column: current + on_sqlite.excluded[column]})

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

    def execute(self, prepared: Prepared, values: Mapping[str, Any] = {}) -> int:
        """Run a statement; returns the rows it matched (UPDATE, DELETE)."""
        self._run(prepared.compiled(self._dialect), values)
        return self._cursor.rowcount

    def insert(self, prepared: Prepared, values: Mapping[str, Any]) -> int:
        """Run an INSERT; returns the new row's autoincrement id."""
        self._run(prepared.compiled(self._dialect), values)
        return self._cursor.lastrowid

    def all(self, prepared: Prepared, values: Mapping[str, Any] = {}) -> list[Any]:
        """Run a SELECT; its rows as named tuples."""
        compiled = prepared.compiled(self._dialect)
        self._run(compiled, values)
        return [compiled.make_row(raw) for raw in self._cursor.fetchall()]

    def first(self, prepared: Prepared, values: Mapping[str, Any] = {}) -> Any:
        rows = self.all(prepared, values)
        return rows[0] if rows else None

    def _run(self, compiled: _Compiled, values: Mapping[str, Any]) -> None:
        self._cursor.execute(compiled.sql, compiled.arguments(values))


def _as_sqlalchemy_error(error: Exception, dialect: Dialect, invalidated: bool = False) -> exc.DBAPIError:
    """A DBAPI error as the SQLAlchemy error a Session would have raised (IntegrityError, ...)."""
    return exc.DBAPIError.instance(None, None, error, dialect.loaded_dbapi.Error,
                                   connection_invalidated=invalidated, dialect=dialect)


class _Legacy:
    engine: Engine
    offloader: Offloader

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

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


# -- end of legacy -----------------------------------------------------------------------------------


class Database(_Legacy):
    def __init__(self, engine: Engine, offloader: Offloader) -> None:
        self.engine = engine
        self.offloader = offloader
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def run_sync(self, unit: Callable[..., T], *args: Any) -> T:
        """Run one unit of work in this thread (see the module's docstring): commit on success, roll back
        on error, always close. Raises ``Conflict`` on an integrity violation and ``Unavailable`` when
        the database cannot serve us now; any other error of the unit as it is."""
        try:
            if is_sql_unit(unit):
                return self._run_sql(unit, *args)
            return self._run_session(unit, *args)
        except Exception as error:
            translated = self._translate(error)
            if translated is None:
                raise
            raise translated from error

    def _run_session(self, unit: Callable[..., T], *args: Any) -> T:
        session: Session = self._sessions()
        try:
            result = unit(session, *args)
            session.commit()
            return result
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def _run_sql(self, unit: Callable[..., T], *args: Any) -> T:
        dialect = self.engine.dialect
        connection = self.engine.raw_connection()
        cursor = connection.cursor()
        try:
            if dialect.name == "sqlite":
                cursor.execute("BEGIN IMMEDIATE")  # as the engine's "begin" listener does for sessions
            result = unit(SqlCursor(cursor, dialect.name), *args)
            connection.commit()
            return result
        except BaseException as error:
            if isinstance(error, dialect.loaded_dbapi.Error) and dialect.is_disconnect(
                    error, connection.dbapi_connection, cursor):
                connection.invalidate(error)
                raise _Invalidated() from error
            try:
                connection.rollback()
            except dialect.loaded_dbapi.Error:
                connection.invalidate()
            raise
        finally:
            with contextlib.suppress(dialect.loaded_dbapi.Error):  # the connection is gone already (invalidated)
                cursor.close()
            connection.close()

    def _translate(self, error: Exception) -> Exception | None:
        """``Conflict`` or ``Unavailable`` for an error of a unit of work, or None: as it is."""
        dbapi = self.engine.dialect.loaded_dbapi
        if isinstance(error, (exc.IntegrityError, dbapi.IntegrityError)):
            return Conflict(str(error))
        if isinstance(error, _Invalidated) or is_unreachable(error) or isinstance(
                error, (dbapi.OperationalError, dbapi.InterfaceError)):
            log.warning("database unavailable: %s", (error.__cause__ or error).__class__.__name__,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            return Unavailable()
        return None

    async def run(self, unit: Callable[..., T], *args: Any) -> T:
        """``run_sync`` on the DB thread pool."""
        return await self.offloader.db(self.run_sync, unit, *args)

    async def ping(self) -> None:
        await self.run(lambda session: session.execute(text("SELECT 1")).scalar_one())

    def dispose(self) -> None:
        self.engine.dispose()
