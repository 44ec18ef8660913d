"""image_blobs: the hash of the upload each blob was made from, and what its decode found

Lets the same upload again be stored without decoding it again. Nothing to backfill: the uploaded
bytes of blobs stored before are not known (their columns stay NULL and they are never matched).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("image_blobs") as batch:
        batch.add_column(sa.Column("source_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("format", sa.String(8), nullable=True))
        batch.add_column(sa.Column("width", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("height", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("bytes", sa.BigInteger(), nullable=True))
        batch.create_index(op.f("ix_image_blobs_source_sha256"), ["source_sha256"])


def downgrade() -> None:
    with op.batch_alter_table("image_blobs") as batch:
        batch.drop_index(op.f("ix_image_blobs_source_sha256"))
        batch.drop_column("bytes")
        batch.drop_column("height")
        batch.drop_column("width")
        batch.drop_column("format")
        batch.drop_column("source_sha256")
