"""auth_sessions: what the list of sessions shows (public id, last use, user agent, coarse network)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
PublicId = sa.String(22).with_variant(mysql.VARCHAR(22, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")


def upgrade() -> None:
    # Plain ADD COLUMN and CREATE INDEX, no batch table copy: on SQLite a copy drops auth_sessions, and
    # the ON DELETE CASCADE of h5_tickets and h5_sessions would empty them. Nullable, no backfill: the
    # previous release keeps inserting sessions without these columns during a rolling upgrade, and
    # sessions without a public id get one when they are first listed (queries.list_sessions).
    op.add_column("auth_sessions", sa.Column("public_id", PublicId, nullable=True))
    op.add_column("auth_sessions", sa.Column("last_used_at", Timestamp, nullable=True))
    op.add_column("auth_sessions", sa.Column("user_agent", sa.String(255), nullable=True))
    op.add_column("auth_sessions", sa.Column("ip", sa.String(64), nullable=True))
    op.create_index(op.f("ix_auth_sessions_public_id"), "auth_sessions", ["public_id"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_auth_sessions_public_id"), table_name="auth_sessions")
    for column in ("ip", "user_agent", "last_used_at", "public_id"):
        op.drop_column("auth_sessions", column)  # SQLite 3.35+ drops a column in place, no table copy
