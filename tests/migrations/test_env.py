"""The Alembic environment (demo/migrations/env.py)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import text

from demo.common.infra import migrate
from tests.helpers import make_test_engine

NOW = dt.datetime(2026, 1, 1)
ROWS = [
    "INSERT INTO users (id, phone, password_hash, created_at, h5_visit_count)"
    " VALUES (1, '+8618866660001', 'x', :now, 0)",
    "INSERT INTO auth_sessions (id, user_id, token_hash, created_at, expires_at) VALUES (1, 1, 't', :now, :now)",
    "INSERT INTO h5_tickets (id, ticket_hash, auth_session_id, created_at, expires_at) VALUES (1, 'k', 1, :now, :now)",
    "INSERT INTO h5_sessions (id, cookie_hash, auth_session_id, ticket_id, created_at, expires_at)"
    " VALUES (1, 'c', 1, 1, :now, :now)",
    "INSERT INTO image_blobs (sha256, refs, created_at) VALUES ('ab', 1, :now)",
    "INSERT INTO images (pk, id, owner_id, sha256, format, width, height, bytes, created_at)"
    " VALUES (1, 'i', 1, 'ab', 'png', 1, 1, 1, :now)",
]
TABLES = ["users", "auth_sessions", "h5_tickets", "h5_sessions", "image_blobs", "images"]


def counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in TABLES}


def test_upgrading_a_table_others_reference_keeps_their_rows(empty_database_url):
    """0007 rebuilds ``users`` on SQLite (copy, drop, rename): the drop must not cascade to sessions,
    H5 rows and images, and foreign keys are on again for the server afterwards."""
    engine = make_test_engine(empty_database_url)
    try:
        migrate.upgrade(engine, "0006")
        with engine.begin() as conn:
            for row in ROWS:
                conn.execute(text(row), {"now": NOW})
        before = counts(engine)
        migrate.upgrade(engine)
        assert counts(engine) == before == dict.fromkeys(TABLES, 1)
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    finally:
        engine.dispose()
