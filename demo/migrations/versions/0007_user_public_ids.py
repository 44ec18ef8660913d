"""users: random public ids (the sequential id told anyone the number of users)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

import secrets

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PublicId = sa.String(22).with_variant(mysql.VARCHAR(22, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
BATCH = 1000
_users = sa.table("users", sa.column("id", sa.BigInteger()), sa.column("public_id", sa.String(22)))


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("public_id", PublicId, nullable=True))
    _backfill(op.get_bind())
    with op.batch_alter_table("users") as batch:
        batch.alter_column("public_id", existing_type=PublicId, nullable=False)
        batch.create_unique_constraint(op.f("uq_users_public_id"), ["public_id"])


def _backfill(conn: sa.Connection) -> None:
    """A random public id (as tokens.new_public_id makes) for every existing user, a batch at a time."""
    assign = sa.update(_users).where(_users.c.id == sa.bindparam("user_id")).values(public_id=sa.bindparam("new_id"))
    while True:
        ids = conn.execute(sa.select(_users.c.id).where(_users.c.public_id.is_(None)).limit(BATCH)).scalars().all()
        if not ids:
            return
        conn.execute(assign, [{"user_id": user_id, "new_id": secrets.token_urlsafe(16)} for user_id in ids])


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint(op.f("uq_users_public_id"), type_="unique")
        batch.drop_column("public_id")
