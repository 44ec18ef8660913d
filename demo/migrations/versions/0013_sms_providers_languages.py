"""SMS providers and languages: the outbox records the provider, its message id and the text's
language; H5 tickets and their cookie sessions carry the app's language

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns added in place, no backfill: the previous release, running beside this one
    # during a rolling upgrade, writes rows without them, and NULL means "the default language" and
    # "no provider took it yet".
    op.add_column("sms_outbox", sa.Column("lang", sa.String(16), nullable=True))
    op.add_column("sms_outbox", sa.Column("provider", sa.String(32), nullable=True))
    op.add_column("sms_outbox", sa.Column("message_id", sa.String(64), nullable=True))
    op.add_column("h5_tickets", sa.Column("lang", sa.String(16), nullable=True))
    op.add_column("h5_sessions", sa.Column("lang", sa.String(16), nullable=True))


def downgrade() -> None:
    # SQLite 3.35+ drops a column in place, no table copy
    op.drop_column("h5_sessions", "lang")
    op.drop_column("h5_tickets", "lang")
    op.drop_column("sms_outbox", "message_id")
    op.drop_column("sms_outbox", "provider")
    op.drop_column("sms_outbox", "lang")
