"""demo/common/infra/db.py: units of work (ORM and ``sql_unit``), ``Sql`` on the DBAPI cursor, errors,
and idle-connection pings; on SQLite and MariaDB."""

from __future__ import annotations

import datetime as dt
from types import MappingProxyType

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.pool import NullPool

from demo.common.errors import Unavailable
from demo.common.infra import db as db_module
from demo.common.infra.db import Conflict, Database, Sql, SqlCursor, sql_unit, to_paramstyle
from demo.common.infra.offload import Offloader
from demo.models import RateCounter
from tests.helpers import sql_cursor

ADD = Sql(
    "INSERT INTO rate_counters (`key`, window_start, count, expires_at) VALUES (:key, :start, :count, :expires_at)"
)
READ = Sql(
    "SELECT count, expires_at FROM rate_counters WHERE `key` = :key ORDER BY window_start", datetimes=["expires_at"]
)
LATER = Sql("SELECT `key` FROM rate_counters WHERE expires_at > :after")
ANY = Sql("SELECT :x AS x")


def add(c: SqlCursor, key: str = "k", count: int = 1, expires_at: dt.datetime = dt.datetime(2026, 1, 1)) -> int:
    return c.execute(ADD, {"key": key, "start": 1, "count": count, "expires_at": expires_at})


def run(db: Database, unit, *args):
    return db.run_sync(sql_unit(unit), *args)


def test_to_paramstyle_names_become_the_drivers_own():
    sql = "SELECT a FROM t WHERE b = :b AND c LIKE 'x%' AND d = ':not' AND e::text = :e_2 AND f = 100 % 7"
    assert to_paramstyle(sql, "named") == sql
    assert to_paramstyle(sql, "pyformat") == (
        "SELECT a FROM t WHERE b = %(b)s AND c LIKE 'x%%' AND d = ':not' AND e::text = %(e_2)s AND f = 100 %% 7"
    )
    assert to_paramstyle("SELECT ':a''s :b', \"q:c\", :d", "pyformat") == "SELECT ':a''s :b', \"q:c\", %(d)s"
    with pytest.raises(ValueError):
        to_paramstyle(sql, "qmark")


def test_one_text_per_backend():
    upsert = Sql(sqlite="INSERT OR IGNORE INTO t VALUES (:a)", mysql="INSERT IGNORE INTO t VALUES (:a)")
    assert upsert.for_dialect("sqlite") == "INSERT OR IGNORE INTO t VALUES (:a)"
    assert upsert.for_dialect("mariadb") == upsert.for_dialect("mysql") == "INSERT IGNORE INTO t VALUES (%(a)s)"
    with pytest.raises(TypeError):
        Sql(sqlite="SELECT 1")  # every backend needs its text
    with pytest.raises(TypeError):
        Sql("SELECT 1", mysql="SELECT 1")


@pytest.mark.parametrize(
    "when",
    [dt.datetime(2026, 11, 22, 3, 4, 5, 678901), dt.datetime(2026, 11, 22, 3, 4, 5)],
    ids=["microseconds", "whole-seconds"],
)
def test_datetimes_round_trip_and_compare_as_the_orm_writes_them(app, when):
    db = app.services.db
    run(db, lambda c: add(c, count=7, expires_at=when))
    rows = run(db, lambda c: c.all(READ, {"key": "k"}))
    assert rows == [(7, when)] and rows[0].expires_at == when and rows[0].count == 7
    # Parameters compare on either side of the stored value.
    assert run(db, lambda c: c.all(LATER, {"after": when - dt.timedelta(microseconds=1)})) == [("k",)]
    assert run(db, lambda c: c.all(LATER, {"after": when})) == []
    # What the ORM wrote reads back alike through Sql, and what Sql wrote through the ORM.
    db.run_sync(lambda s: s.add(RateCounter(key="orm", window_start=1, count=1, expires_at=when)))
    assert run(db, lambda c: c.first(READ, {"key": "orm"})) == (1, when)
    assert db.run_sync(lambda s: s.scalar(select(RateCounter.expires_at).where(RateCounter.key == "k"))) == when
    later = when + dt.timedelta(microseconds=1)
    assert db.run_sync(
        lambda s: s.scalars(
            select(RateCounter.key).where(RateCounter.expires_at < later).order_by(RateCounter.key)
        ).all()
    ) == ["k", "orm"]


def test_rows_are_named_tuples_and_writes_say_what_they_did(app):
    db = app.services.db
    assert run(db, lambda c: c.first(ANY, {"x": 5})) == (5,)
    assert run(db, lambda c: c.first(ANY, {"x": 5})).x == 5
    assert run(db, lambda c: c.first(READ, {"key": "none"})) is None
    assert run(db, lambda c: add(c, "a") + add(c, "b")) == 2
    bump = Sql("UPDATE rate_counters SET count = count + 1 WHERE `key` LIKE :prefix")
    assert run(db, lambda c: c.execute(bump, {"prefix": "%", "unused": 1})) == 2  # extra parameters are ignored
    new_id = Sql(
        "INSERT INTO sms_codes (phone, purpose, code_hash, created_at, expires_at, attempts) "
        "VALUES (:phone, 'regist', '', :now, :now, 0)"
    )
    now = dt.datetime(2026, 1, 1)
    first = run(db, lambda c: c.insert(new_id, {"phone": "+1", "now": now}))
    assert run(db, lambda c: c.insert(new_id, {"phone": "+2", "now": now})) == first + 1


def test_an_integrity_violation_is_a_conflict_and_rolls_the_whole_unit_back(app):
    db = app.services.db

    def twice(c):
        add(c)
        add(c, "other")
        add(c)  # the same primary key again

    with pytest.raises(Conflict):
        run(db, twice)
    assert run(db, lambda c: c.all(READ, {"key": "other"})) == []  # nothing of the unit was kept
    assert run(db, add) == 1  # and the connection is fine afterwards

    def orm_twice(s):
        s.add(RateCounter(key="orm", window_start=1, count=1, expires_at=dt.datetime(2026, 1, 1)))
        sql_cursor(s).execute(ADD, {"key": "inside", "start": 1, "count": 1, "expires_at": dt.datetime(2026, 1, 1)})
        s.flush()
        s.add(RateCounter(key="orm", window_start=1, count=1, expires_at=dt.datetime(2026, 1, 1)))

    with pytest.raises(Conflict):  # the same from an ORM unit, and Sql inside it shares its transaction
        db.run_sync(orm_twice)
    assert run(db, lambda c: c.all(READ, {"key": "inside"})) == []


@pytest.mark.gen_test
async def test_any_other_error_rolls_back_and_passes_through(app):
    db = app.services.db

    @sql_unit
    def fails(c):
        add(c)
        raise KeyError("mine")

    with pytest.raises(KeyError):
        await db.run(fails)
    assert await db.run(sql_unit(lambda c: c.all(READ, {"key": "k"}))) == []


@pytest.mark.gen_test
async def test_an_unreachable_database_is_unavailable(tmp_path):
    offloader = Offloader(1)
    # A database in a folder that does not exist: connecting fails with the DBAPI's OperationalError.
    unreachable = Database(create_engine(f"sqlite:///{tmp_path}/nowhere/db.sqlite3", poolclass=NullPool), offloader)
    try:
        with pytest.raises(Unavailable):
            await unreachable.run(sql_unit(lambda c: c.first(ANY, {"x": 1})))
        with pytest.raises(Unavailable):
            await unreachable.run(lambda s: s.execute(select(1)).scalar())
    finally:
        offloader.shutdown()


def kill_pooled_connections(engine) -> int:
    """Kill, from a connection of its own, every connection of ``engine``'s database; how many."""
    admin = create_engine(engine.url, poolclass=NullPool)
    with admin.connect() as conn:
        ours = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
        others = (
            conn.exec_driver_sql(
                "SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id <> %s", (ours,)
            )
            .scalars()
            .all()
        )
        for other in others:
            conn.exec_driver_sql(f"KILL {int(other)}")
    admin.dispose()
    return len(others)


@pytest.mark.mysql
@pytest.mark.parametrize("database_url", ["mysql"], indirect=True)
def test_a_connection_that_died_while_idle_is_replaced_before_use(app, monkeypatch):
    db = app.services.db
    run(db, lambda c: c.first(ANY, {"x": 1}))
    assert kill_pooled_connections(db.engine) >= 1
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE", 0.0)  # every checkout now counts as idle: pinged
    assert run(db, lambda c: c.first(ANY, {"x": 2})) == (2,)


@pytest.mark.mysql
@pytest.mark.parametrize("database_url", ["mysql"], indirect=True)
def test_a_connection_that_died_in_steady_use_fails_once_then_is_replaced(app, monkeypatch):
    db = app.services.db
    run(db, lambda c: c.first(ANY, {"x": 1}))
    assert kill_pooled_connections(db.engine) >= 1
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE", 3600.0)  # used a moment ago: not pinged
    with pytest.raises(Unavailable):  # a 503, not a 500
        run(db, lambda c: c.first(ANY, {"x": 2}))
    assert run(db, lambda c: c.first(ANY, {"x": 3})) == (3,)
    assert kill_pooled_connections(db.engine) >= 1
    with pytest.raises(Unavailable):  # the same for an ORM unit
        db.run_sync(lambda s: s.execute(select(1)).scalar())
    assert db.run_sync(lambda s: s.execute(select(1)).scalar()) == 1


def test_to_paramstyle_refuses_backslash_escapes_and_comments_at_declaration():
    for statement in (
        "SELECT 'a\\'b' WHERE x = :x",
        "SELECT :x -- a comment",
        "SELECT /* c */ :x",
        "SELECT :x # mysql comment",
    ):
        with pytest.raises(ValueError):
            Sql(statement)
        with pytest.raises(ValueError):
            to_paramstyle(statement, "pyformat")
    assert Sql("SELECT '--', '/*', '#', :x").for_dialect("mysql") == "SELECT '--', '/*', '#', %(x)s"


@pytest.mark.gen_test
async def test_a_programming_error_is_not_unavailable(tmp_path):
    offloader = Offloader(1)
    db = Database(create_engine(f"sqlite:///{tmp_path}/db.sqlite3", poolclass=NullPool), offloader)
    try:
        for unit in (
            sql_unit(lambda c: c.first(Sql("SELEC :x"), {"x": 1})),
            sql_unit(lambda c: c.first(Sql("SELECT nope FROM sqlite_master"))),
            lambda s: s.execute(text("SELECT nope FROM sqlite_master")).scalar(),
        ):
            with pytest.raises(Exception) as raised:
                await db.run(unit)
            assert not isinstance(raised.value, Unavailable), raised.value
    finally:
        offloader.shutdown()


def test_a_non_dict_mapping_reaches_the_driver_as_a_dict():
    seen = []

    class Cursor:
        def execute(self, sql, params):
            seen.append(type(params))

    SqlCursor(Cursor(), "mysql").run(Sql("SELECT :x"), MappingProxyType({"x": 1}))
    assert seen == [dict]
