"""store identity: a one-row deployment table; case-sensitive image ids

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # No row yet: the first server to start binds this database and its media store together
    # (images.bind_store), so an existing store and database are adopted as they are.
    op.create_table(
        "deployment",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("deployment_id", sa.String(32), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("store_bound_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment")),
    )
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        op.alter_column(
            "images",
            "id",
            existing_type=sa.String(32),
            existing_nullable=False,
            type_=mysql.VARCHAR(32, collation="utf8mb4_bin"),
        )


def downgrade() -> None:
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        op.alter_column(
            "images",
            "id",
            existing_type=mysql.VARCHAR(32, collation="utf8mb4_bin"),
            existing_nullable=False,
            type_=sa.String(32),
        )
    op.drop_table("deployment")
