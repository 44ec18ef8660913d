"""Units of work that meet a deadlock, or lose their connection at COMMIT, on MariaDB (the shared server,
a throw-away database): run again from the start, or 503, as ``Database.run_sync`` says."""

from __future__ import annotations

import threading

import MySQLdb
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from demo.common.errors import Unavailable
from demo.common.infra import db as db_module
from demo.common.infra.db import Database, Sql, SqlCursor, idempotent, sql_unit
from tests.helpers import sql_cursor

pytestmark = [pytest.mark.mysql, pytest.mark.parametrize("database_url", ["mysql"], indirect=True)]

ADD = Sql("INSERT INTO rate_counters (`key`, window_start, count, expires_at) VALUES (:key, 1, 0, '2030-01-01')")
BUMP = Sql("UPDATE rate_counters SET count = count + 1 WHERE `key` = :key")
COUNT = Sql("SELECT count FROM rate_counters WHERE `key` = :key")
# Naturally idempotent: the same row whether it runs once or twice.
SET = Sql(
    "INSERT INTO rate_counters (`key`, window_start, count, expires_at) VALUES (:key, 1, 7, '2030-01-01')"
    " ON DUPLICATE KEY UPDATE count = 7"
)
CONNECTION_ID = Sql("SELECT CONNECTION_ID() AS id")


def retries(db: Database, reason: str) -> float:
    value = db.metrics.registry.get_sample_value("demo_db_retries_total", {"reason": reason})  # type: ignore[union-attr]
    return value or 0.0


def count(db: Database, key: str) -> int | None:
    row = db.run_sync(sql_unit(lambda c: c.first(COUNT, {"key": key})))
    return None if row is None else int(row.count)


def kill(url: str, connection_id: int) -> None:
    """``KILL`` a connection from a connection of its own, as an operator (or a dying node) would."""
    admin = create_engine(url, poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"KILL {int(connection_id)}"))
    admin.dispose()


def test_the_victim_of_a_deadlock_runs_again_from_the_start_and_both_commit_once(app):
    db = app.services.db
    for key in ("a", "b"):
        db.run_sync(sql_unit(lambda c, key=key: c.execute(ADD, {"key": key})))
    both_hold_one = threading.Barrier(2, timeout=10)
    runs = {"a-then-b": 0, "b-then-a": 0}

    def crossing(first: str, second: str):
        name = f"{first}-then-{second}"

        @sql_unit
        def unit(c: SqlCursor) -> str:
            runs[name] += 1
            c.execute(BUMP, {"key": first})
            if runs[name] == 1:
                both_hold_one.wait()  # each holds its first row: the second UPDATEs cross
            c.execute(BUMP, {"key": second})
            return name

        return unit

    results: list[str] = []
    errors: list[BaseException] = []

    def run(unit) -> None:
        try:
            results.append(db.run_sync(unit))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(crossing(*pair),)) for pair in (("a", "b"), ("b", "a"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert sorted(results) == ["a-then-b", "b-then-a"]
    assert sorted(runs.values()) == [1, 2]  # InnoDB chose one victim; it ran once more
    assert retries(db, "deadlock") == 1
    assert count(db, "a") == count(db, "b") == 2  # each unit's two bumps, the victim's first run undone


def test_a_unit_that_keeps_deadlocking_gives_up_after_the_retries_with_a_503(app):
    db = app.services.db
    runs = []

    @sql_unit
    def unlucky(c: SqlCursor) -> None:
        runs.append(1)
        c.execute(ADD, {"key": f"try{len(runs)}"})
        # What MySQLdb raises for a deadlock or a lost certification (the real victim is shown above).
        raise MySQLdb.OperationalError(1213, "Deadlock found when trying to get lock; try restarting transaction")

    with pytest.raises(Unavailable):
        db.run_sync(unlucky)
    assert len(runs) == 1 + db_module.RETRIES
    assert retries(db, "deadlock") == db_module.RETRIES
    assert [count(db, f"try{n}") for n in range(1, 5)] == [None] * 4  # every run rolled back


@pytest.mark.parametrize("orm", [False, True], ids=["sql_unit", "orm"])
def test_a_connection_lost_at_commit_runs_an_idempotent_unit_again_and_fails_any_other_with_503(app, database_url, orm):
    db = app.services.db
    runs = []

    def killed_before_commit(c: SqlCursor, key: str) -> str:
        runs.append(key)
        c.execute(SET, {"key": key})
        if len(runs) == 1:  # the first run's connection dies before its COMMIT arrives
            kill(database_url, c.first(CONNECTION_ID).id)
        return key

    def unit():  # a new function each time: the marks are attributes of the function
        if orm:
            return lambda session, key: killed_before_commit(sql_cursor(session), key)
        return sql_unit(lambda c, key: killed_before_commit(c, key))

    plain = unit()
    with pytest.raises(Unavailable):  # not idempotent: it might have committed, so 503 and no second run
        db.run_sync(plain, "plain")
    assert runs == ["plain"]
    assert count(db, "plain") is None  # the KILL rolled it back (as a commit lost on the wire may not)

    runs.clear()
    assert db.run_sync(idempotent(unit()), "again") == "again"
    assert runs == ["again", "again"]
    assert count(db, "again") == 7
    assert retries(db, "lost") == 1
