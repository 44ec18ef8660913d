"""images: content-addressed blobs and one row per upload

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.INTEGER(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "image_blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("refs", sa.Integer(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_image_blobs")),
    )
    op.create_table(
        "images",
        sa.Column("pk", Id, autoincrement=True, nullable=False),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner_id", Id, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("format", sa.String(8), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name=op.f("fk_images_owner_id_users"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["sha256"], ["image_blobs.sha256"], name=op.f("fk_images_sha256_image_blobs")),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_images")),
        sa.UniqueConstraint("id", name=op.f("uq_images_id")),
    )
    op.create_index("ix_images_owner_pk", "images", ["owner_id", "pk"])
    op.create_index(op.f("ix_images_sha256"), "images", ["sha256"])


def downgrade() -> None:
    op.drop_table("images")
    op.drop_table("image_blobs")
