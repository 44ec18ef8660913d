"""users.deletion_due_at: an account deletion waiting out its grace period (DELETE /users/me)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # Plain ADD COLUMN and CREATE INDEX, no batch table copy: on SQLite a copy of users would drop the
    # table that sessions and images point at, and their ON DELETE CASCADE would empty them. Nullable,
    # no backfill: no account is being deleted before this release, and the previous release, running
    # beside this one during a rolling upgrade, inserts users without the column.
    op.add_column("users", sa.Column("deletion_due_at", Timestamp, nullable=True))
    op.create_index(op.f("ix_users_deletion_due_at"), "users", ["deletion_due_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_users_deletion_due_at"), table_name="users")
    op.drop_column("users", "deletion_due_at")  # SQLite 3.35+ drops a column in place, no table copy
