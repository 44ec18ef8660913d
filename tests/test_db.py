"""demo/common/infra/db.py: units of Prepared statements on the DBAPI cursor, and idle-connection pings."""
from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import bindparam, create_engine, exc, insert, select
from sqlalchemy.pool import NullPool

from demo.common.infra import db as db_module
from demo.common.infra.db import Prepared, is_unreachable
from demo.models import RateCounter

_counters = RateCounter.__table__
ADD = Prepared(insert(_counters).values(key=bindparam("key"), window_start=bindparam("start"), count=bindparam("count"),
                                        expires_at=bindparam("expires_at")))
READ = Prepared(select(_counters.c.count, _counters.c.expires_at).where(_counters.c.key == bindparam("key"))
                .order_by(_counters.c.window_start))
LATER = Prepared(select(_counters.c.key).where(_counters.c.expires_at > bindparam("after")))


def test_values_round_trip_with_the_types_sqlalchemy_gives(app):
    db = app.services.db
    when = dt.datetime(2026, 11, 22, 3, 4, 5, 678901)
    db.run_direct_sync(lambda c: c.execute(ADD, {"key": "k", "start": 1, "count": 7, "expires_at": when}))
    rows = db.run_direct_sync(lambda c: c.all(READ, {"key": "k"}))
    assert rows == [(7, when)] and rows[0].expires_at == when  # microseconds kept, a datetime on both backends
    # Parameters go through the same conversions: comparisons on either side of the stored value.
    assert db.run_direct_sync(lambda c: c.all(LATER, {"after": when - dt.timedelta(microseconds=1)})) == [("k",)]
    assert db.run_direct_sync(lambda c: c.all(LATER, {"after": when})) == []


def test_an_error_rolls_the_whole_unit_back_and_comes_out_as_sqlalchemys(app):
    db = app.services.db
    row = {"key": "k", "start": 1, "count": 1, "expires_at": dt.datetime(2026, 1, 1)}

    def twice(c):
        c.execute(ADD, row)
        c.execute(ADD, {**row, "key": "other"})
        c.execute(ADD, row)  # the same primary key again

    with pytest.raises(exc.IntegrityError):
        db.run_direct_sync(twice)
    assert db.run_direct_sync(lambda c: c.all(READ, {"key": "other"})) == []  # nothing of the unit was kept
    db.run_direct_sync(lambda c: c.execute(ADD, row))  # and the connection is fine afterwards


def kill_pooled_connections(engine) -> int:
    """Kill, from a connection of its own, every connection of ``engine``'s database; how many."""
    admin = create_engine(engine.url, poolclass=NullPool)
    with admin.connect() as conn:
        ours = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
        others = conn.exec_driver_sql(
            "SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id <> %s", (ours,)).scalars().all()
        for other in others:
            conn.exec_driver_sql(f"KILL {int(other)}")
    admin.dispose()
    return len(others)


ANY = Prepared(select(bindparam("x")))


@pytest.mark.mysql
@pytest.mark.parametrize("database_url", ["mysql"], indirect=True)
def test_a_connection_that_died_while_idle_is_replaced_before_use(app, monkeypatch):
    db = app.services.db
    db.run_direct_sync(lambda c: c.first(ANY, {"x": 1}))
    assert kill_pooled_connections(db.engine) >= 1
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE", 0.0)  # every checkout now counts as idle: pinged
    assert db.run_direct_sync(lambda c: c.first(ANY, {"x": 2})) == (2,)


@pytest.mark.mysql
@pytest.mark.parametrize("database_url", ["mysql"], indirect=True)
def test_a_connection_that_died_in_steady_use_fails_once_then_is_replaced(app, monkeypatch):
    db = app.services.db
    db.run_direct_sync(lambda c: c.first(ANY, {"x": 1}))
    assert kill_pooled_connections(db.engine) >= 1
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE", 3600.0)  # used a moment ago: not pinged
    with pytest.raises(exc.OperationalError) as failed:
        db.run_direct_sync(lambda c: c.first(ANY, {"x": 2}))
    assert failed.value.connection_invalidated and is_unreachable(failed.value)  # a 503, not a 500
    assert db.run_direct_sync(lambda c: c.first(ANY, {"x": 3})) == (3,)
