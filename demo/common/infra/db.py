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

A unit may run more than once: a deadlock's victim, a transaction Galera refused at certification, a
unit that met a Galera node not ready (1047) runs again from the start (``RETRIES``), and so does one
that lost its connection if it is marked ``@idempotent`` (a lost COMMIT may have committed). So a unit
never does anything outside the database that it cannot do twice; ``@calls_store`` marks those that
call the object store in their transaction. A request waits ``deadline`` (db_request_timeout) for a
unit, then answers 503 (``run``); units over whole tables are ``@long_work``, on connections of their
own with the long io timeout.

``Sql`` uses only documented interfaces: PEP 249 cursors, ``Engine.raw_connection``,
``Dialect.is_disconnect``, ``PoolProxiedConnection.invalidate``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import functools
import logging
import random
import re
import threading
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
    from demo.common.infra.metrics import Metrics
    from demo.conf.settings import Settings

T = TypeVar("T")
U = TypeVar("U", bound=Callable[..., Any])
_NO_PARAMS: Mapping[str, Any] = MappingProxyType({})
log = logging.getLogger("demo.db")
# A pooled connection is pinged before use only after sitting idle this long. Pinging every checkout
# (pool_pre_ping) cost a round trip per unit of work; a busy pool's connections were used
# milliseconds ago. A connection that dies while in steady use fails its unit with Unavailable (503)
# once and is replaced (an @idempotent unit runs again on a new connection instead).
PING_AFTER_IDLE = 5.0
# A unit of work that deadlocked, lost Galera's certification, met a node that is not ready, or (an
# @idempotent one) lost its connection runs again from the start, at most this often, after a pause of
# about RETRY_PAUSE, doubled each time (20, 40, 80 ms: a deadlock's winner commits in milliseconds).
RETRIES = 3
RETRY_PAUSE = 0.02
WATCH_EVERY = 0.05  # seconds: a request given up at its deadline answers at most this much later
DEADLOCK = 1213  # InnoDB's deadlock victim; also how Galera reports a transaction that failed certification
GALERA_NOT_READY = 1047  # "WSREP has not yet prepared node for application use": a node outside the primary component
# Galera's read causality for the app's connections (wsrep_sync_wait bit 1: SELECT, SHOW, BEGIN). A
# read waits until this node has applied every write the cluster committed before the read began, so
# a token, ticket or code written through one node is seen by a check that reaches another node a
# moment later. Writes need no such wait: certification refuses a write that conflicts with one this
# node has not applied yet (1213, run again). The cost is one causality message through the group per
# read. Measured on a one-node cluster (2000 token checks in a row): the median read took 20-100 us
# more (about 150 us without), but about one read in 300 waited for the group's next keepalive, up to
# evs.keepalive_period (1 s by default; 0.1 s with evs.keepalive_period=PT0.1S): within the request
# deadline, yet a cluster's operator should know it.
GALERA_SYNC_WAIT = 1


def make_engine(url: str, *, pool_size: int, connect_timeout: int, pool_recycle: int, io_timeout: int) -> Engine:
    """An engine tuned per backend: SQLite (embedded default) or MySQL/MariaDB via mysqlclient. The
    options are the settings' (db_pool_size, db_connect_timeout, db_pool_recycle, db_io_timeout or
    db_long_io_timeout): no defaults here, so that they are written once. On a Galera node (found at
    connect: ``@@wsrep_on``) each connection reads with causality (``GALERA_SYNC_WAIT``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, pool_size)
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        query = dict(parsed.query)
        query.setdefault("charset", "utf8mb4")
        return _galera_aware(
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


def engine_for(settings: Settings, pool_size: int | None = None, *, long_work: bool = False) -> Engine:
    """``make_engine`` on the settings' database and connection options; ``pool_size`` for a process
    that needs fewer connections than a server's (start-up, a command). ``long_work``: statements may
    run for db_long_io_timeout (migrations, copy-media, sweeps), not the request path's db_io_timeout."""
    return make_engine(
        settings.database_url,
        pool_size=settings.db_pool_size if pool_size is None else pool_size,
        connect_timeout=settings.db_connect_timeout,
        pool_recycle=settings.db_pool_recycle,
        io_timeout=settings.db_long_io_timeout if long_work else settings.db_io_timeout,
    )


def database_for(settings: Settings, offloader: Offloader, metrics: Metrics | None = None) -> Database:
    """A server's ``Database``: the request path's pool (db_pool_size connections, db_io_timeout), one
    long-work connection, requests held to db_request_timeout."""
    return Database(
        engine_for(settings),
        offloader,
        long_engine=engine_for(settings, pool_size=1, long_work=True),
        deadline=settings.db_request_timeout,
        metrics=metrics,
    )


def _galera_aware(engine: Engine) -> Engine:
    """Causal reads on a Galera node (``GALERA_SYNC_WAIT``), set once per connection: a server that is
    not a Galera node pays one query per new connection, none per unit of work. A node that is not
    ready (1047) counts as a lost connection for ORM units too, so the pool replaces it."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            try:
                cursor.execute("SELECT @@wsrep_on")
                row = cursor.fetchone()
            except engine.dialect.loaded_dbapi.OperationalError:  # MySQL has no wsrep variables (1193)
                row = None
            if row is not None and row[0]:
                cursor.execute(f"SET SESSION wsrep_sync_wait = {GALERA_SYNC_WAIT}")
        finally:
            cursor.close()

    @event.listens_for(engine, "handle_error")
    def _on_error(context: Any) -> None:
        if _code(context.original_exception) == GALERA_NOT_READY:
            context.is_disconnect = True

    return _ping_idle_connections(engine)


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
    """A ``sql_unit`` lost its connection (``Dialect.is_disconnect``), or its Galera node was not ready
    (1047): the connection was invalidated."""


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


def _code(error: BaseException) -> int | None:
    """The MySQL error number of a driver error (bare, wrapped by SQLAlchemy, or the cause of an
    ``_Invalidated``), or None."""
    if isinstance(error, _Invalidated) and error.__cause__ is not None:
        error = error.__cause__
    original: BaseException = error.orig if isinstance(error, exc.DBAPIError) and error.orig is not None else error
    code = original.args[0] if original.args and isinstance(original.args[0], int) else None
    return code


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


def idempotent(unit: U) -> U:
    """Mark ``unit`` as safe to run twice: read-only, or its writes leave the same rows when repeated.
    A connection lost while it runs, even at COMMIT (committed or not: nobody can tell), runs it again
    instead of answering 503; any other unit then answers 503."""
    unit.__dict__["idempotent"] = True
    return unit


def long_work(unit: U) -> U:
    """Mark ``unit`` as work over whole tables (sweeps, checks of every row): it runs on the long-work
    connections (db_long_io_timeout) and is never held to a request's deadline."""
    unit.__dict__["long_work"] = True
    return unit


def calls_store(unit: U) -> U:
    """Mark ``unit`` as calling the object store inside its transaction: a request's deadline bounds
    its wait for a DB thread, not its run, as the put of a large image to a remote store may well take
    longer than that deadline (the store's own timeout, s3_timeout, bounds it). Its calls must be safe
    to repeat: a deadlock runs the unit again from the start."""
    unit.__dict__["calls_store"] = True
    return unit


def is_marked(unit: Callable[..., Any], mark: str) -> bool:
    """Whether ``unit`` carries ``mark`` ("idempotent", "long_work", "calls_store")."""
    return getattr(unit, mark, False) is True


class Database:
    """Units of work on ``engine`` (the request path's connections) and ``long_engine`` (``@long_work``
    units: sweeps over whole tables, with the longer db_long_io_timeout). ``deadline`` is how long
    ``run`` waits for a unit on behalf of a request before it answers ``Unavailable``; None: no bound
    (a command, start-up)."""

    def __init__(
        self,
        engine: Engine,
        offloader: Offloader,
        *,
        long_engine: Engine | None = None,
        deadline: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.long_engine = engine if long_engine is None else long_engine
        self.offloader = offloader
        self.deadline = deadline
        self.metrics = metrics
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._long_sessions = (
            self._sessions if long_engine is None else sessionmaker(long_engine, expire_on_commit=False)
        )
        self._watched: collections.deque[_Call] = collections.deque()  # on the loop only
        self._watcher: asyncio.TimerHandle | None = None
        self._watcher_loop: asyncio.AbstractEventLoop | None = None

    def run_sync(self, unit: Callable[..., T], *args: Any) -> T:
        """Run one unit of work in this thread (see the module's docstring): commit on success, roll back
        on error, always close; run it again from the start on a deadlock or a lost certification, and
        on a lost connection if it is ``@idempotent`` (``RETRIES`` times at most). Raises ``Conflict``
        on an integrity violation and ``Unavailable`` when the database cannot serve us now; any other
        error of the unit as it is."""
        return self._run(unit, args, None)

    def _run(self, unit: Callable[..., T], args: tuple[Any, ...], call: _Call | None) -> T:
        long = is_marked(unit, "long_work")
        engine = self.long_engine if long else self.engine
        retries = 0
        while True:
            try:
                if call is not None and call.abandoned:
                    raise _Abandoned()  # waited for a thread past the deadline: its request has answered 503
                if is_sql_unit(unit):
                    return self._run_sql(engine, unit, args, call)
                return self._run_session(self._long_sessions if long else self._sessions, unit, args, call)
            except Exception as error:
                reason = self._again(error, unit)
                if reason is not None and retries < RETRIES:
                    pause = RETRY_PAUSE * 2**retries * random.uniform(0.5, 1.5)  # jittered: no lockstep
                    if call is None or (not call.abandoned and time.monotonic() + pause < call.ends):
                        retries += 1
                        if self.metrics is not None:
                            self.metrics.db_retries.labels(reason).inc()
                        log.debug("%s: %s, running it again (%d)", _name(unit), reason, retries)
                        # On a DB thread, never on the loop: the transaction that beat this one commits
                        # meanwhile, so that the next try is unlikely to meet it again.
                        time.sleep(pause)
                        continue
                translated = self._translate(error)
                if translated is None:
                    raise
                raise translated from error

    def _run_session(
        self, sessions: sessionmaker[Session], unit: Callable[..., T], args: tuple[Any, ...], call: _Call | None
    ) -> T:
        session: Session = sessions()
        try:
            result = unit(session, *args)
            if call is not None and call.abandoned:
                raise _Abandoned()  # its request answered 503 meanwhile: a commit now would be unannounced
            session.commit()
            return result
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def _run_sql(self, engine: Engine, unit: Callable[..., T], args: tuple[Any, ...], call: _Call | None) -> T:
        dialect = engine.dialect
        connection = engine.raw_connection()
        cursor = None
        try:
            cursor = connection.cursor()
            if dialect.name == "sqlite":
                cursor.execute("BEGIN IMMEDIATE")  # as the engine's "begin" listener does for sessions
            result = unit(SqlCursor(cursor, dialect.name), *args)
            if call is not None and call.abandoned:
                raise _Abandoned()  # as in _run_session
            connection.commit()
            return result
        except BaseException as error:
            if isinstance(error, dialect.loaded_dbapi.Error) and (
                _code(error) == GALERA_NOT_READY or dialect.is_disconnect(error, connection.dbapi_connection, cursor)
            ):
                connection.invalidate(error)  # the next checkout connects again, through the endpoint
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

    def _again(self, error: Exception, unit: Callable[..., Any]) -> str | None:
        """Why ``unit`` may run again after ``error`` (the metric's label), or None: it may not.

        - "deadlock": InnoDB chose this transaction as a deadlock's victim, or Galera refused it at
          certification (a conflicting write committed first on another node), both 1213: rolled back
          whole, so a fresh run is what the unit would have done a moment later.
        - "not_ready": a Galera node outside the primary component (1047): the statement was refused,
          nothing was done; the connection is invalidated, so the next one goes through the endpoint,
          usually to a node that is ready.
        - "lost": the connection died (2006, 2013, a KILL). If that happened at COMMIT, the
          transaction may have committed: only an ``@idempotent`` unit runs again.
        Not 1205 (a lock wait timeout): it came after innodb_lock_wait_timeout, and its caller gave
        up long before."""
        if isinstance(error, _Abandoned):
            return None
        code = _code(error)
        if code == DEADLOCK:
            return "deadlock"
        if code == GALERA_NOT_READY:  # in the unit (its connection invalidated), or while connecting
            return "not_ready"
        lost = isinstance(error, _Invalidated) or (isinstance(error, exc.DBAPIError) and error.connection_invalidated)
        if lost and is_marked(unit, "idempotent"):
            return "lost"
        return None

    def _translate(self, error: Exception) -> Exception | None:
        """``Conflict`` or ``Unavailable`` for an error of a unit of work, or None: as it is."""
        dbapi = self.engine.dialect.loaded_dbapi
        if isinstance(error, (exc.IntegrityError, dbapi.IntegrityError)):
            return Conflict(str(error))
        if isinstance(error, _Abandoned):
            return Unavailable()
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
        """``run_sync`` on the DB thread pool, within ``deadline`` when one is set: a unit still waiting
        for a thread then is never started, and a running one is not waited for (``Unavailable``; its
        transaction rolls back instead of committing, unless its COMMIT was already on its way). A
        ``@calls_store`` unit is bounded that way only until it starts (the store's timeout bounds
        the rest); a ``@long_work`` unit not at all."""
        if self.deadline is None or is_marked(unit, "long_work"):
            return await self.offloader.db(self._run, unit, args, None)
        loop = asyncio.get_running_loop()
        store = is_marked(unit, "calls_store")
        call = _Call(time.monotonic() + self.deadline, until_started=store)
        work = functools.partial(self._start_then_run if store else self._run, unit, args, call)
        call.future = future = loop.run_in_executor(self.offloader.db_pool, work)
        self._watch(loop, call)
        try:
            return await future
        except asyncio.CancelledError:
            if not call.abandoned:
                raise  # the request itself was cancelled
            if self.metrics is not None:
                self.metrics.db_deadline.inc()
            log.warning("%s: no answer from the database within %.1f s", _name(unit), self.deadline)
            raise Unavailable() from None
        finally:
            call.finished = True

    def _watch(self, loop: asyncio.AbstractEventLoop, call: _Call) -> None:
        """Have ``call`` given up at its deadline. One timer per process looks every WATCH_EVERY
        seconds, rather than one per unit (asyncio.timeout cost 15 us of CPU per unit, measured)."""
        if self._watcher_loop is not loop:  # a Database used again on another loop (tests)
            self._watched.clear()
            self._watcher, self._watcher_loop = None, loop
        self._watched.append(call)  # in deadline order: every call's deadline is now + self.deadline
        if self._watcher is None:
            self._watcher = loop.call_later(WATCH_EVERY, self._look, loop)

    def _look(self, loop: asyncio.AbstractEventLoop) -> None:
        watched, now = self._watched, time.monotonic()
        while watched and (watched[0].finished or watched[0].ends <= now):
            call = watched.popleft()
            if not call.finished and call.give_up() and call.future is not None:
                call.future.cancel()  # its awaiting request answers 503 now
        self._watcher = loop.call_later(WATCH_EVERY, self._look, loop) if watched else None

    def _start_then_run(self, unit: Callable[..., T], args: tuple[Any, ...], call: _Call) -> T:
        """A ``@calls_store`` unit: not started if its request gave up waiting for a thread, else run
        to the end (without the deadline: see ``run``)."""
        if not call.start():
            raise Unavailable()  # nobody waits for this answer any more
        return self._run(unit, args, None)

    async def ping(self) -> None:
        await self.run(_ping)

    def dispose(self) -> None:
        self.engine.dispose()
        if self.long_engine is not self.engine:
            self.long_engine.dispose()


class _Call:
    """One ``Database.run`` under a deadline: ``ends`` (time.monotonic()), ``abandoned`` once its
    request stopped waiting (set on the loop, read on the DB thread: a plain attribute suffices), or
    for a unit bounded only ``until_started``, once it stopped waiting for a thread."""

    __slots__ = ("abandoned", "ends", "finished", "future", "until_started", "_lock", "_started")

    def __init__(self, ends: float, *, until_started: bool) -> None:
        self.ends = ends
        self.until_started = until_started
        self.abandoned = False
        self.finished = False  # answered (on the loop)
        self.future: asyncio.Future[Any] | None = None
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> bool:
        """On the DB thread: False if the deadline passed before a thread took the unit."""
        with self._lock:
            self._started = not self.abandoned
            return self._started

    def give_up(self) -> bool:
        """On the loop, at the deadline: whether the request stops waiting (always, unless the unit
        is bounded only until it starts and has started)."""
        with self._lock:
            if not (self.until_started and self._started):
                self.abandoned = True
            return self.abandoned


class _Abandoned(Exception):
    """The request a unit of work ran for stopped waiting for it (``Database.deadline``)."""


@idempotent
def _ping(session: Session) -> None:
    session.execute(text("SELECT 1")).scalar_one()


def _name(unit: Callable[..., Any]) -> str:
    return getattr(unit, "__qualname__", repr(unit))
