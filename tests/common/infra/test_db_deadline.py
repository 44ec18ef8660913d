"""``Database.run``'s deadline on the DB thread pool (SQLite, then MariaDB): a unit that waited for a
thread past it is never started; a ``@calls_store`` unit, once started, is waited for to its end."""

from __future__ import annotations

import asyncio
import time

import pytest

from demo.common.errors import Unavailable
from demo.common.infra.db import Database, Sql, SqlCursor, calls_store, sql_unit
from demo.common.infra.offload import Offloader
from tests.helpers import make_test_engine

ADD = Sql("INSERT INTO rate_counters (`key`, window_start, count, expires_at) VALUES (:key, 1, 1, '2030-01-01')")
KEYS = Sql("SELECT `key` FROM rate_counters ORDER BY `key`")


@pytest.fixture
def db(database_url):
    """A Database with one DB thread and a 0.3 s deadline."""
    offloader = Offloader(1)
    database = Database(make_test_engine(database_url, pool_size=1), offloader, deadline=0.3)
    yield database
    offloader.shutdown()
    database.dispose()


def adding(key: str, seconds: float):
    """A unit that adds a row, then spends ``seconds`` as a slow object-store call would, off the loop."""

    def unit(c: SqlCursor) -> str:
        c.execute(ADD, {"key": key})
        time.sleep(seconds)  # the put of a large image to a slow store
        return key

    return sql_unit(unit)


@pytest.mark.gen_test(timeout=30)
async def test_units_queued_past_the_deadline_never_start_and_a_started_store_unit_finishes(db):
    started = time.monotonic()
    slow_put = asyncio.ensure_future(db.run(calls_store(adding("put", 1.5))))
    await asyncio.sleep(0.05)  # it holds the only thread now
    queued = [
        asyncio.ensure_future(db.run(adding("plain", 0))),
        asyncio.ensure_future(db.run(calls_store(adding("store", 0)))),
    ]
    for waiting in queued:
        with pytest.raises(Unavailable):
            await waiting
        assert time.monotonic() - started < 1.2  # at the deadline (0.3 s), not when the thread came free
    assert await slow_put == "put"  # past its deadline: a started store unit is waited for
    assert time.monotonic() - started >= 1.5
    rows = await db.run(sql_unit(lambda c: [row.key for row in c.all(KEYS)]))
    assert rows == ["put"]  # the queued units never ran


@pytest.mark.gen_test(timeout=30)
async def test_a_plain_unit_running_past_the_deadline_answers_503_and_does_not_commit(db):
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await db.run(adding("late", 1.5))
    assert time.monotonic() - started < 1.2
    await asyncio.sleep(1.5)  # it has finished meanwhile, and rolled back instead of committing
    assert await db.run(sql_unit(lambda c: c.all(KEYS))) == []
