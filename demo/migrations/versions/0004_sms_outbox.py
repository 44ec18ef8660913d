"""sms_outbox: texts are written with their code and sent off the request path

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.INTEGER(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "sms_outbox",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("sms_code_id", Id, nullable=False),
        sa.Column("phone", sa.String(16), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("code", sa.String(16), nullable=True),
        sa.Column("text", sa.String(255), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", Timestamp, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("sent_at", Timestamp, nullable=True),
        sa.Column("last_error", sa.String(255), nullable=True),
        sa.ForeignKeyConstraint(
            ["sms_code_id"], ["sms_codes.id"], name=op.f("fk_sms_outbox_sms_code_id_sms_codes"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sms_outbox")),
    )
    op.create_index(op.f("ix_sms_outbox_sms_code_id"), "sms_outbox", ["sms_code_id"])
    op.create_index(op.f("ix_sms_outbox_status_next_attempt_at"), "sms_outbox", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("sms_outbox")
