"""image_variants: one row per thumbnail decides which host makes it and holds its size

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # No rows: thumbnails already in a local store are adopted (a ready row with their size) the
    # first time they are asked for, instead of being made again.
    op.create_table(
        "image_variants",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("claimed_at", Timestamp, nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["sha256"],
            ["image_blobs.sha256"],
            name=op.f("fk_image_variants_sha256_image_blobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sha256", "width", name=op.f("pk_image_variants")),
    )


def downgrade() -> None:
    op.drop_table("image_variants")
