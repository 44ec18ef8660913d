"""h5: tickets, cookie sessions, visit counters on users

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.INTEGER(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("h5_visit_count", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("h5_last_visit_at", Timestamp, nullable=True))
    op.create_table(
        "h5_tickets",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("ticket_hash", sa.String(64), nullable=False),
        sa.Column("auth_session_id", Id, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.Column("used_at", Timestamp, nullable=True),
        sa.ForeignKeyConstraint(
            ["auth_session_id"],
            ["auth_sessions.id"],
            name=op.f("fk_h5_tickets_auth_session_id_auth_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_h5_tickets")),
        sa.UniqueConstraint("ticket_hash", name=op.f("uq_h5_tickets_ticket_hash")),
    )
    op.create_index(op.f("ix_h5_tickets_auth_session_id"), "h5_tickets", ["auth_session_id"])
    op.create_index(op.f("ix_h5_tickets_expires_at"), "h5_tickets", ["expires_at"])
    op.create_table(
        "h5_sessions",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("cookie_hash", sa.String(64), nullable=False),
        sa.Column("auth_session_id", Id, nullable=False),
        sa.Column("ticket_id", Id, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.Column("revoked_at", Timestamp, nullable=True),
        sa.ForeignKeyConstraint(
            ["auth_session_id"],
            ["auth_sessions.id"],
            name=op.f("fk_h5_sessions_auth_session_id_auth_sessions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["ticket_id"], ["h5_tickets.id"], name=op.f("fk_h5_sessions_ticket_id_h5_tickets"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_h5_sessions")),
        sa.UniqueConstraint("cookie_hash", name=op.f("uq_h5_sessions_cookie_hash")),
    )
    op.create_index(op.f("ix_h5_sessions_auth_session_id"), "h5_sessions", ["auth_session_id"])
    op.create_index(op.f("ix_h5_sessions_expires_at"), "h5_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_table("h5_sessions")
    op.drop_table("h5_tickets")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("h5_last_visit_at")
        batch.drop_column("h5_visit_count")
