"""All tables. Times are naive UTC (microsecond precision on MySQL too); migrations live in demo/migrations."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, MetaData, String
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names so Alembic migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# MySQL DATETIME defaults to whole seconds; keep microseconds so ordering and expiry are exact.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# SQLite only auto-increments INTEGER PRIMARY KEY, not BIGINT.
Id = BigInteger().with_variant(sqlite.INTEGER(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    phone: Mapped[str] = mapped_column(String(16), unique=True)  # E.164, at most 15 digits and '+'
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    h5_visit_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    h5_last_visit_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class AuthSession(Base):
    """An app login. Only the SHA-256 of the bearer token is stored."""

    __tablename__ = "auth_sessions"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class SmsCode(Base):
    """A code sent by SMS, stored as an HMAC bound to phone and purpose."""

    __tablename__ = "sms_codes"
    __table_args__ = (Index("ix_sms_codes_phone_created", "phone", "created_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    phone: Mapped[str] = mapped_column(String(16))
    purpose: Mapped[str] = mapped_column(String(16))
    code_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    used_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class SmsOutbox(Base):
    """A text to send, written in the unit of work that issues its code; the outbox sender delivers it.

    ``status``: pending (due at ``next_attempt_at``), sending (claimed until ``next_attempt_at``),
    sent, failed (given up; its code is voided) or skipped (nothing to send, e.g. a reset code for an
    unknown phone: the row is written all the same, so both requests do the same work). ``code`` and
    ``text`` are blanked once the row is finished: a code is kept in clear only while it waits.
    """

    __tablename__ = "sms_outbox"
    __table_args__ = (Index("ix_sms_outbox_status_next_attempt_at", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    sms_code_id: Mapped[int] = mapped_column(ForeignKey("sms_codes.id", ondelete="CASCADE"), index=True)
    phone: Mapped[str] = mapped_column(String(16))
    purpose: Mapped[str] = mapped_column(String(16))
    code: Mapped[str | None] = mapped_column(String(16), nullable=True)
    text: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(8))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    sent_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(255), nullable=True)


class RateCounter(Base):
    """Fixed-window counters shared by every process (SMS quotas, login failures)."""

    __tablename__ = "rate_counters"

    key: Mapped[str] = mapped_column(String(160), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    count: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp, index=True)


class ImageBlob(Base):
    """Stored bytes, by content. ``refs`` counts the images rows using it; at 0 the file may go."""

    __tablename__ = "image_blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    refs: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)


class Image(Base):
    """One upload: an opaque public id, its owner and the blob it points at."""

    __tablename__ = "images"
    __table_args__ = (Index("ix_images_owner_pk", "owner_id", "pk"),)

    pk: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)  # order and cursors
    id: Mapped[str] = mapped_column(String(32), unique=True)  # 128 random bits, URL-safe
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64), ForeignKey("image_blobs.sha256"), index=True)
    format: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)


class H5Ticket(Base):
    """A one-time pass from an app session to an H5 page (single use, short-lived, stored hashed)."""

    __tablename__ = "h5_tickets"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    ticket_hash: Mapped[str] = mapped_column(String(64), unique=True)
    auth_session_id: Mapped[int] = mapped_column(ForeignKey("auth_sessions.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp, index=True)
    used_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class H5Session(Base):
    """A WebView's cookie session, born from one ticket exchange; dies with its app session."""

    __tablename__ = "h5_sessions"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    cookie_hash: Mapped[str] = mapped_column(String(64), unique=True)
    auth_session_id: Mapped[int] = mapped_column(ForeignKey("auth_sessions.id", ondelete="CASCADE"), index=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("h5_tickets.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp, index=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
