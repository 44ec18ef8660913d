"""users.disabled_at: an account an operator disabled (python -m demo.admin users disable); sms_daily_counts:
codes texted and used per day and phone prefix, kept when housekeeping deletes the texts (sms stats)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # A plain ADD COLUMN, no batch table copy (see 0010: on SQLite a copy of users would drop the table
    # that sessions and images point at). Nullable, no backfill: no account is disabled before this
    # release, and the previous release, beside this one during a rolling upgrade, inserts users
    # without the column. No index: only the operator's commands and a login's own row read it.
    op.add_column("users", sa.Column("disabled_at", Timestamp, nullable=True))
    op.create_table(
        "sms_daily_counts",
        sa.Column("sent_on", sa.String(length=10), nullable=False),
        sa.Column("phone_prefix", sa.String(length=4), nullable=False),
        sa.Column("sent", sa.Integer(), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("sent_on", "phone_prefix", name=op.f("pk_sms_daily_counts")),
    )


def downgrade() -> None:
    op.drop_table("sms_daily_counts")
    op.drop_column("users", "disabled_at")  # SQLite 3.35+ drops a column in place, no table copy
