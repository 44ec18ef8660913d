"""Migrations (demo/migrations) and models (demo/models.py) describe the same schema, on both databases."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from demo.common.infra import migrate
from demo.models import Base
from tests.helpers import make_test_engine


def test_migrations_match_models(database_url):
    engine = make_test_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
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
