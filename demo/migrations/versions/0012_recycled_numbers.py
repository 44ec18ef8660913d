"""users: frozen accounts of recycled numbers (phone nullable, former_phone, frozen_at)

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # New nullable columns, no backfill: no account is frozen before this release, and the previous
    # release, running beside this one during a rolling upgrade, inserts users without them (and always
    # with a phone). Making phone nullable is the one change SQLite can only make with a table copy
    # (batch mode): env.py turns foreign keys off around it, so the copy empties no referencing table.
    op.add_column("users", sa.Column("former_phone", sa.String(16), nullable=True))
    op.add_column("users", sa.Column("frozen_at", Timestamp, nullable=True))
    op.create_index(op.f("ix_users_former_phone"), "users", ["former_phone"], unique=False)
    with op.batch_alter_table("users") as batch:
        batch.alter_column("phone", existing_type=sa.String(16), nullable=True)


def downgrade() -> None:
    # A frozen account has no phone and cannot get its number back (its new holder has it): refuse
    # rather than delete accounts, which the operator decides about (move them to a new number first).
    frozen = op.get_bind().execute(sa.text("SELECT COUNT(*) FROM users WHERE phone IS NULL")).scalar_one()
    if frozen:
        raise RuntimeError(f"{frozen} frozen accounts have no phone: delete them, or move them to a number, first")
    with op.batch_alter_table("users") as batch:
        batch.alter_column("phone", existing_type=sa.String(16), nullable=False)
    op.drop_index(op.f("ix_users_former_phone"), table_name="users")
    op.drop_column("users", "frozen_at")  # SQLite 3.35+ drops a column in place, no table copy
    op.drop_column("users", "former_phone")
