"""Migrations (demo/migrations) and models (demo/models.py) describe the same schema, on both databases;
processes that start together migrate once, under a lock that also holds on a Galera cluster (a row)."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError

from demo.common.infra import migrate
from demo.models import Base
from tests.helpers import make_test_engine, new_mysql_database

ROOT = Path(__file__).resolve().parents[3]
HEAD = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()


def test_migrations_match_models(database_url):
    engine = make_test_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "include_name": migrate.include_name}
            )
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], diff


def test_existing_users_get_distinct_random_public_ids(empty_database_url):
    """Users made before public ids existed get one each; the column is unique, letter case counting."""
    engine = make_test_engine(empty_database_url)
    try:
        migrate.upgrade(engine, "0003")
        insert = text(
            "INSERT INTO users (phone, password_hash, created_at, h5_visit_count) VALUES (:phone, 'x', :now, 0)"
        )
        with engine.begin() as conn:
            conn.execute(insert, [{"phone": f"+861886666{n:04d}", "now": dt.datetime(2026, 1, 1)} for n in range(3)])
        migrate.upgrade(engine)
        with engine.connect() as conn:
            ids = conn.execute(text("SELECT public_id FROM users ORDER BY id")).scalars().all()
        assert len(set(ids)) == 3 and all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids), ids
        twin = next(i for i in ids if i != i.swapcase())
        with engine.begin() as conn:  # another letter case is another id (MySQL compares bytes here)
            conn.execute(
                text(
                    "INSERT INTO users (public_id, phone, password_hash, created_at, h5_visit_count) "
                    "VALUES (:id, '+8618866669999', 'x', :now, 0)"
                ),
                {"id": twin.swapcase(), "now": dt.datetime(2026, 1, 1)},
            )
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE users SET public_id = :id WHERE phone = '+8618866669999'"), {"id": twin})
        command.downgrade(migrate.alembic_config(engine), "0003")
        assert "public_id" not in {c["name"] for c in inspect(engine).get_columns("users")}
    finally:
        engine.dispose()


def test_session_devices_keep_every_session_and_its_h5_rows(empty_database_url):
    """0009 adds the list-of-sessions columns in place: on SQLite a table copy of auth_sessions would
    have emptied h5_tickets and h5_sessions through their ON DELETE CASCADE."""
    engine = make_test_engine(empty_database_url)
    now = dt.datetime(2026, 1, 1)
    rows = [
        "INSERT INTO users (public_id, phone, password_hash, created_at, h5_visit_count)"
        " VALUES ('pub', '+8618866668888', 'x', :now, 0)",
        "INSERT INTO auth_sessions (user_id, token_hash, created_at, expires_at) VALUES (1, 't', :now, :now)",
        "INSERT INTO h5_tickets (ticket_hash, auth_session_id, created_at, expires_at) VALUES ('k', 1, :now, :now)",
        "INSERT INTO h5_sessions (cookie_hash, auth_session_id, ticket_id, created_at, expires_at)"
        " VALUES ('c', 1, 1, :now, :now)",
    ]
    counts = text(
        "SELECT (SELECT COUNT(*) FROM auth_sessions), (SELECT COUNT(*) FROM h5_tickets),"
        " (SELECT COUNT(*) FROM h5_sessions)"
    )
    try:
        migrate.upgrade(engine, "0008")
        with engine.begin() as conn:
            for row in rows:
                conn.execute(text(row), {"now": now})
        migrate.upgrade(engine, "0009")
        with engine.connect() as conn:
            assert tuple(conn.execute(counts).one()) == (1, 1, 1)
            session = conn.execute(text("SELECT public_id, last_used_at, user_agent, ip FROM auth_sessions")).one()
        assert tuple(session) == (None, None, None, None)  # named when first listed
        command.downgrade(migrate.alembic_config(engine), "0008")
        with engine.connect() as conn:
            assert tuple(conn.execute(counts).one()) == (1, 1, 1)
        assert "public_id" not in {c["name"] for c in inspect(engine).get_columns("auth_sessions")}
    finally:
        engine.dispose()


# -- once per deployment ---------------------------------------------------------------------------

MIGRATOR = """
import logging, sys, time
from demo.common.infra import migrate
from tests.helpers import make_test_engine
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
engine = make_test_engine(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start migrating at the same instant
migrate.upgrade(engine)
"""


def test_processes_starting_together_migrate_once(empty_database_url):
    """Four processes migrate one empty database at once: each migration runs once, all end at head."""
    start_at = str(time.time() + 3)  # after every interpreter has imported
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATOR, empty_database_url, start_at],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, outs
    ran = [line for out in outs for line in out.splitlines() if "Running upgrade" in line]
    revisions = list(ScriptDirectory.from_config(migrate.alembic_config()).walk_revisions())
    assert len(ran) == len(revisions) == len(set(ran)), ran
    if not empty_database_url.startswith("sqlite"):  # they did overlap (a file lock waits silently)
        assert any("waiting for the migration lock" in out for out in outs), outs
    engine = make_test_engine(empty_database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
            if engine.dialect.name != "sqlite":
                assert lock_rows(conn) == []  # released
    finally:
        engine.dispose()


@pytest.fixture
def mysql_engine(mysql_server_url):
    """An engine on a new, empty MariaDB database (the lock row is MySQL's; SQLite locks a file)."""
    with new_mysql_database(mysql_server_url) as url:
        engine = make_test_engine(url)
        yield engine
        engine.dispose()


def lock_rows(conn) -> list[tuple]:
    return [tuple(row) for row in conn.execute(text(f"SELECT id, holder FROM {migrate.LOCK_TABLE}"))]


def hold_lock(engine, holder: str, age_seconds: int) -> None:
    """Another process's lock row, taken ``age_seconds`` ago."""
    with engine.begin() as conn:
        conn.execute(migrate._CREATE)
        conn.execute(
            text(
                f"INSERT INTO {migrate.LOCK_TABLE} (id, holder, taken_at) "
                "VALUES (1, :holder, UTC_TIMESTAMP() - INTERVAL :age SECOND)"
            ),
            {"holder": holder, "age": age_seconds},
        )


def migrated(engine) -> bool:
    return "alembic_version" in inspect(engine).get_table_names()


@pytest.mark.mysql
def test_a_lock_row_held_by_a_live_process_makes_the_next_one_give_up_after_its_timeout(mysql_engine):
    hold_lock(mysql_engine, "other-host pid 7 cafe", age_seconds=5)
    began = time.monotonic()
    with pytest.raises(migrate.MigrationLockTimeout, match="another process has held the migration lock for too long"):
        migrate.upgrade(mysql_engine, timeout=1.5)
    assert 1.5 <= time.monotonic() - began < 5
    assert not migrated(mysql_engine)
    with mysql_engine.connect() as conn:
        assert lock_rows(conn) == [(1, "other-host pid 7 cafe")]  # not ours to release


@pytest.mark.mysql
def test_a_stale_lock_row_is_taken_over_logged_and_released(mysql_engine, caplog):
    """A migrator that died (killed, host gone) left its row: after the lease the next one migrates."""
    hold_lock(mysql_engine, "dead-host pid 9 beef", age_seconds=3600)
    with caplog.at_level("WARNING", logger="demo.migrate"):
        migrate.upgrade(mysql_engine, timeout=5)
    assert "took over the migration lock of dead-host pid 9 beef" in caplog.text
    with mysql_engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD
        assert lock_rows(conn) == []


@pytest.mark.mysql
def test_a_holder_that_migrates_longer_than_the_lease_keeps_the_lock(mysql_engine):
    """The heartbeat renews the row: a slow migration is not taken over, only a dead holder's row is."""
    other = make_test_engine(mysql_engine.url.render_as_string(hide_password=False))
    try:
        with migrate.migration_lock(mysql_engine, lease=2):
            time.sleep(3)  # longer than the lease
            with pytest.raises(migrate.MigrationLockTimeout):
                migrate.upgrade(other, timeout=1.5, lease=2)
        assert not migrated(mysql_engine)
        with mysql_engine.connect() as conn:
            assert lock_rows(conn) == []
    finally:
        other.dispose()


@pytest.mark.mysql
def test_the_lock_row_is_released_when_a_migration_fails(mysql_engine):
    with mysql_engine.begin() as conn:  # the first migration's table is in the way: 0001 fails
        conn.execute(text("CREATE TABLE users (id INT PRIMARY KEY)"))
    with pytest.raises(OperationalError, match="already exists"):
        migrate.upgrade(mysql_engine, timeout=1.5)
    with mysql_engine.connect() as conn:
        assert lock_rows(conn) == []
    with mysql_engine.begin() as conn:
        conn.execute(text("DROP TABLE users"))
    migrate.upgrade(mysql_engine, timeout=1.5)  # the next start is not held up by the failed one
    with mysql_engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD


@pytest.mark.mysql
def test_two_takers_at_once_one_wins_the_other_waits(mysql_engine):
    """Threads with their own engines race for the row many times: never two holders at once."""
    url = mysql_engine.url.render_as_string(hide_password=False)
    engines = [make_test_engine(url) for _ in range(3)]
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def contend(engine):
        try:
            for _ in range(5):
                with migrate.migration_lock(engine, timeout=30):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(0.02)
                    with guard:
                        inside[0] -= 1
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=contend, args=(engine,)) for engine in engines]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for engine in engines:
            engine.dispose()
    assert errors == [] and most[0] == 1
