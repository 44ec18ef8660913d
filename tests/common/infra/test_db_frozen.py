"""A frozen database (a MariaDB server of this module's own, stopped with SIGSTOP as a hung host is):
every request answers 503 within 2 s, including those queued behind stuck ones, /readyz says so, and
the app serves again within 5 s of the server's return, without a restart. Units of work a request
gave up on roll back instead of committing; long work is not held to the request deadline."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from demo.common.errors import Unavailable
from demo.common.infra.db import Database, Sql, SqlCursor, engine_for, long_work, sql_unit
from demo.common.infra.offload import Offloader
from tests.helpers import emptied, migrated

pytestmark = pytest.mark.mysql

ADD = Sql("INSERT INTO rate_counters (`key`, window_start, count, expires_at) VALUES (:key, 1, 1, '2030-01-01')")
COUNT = Sql("SELECT COUNT(*) AS n FROM rate_counters WHERE `key` = :key")
SLEEP = Sql("SELECT SLEEP(:seconds) AS slept")


@pytest.fixture(scope="module")
def migrated_url(private_mariadb) -> str:
    return migrated(private_mariadb.database("demo_frozen"))


@pytest.fixture
def database_url(migrated_url, private_mariadb):
    """This module's database on its own server (every test starts empty, and thawed)."""
    yield emptied(migrated_url)
    private_mariadb.thaw()  # whatever the test did


async def timed(request) -> tuple[float, object]:
    started = time.monotonic()
    response = await request
    return time.monotonic() - started, response


@pytest.mark.gen_test(timeout=60)
async def test_a_frozen_database_answers_503_within_2_s_and_serves_again_within_5_s(app, api, user, private_mariadb):
    assert app.services.settings.db_pool_size == 4  # 20 requests: most wait for a thread behind stuck ones
    me = await api.get("/users/me", token=user.token)
    assert me.code == 200
    private_mariadb.freeze()
    answers = await asyncio.gather(*(timed(api.get("/users/me", token=user.token)) for _ in range(20)))
    for seconds, response in answers:
        assert response.code == 503 and response.error == "unavailable", response.body
        assert seconds < 2.0, [round(s, 2) for s, _ in answers]
    seconds, ready = await timed(api.get("/readyz"))
    assert ready.code == 503 and ready.json["checks"]["database"] == "unreachable", ready.body
    assert seconds < 2.0
    deadline_exceeded = app.services.metrics.registry.get_sample_value("demo_db_deadline_exceeded_total")
    assert deadline_exceeded >= 20

    private_mariadb.thaw()
    thawed = time.monotonic()
    while (answer := await api.get("/users/me", token=user.token)).code != 200:
        assert answer.code == 503, answer.body
        assert time.monotonic() - thawed < 5.0, "no answer within 5 s of the database's return"
        await asyncio.sleep(0.1)
    assert answer.json["user"]["id"] == user.id
    while (ready := await api.get("/readyz")).code != 200:
        assert time.monotonic() - thawed < 5.0, ready.body
        await asyncio.sleep(0.1)


@pytest.mark.gen_test(timeout=60)
async def test_a_unit_given_up_on_rolls_back_instead_of_committing_and_long_work_has_no_deadline(
    settings, database_url
):
    offloader = Offloader(2)
    db = Database(
        engine_for(settings),
        offloader,
        long_engine=engine_for(settings, pool_size=1, long_work=True),
        deadline=0.5,
    )
    try:

        @sql_unit
        def slow_write(c: SqlCursor) -> None:
            c.execute(ADD, {"key": "late"})
            c.first(SLEEP, {"seconds": 1.5})  # past the deadline, within the connection's io timeout (2 s)

        started = time.monotonic()
        with pytest.raises(Unavailable):
            await db.run(slow_write)
        assert time.monotonic() - started < 1.3
        await asyncio.sleep(1.5)  # the unit has finished its sleep meanwhile, and would have committed
        assert (await db.run(sql_unit(lambda c: c.first(COUNT, {"key": "late"})))).n == 0

        @long_work
        @sql_unit
        def sweep_like(c: SqlCursor) -> int:
            c.execute(ADD, {"key": "long"})
            return int(c.first(SLEEP, {"seconds": 3}).slept)  # longer than db_io_timeout too

        assert await db.run(sweep_like) == 0
        assert (await db.run(sql_unit(lambda c: c.first(COUNT, {"key": "long"})))).n == 1
    finally:
        offloader.shutdown()
        db.dispose()


def test_a_statement_longer_than_the_io_timeout_fails_on_the_request_path_and_not_for_long_work(settings):
    assert settings.db_io_timeout == 2 and settings.db_long_io_timeout >= 60
    request_path = engine_for(settings, pool_size=1)
    long_work_engine = engine_for(settings, pool_size=1, long_work=True)  # migrations, copy-media, sweeps
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError) as lost, request_path.connect() as conn:
            conn.execute(text("SELECT SLEEP(3)"))
        assert lost.value.orig.args[0] == 2013  # lost connection: the client gave up
        assert 1.5 < time.monotonic() - started < 2.9
        with long_work_engine.connect() as conn:
            assert conn.execute(text("SELECT SLEEP(3)")).scalar() == 0
    finally:
        request_path.dispose()
        long_work_engine.dispose()
