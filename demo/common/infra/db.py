"""Database access: one engine, units of work run on the DB thread pool, never on the event loop.

A unit of work is a plain function. ``Database.run(unit, *args)`` runs it in one transaction: commit
when it returns, roll back when it raises, always close; an integrity violation comes out as
``Conflict``, "database unreachable" as the domain error ``Unavailable`` (503), quickly instead of
after a 30 s pool timeout. How a unit runs is the choice of the module that declares it:

- a plain unit is ``unit(session: Session, *args)``: the ORM and Core, public API only;
- a unit marked ``@sql_unit`` is ``unit(c: SqlCursor, *args)``: hand-written ``Sql`` on the DBAPI
  cursor, for the few units every request runs (token and H5 cookie checks, the home-page visit,
  the login). SQLAlchemy's per-execution work costs more CPU than those queries themselves
  (figures: bench/README.md).

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
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from demo.common.errors import Unavailable
from demo.common.infra.offload import Offloader

if TYPE_CHECKING:
    from demo.conf.settings import Settings

T = TypeVar("T")
U = TypeVar("U", bound=Callable[..., Any])
_NO_PARAMS: Mapping[str, Any] = MappingProxyType({})
log = logging.getLogger("demo.db")
# A pooled connection is pinged before use only after sitting idle this long. Pinging every checkout
# (pool_pre_ping) cost a round trip per unit of work; a busy pool's connections were used
# milliseconds ago. A connection that dies while in steady use fails its unit with Unavailable (503)
# once and is replaced.
PING_AFTER_IDLE = 5.0


def make_engine(url: str, *, pool_size: int, connect_timeout: int, pool_recycle: int, io_timeout: int) -> Engine:
    """An engine tuned per backend: SQLite (embedded default) or MySQL/MariaDB via mysqlclient. The
    options are the settings' (db_pool_size, db_connect_timeout, db_pool_recycle, db_io_timeout): no
    defaults here, so that they are written once."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, pool_size)
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        query = dict(parsed.query)
        query.setdefault("charset", "utf8mb4")
        return _ping_idle_connections(
            create_engine(
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
                connect_args={
                    "connect_timeout": connect_timeout,
                    "read_timeout": io_timeout,
                    "write_timeout": io_timeout,
                },
            )
        )
    return create_engine(parsed, pool_size=pool_size, max_overflow=0, pool_pre_ping=True)


def engine_for(settings: Settings, pool_size: int | None = None) -> Engine:
    """``make_engine`` on the settings' database and connection options; ``pool_size`` for a process
    that needs fewer connections than a server's (start-up, a command)."""
    return make_engine(
        settings.database_url,
        pool_size=settings.db_pool_size if pool_size is None else pool_size,
        connect_timeout=settings.db_connect_timeout,
        pool_recycle=settings.db_pool_recycle,
        io_timeout=settings.db_io_timeout,
    )


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


# SQLite reports a syntax error or a missing column as OperationalError too: only these messages mean
# "the database cannot serve us now" (locked or busy, disk I/O, the file cannot be opened).
_SQLITE_UNAVAILABLE = ("database is locked", "database table is locked", "busy", "disk i/o", "unable to open")
# mysqlclient reports an unknown column (1054) as OperationalError: a programming error, not an outage.
_MYSQL_PROGRAMMING = frozenset({1054})


def _operational_means_unavailable(error: BaseException) -> bool:
    """Whether a DBAPI OperationalError (bare or wrapped by SQLAlchemy) says the database is unavailable."""
    original: BaseException = error.orig if isinstance(error, exc.DBAPIError) and error.orig is not None else error
    if type(original).__module__.startswith("sqlite3"):
        message = str(original).lower()
        return any(marker in message for marker in _SQLITE_UNAVAILABLE)
    code = original.args[0] if original.args and isinstance(original.args[0], int) else None
    return code not in _MYSQL_PROGRAMMING


def is_unreachable(error: BaseException) -> bool:
    """Errors that mean "the database cannot serve us now" rather than "this request is wrong"."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, exc.OperationalError):
        return _operational_means_unavailable(error)
    return isinstance(error, (exc.InterfaceError, exc.TimeoutError))


class Conflict(Exception):
    """A unit of work broke a unique or foreign key constraint (the DBAPI's IntegrityError); rolled back."""


# -- hand-written SQL on the DBAPI cursor ----------------------------------------------------------

# What SQLAlchemy's SQLite DateTime stores (documented: microseconds always), so rows written by
# either path compare and sort alike.
SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"
# A quoted literal or identifier (copied as is), or a :name parameter (not a "::" cast, not "a:b").
_TOKEN = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|(?<![:\w]):([A-Za-z_]\w*)""")
_PARAMSTYLE = {"sqlite": "named", "mysql": "pyformat", "mariadb": "pyformat"}


_COMMENT = re.compile(r"--|/\*|#")


def check_tokens(text: str) -> None:
    """Refuse (ValueError) what ``to_paramstyle`` does not tokenize: a backslash inside a quoted literal
    (MySQL reads it as an escape, SQLite does not) and comments (``--``, ``/* */``, ``#``)."""
    end = 0
    for match in _TOKEN.finditer(text):
        if match.group(1) is None and "\\" in match.group(0):
            raise ValueError(f"backslash in a quoted literal: {match.group(0)!r}")
        if _COMMENT.search(text, end, match.start()):
            raise ValueError(f"comment in SQL: {text!r}")
        end = match.end()
    if _COMMENT.search(text, end):
        raise ValueError(f"comment in SQL: {text!r}")


def to_paramstyle(text: str, paramstyle: str) -> str:
    """``text`` with its ``:name`` parameters written in a DBAPI ``paramstyle`` ("named" or "pyformat";
    for "pyformat" every literal ``%`` is doubled, as ``%`` is the driver's format character).
    Backslash escapes and comments are refused (``check_tokens``)."""
    check_tokens(text)
    if paramstyle == "named":
        return text
    if paramstyle != "pyformat":
        raise ValueError(f"unsupported paramstyle {paramstyle!r}")

    def convert(match: re.Match[str]) -> str:
        name = match.group(1)
        return match.group(0).replace("%", "%%") if name is None else f"%({name})s"

    pieces, end = [], 0
    for match in _TOKEN.finditer(text):
        pieces += [text[end : match.start()].replace("%", "%%"), convert(match)]
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
        for each in (text, *by_backend.values()):
            if each is not None:
                check_tokens(each)  # at declaration, not at the first run
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


def _sqlite_value(value: dt.date) -> str:
    if isinstance(value, dt.datetime):
        # Naive (UTC) as everywhere here: isoformat gives SQLITE_DATETIME's text, faster than strftime.
        return value.isoformat(" ", "microseconds") if value.tzinfo is None else value.strftime(SQLITE_DATETIME)
    return value.isoformat()


class SqlCursor:
    """``Sql`` statements on one PEP 249 cursor, inside the caller's transaction."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self.cursor = cursor
        self.dialect = dialect
        self._sqlite = dialect == "sqlite"

    def run(self, sql: Sql, params: Mapping[str, Any]) -> Any:
        """Execute ``sql``; the DBAPI cursor, to read its results."""
        if self._sqlite:
            params = {
                name: _sqlite_value(value) if isinstance(value, dt.date) else value for name, value in params.items()
            }
        elif not isinstance(params, dict):
            params = dict(params)  # mysqlclient takes a dict, not any Mapping
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
        make = row._make  # type: ignore[attr-defined]
        if not parse:
            return [make(values) for values in raw]
        rows = []
        for values in raw:
            values = list(values)
            for i in parse:
                if values[i] is not None:
                    values[i] = dt.datetime.fromisoformat(values[i])
            rows.append(make(values))
        return rows

    def first(self, sql: Sql, params: Mapping[str, Any] = _NO_PARAMS) -> Row | None:
        """Run a SELECT; its first row, or None."""
        rows = self.all(sql, params)
        return rows[0] if rows else None


def sql_unit(unit: U) -> U:
    """Mark ``unit`` as taking a ``SqlCursor`` (not a Session): ``Database.run`` runs it on the DBAPI cursor."""
    unit.__dict__["sql_unit"] = True
    return unit


def is_sql_unit(unit: Callable[..., Any]) -> bool:
    return getattr(unit, "sql_unit", False) is True


class Database:
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
        cursor = None
        try:
            cursor = connection.cursor()
            if dialect.name == "sqlite":
                cursor.execute("BEGIN IMMEDIATE")  # as the engine's "begin" listener does for sessions
            result = unit(SqlCursor(cursor, dialect.name), *args)
            connection.commit()
            return result
        except BaseException as error:
            if isinstance(error, dialect.loaded_dbapi.Error) and dialect.is_disconnect(
                error, connection.dbapi_connection, cursor
            ):
                connection.invalidate(error)
                raise _Invalidated() from error
            try:
                connection.rollback()
            except dialect.loaded_dbapi.Error:
                connection.invalidate()
            raise
        finally:
            if cursor is not None:
                with contextlib.suppress(dialect.loaded_dbapi.Error):  # the connection is gone already (invalidated)
                    cursor.close()
            connection.close()

    def _translate(self, error: Exception) -> Exception | None:
        """``Conflict`` or ``Unavailable`` for an error of a unit of work, or None: as it is."""
        dbapi = self.engine.dialect.loaded_dbapi
        if isinstance(error, (exc.IntegrityError, dbapi.IntegrityError)):
            return Conflict(str(error))
        if (
            isinstance(error, (_Invalidated, dbapi.InterfaceError))
            or is_unreachable(error)
            or (isinstance(error, dbapi.OperationalError) and _operational_means_unavailable(error))
        ):
            log.warning(
                "database unavailable: %s",
                (error.__cause__ or error).__class__.__name__,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return Unavailable()
        return None

    async def run(self, unit: Callable[..., T], *args: Any) -> T:
        """``run_sync`` on the DB thread pool."""
        return await self.offloader.db(self.run_sync, unit, *args)

    async def ping(self) -> None:
        await self.run(lambda session: session.execute(text("SELECT 1")).scalar_one())

    def dispose(self) -> None:
        self.engine.dispose()
