"""All tables. Times are naive UTC (microsecond precision on MySQL too); migrations live in demo/migrations."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, MetaData, String
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from demo.common.accounts.tokens import new_public_id

# Stable constraint names so Alembic migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# MySQL DATETIME defaults to whole seconds; keep microseconds so ordering and expiry are exact.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# Image ids are case-sensitive secrets: MySQL's default collation would match them in any letter case.
ImageId = String(32).with_variant(mysql.VARCHAR(32, collation="utf8mb4_bin"), "mysql", "mariadb")
# SQLite only auto-increments INTEGER PRIMARY KEY, not BIGINT.
Id = BigInteger().with_variant(sqlite.INTEGER(), "sqlite")
# Random public ids, compared byte for byte (MySQL's default collation ignores letter case).
PublicId = String(22).with_variant(mysql.VARCHAR(22, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)  # internal: foreign keys only
    # The id clients see: a sequential one would tell anyone the number of users.
    public_id: Mapped[str] = mapped_column(PublicId, unique=True, default=new_public_id)
    # E.164, at most 15 digits and '+'. NULL once the account is frozen: its number went to a new holder.
    phone: Mapped[str | None] = mapped_column(String(16), unique=True, nullable=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    h5_visit_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    h5_last_visit_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    # Set by DELETE /users/me: the account is purged by housekeeping from then on, unless a login
    # before it clears it (the grace period). Indexed: housekeeping looks for the ones that are due.
    deletion_due_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True, index=True)
    # A frozen account: dormant (no login for the settings' dormant_account_after) when a code for its
    # number was used, so its number went to a fresh account of the code's holder (carriers recycle
    # numbers). It keeps the number here, to sign in with it and its password; it receives no codes.
    # Indexed: a password login that fails on the number's account tries the latest one frozen off it.
    former_phone: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    frozen_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    # Set by an operator (python -m demo.admin users disable): every session ended then, and a login
    # with the right password or code is refused (403 account_disabled) until it is cleared again.
    disabled_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class AuthSession(Base):
    """An app login: a device, as the user sees it in their list of sessions. Only the SHA-256 of the
    bearer token is stored; its H5 tickets and cookie sessions live only while it does.

    ``public_id``, ``last_used_at``, ``user_agent`` and ``ip`` came with the list of sessions: NULL in
    sessions made before (or by the previous release during a rolling upgrade), which get a public id
    the first time they are listed. ``last_used_at`` is kept to the minute (the token check writes it
    at most once a minute); ``ip`` is the network the login came from (IPv4 /24, IPv6 /48), never the
    address itself."""

    __tablename__ = "auth_sessions"
    # A unique index rather than a constraint: SQLite adds it without copying the table (a copy would
    # drop the table the H5 rows point at, and their ON DELETE CASCADE would empty them).
    __table_args__ = (Index("ix_auth_sessions_public_id", "public_id", unique=True),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    public_id: Mapped[str | None] = mapped_column(PublicId, nullable=True)  # the id clients see
    last_used_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    user_agent: Mapped[str | None] = mapped_column(String(255), nullable=True)
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True)  # "203.0.113.0/24", "2001:db8:1::/48"


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
    lang: Mapped[str | None] = mapped_column(String(16), nullable=True)  # the text's language; NULL: default
    provider: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the backend that took the text
    message_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # that provider's id for it


class SmsDailyCount(Base):
    """Codes texted and used, per day of the code (UTC) and phone prefix ("+" and 3 digits: the calling
    code is in it whole), added up by housekeeping as it deletes the texts a day after they went: the
    statistics of python -m demo.admin sms stats outlive the texts. No phone number is kept."""

    __tablename__ = "sms_daily_counts"

    sent_on: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD
    phone_prefix: Mapped[str] = mapped_column(String(4), primary_key=True)
    sent: Mapped[int] = mapped_column(Integer)
    used: Mapped[int] = mapped_column(Integer)


class RateCounter(Base):
    """Fixed-window counters shared by every process (SMS quotas, login failures)."""

    __tablename__ = "rate_counters"

    key: Mapped[str] = mapped_column(String(160), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    count: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp, index=True)


class Deployment(Base):
    """This deployment's identity, one row: its media store carries the same id, so a store can never
    serve (and sweep) for two databases (see images.bind_store)."""

    __tablename__ = "deployment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # always 1
    deployment_id: Mapped[str] = mapped_column(String(32))  # 128 random bits, hex
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    # Set once the store carries the id too: from then on a store without it is another store.
    store_bound_at: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)


class ImageBlob(Base):
    """Stored bytes, by content, written by this deployment. The row is the lock for its file: the
    file may go once no ``images`` row points at it (read there: images also go by cascade, when a
    user is deleted, which no counter here would see).

    ``source_sha256`` is the hash of the uploaded bytes this blob was made from (with what the decode
    found out), so that the same upload again is stored without decoding it again; NULL for blobs
    stored before it was kept."""

    __tablename__ = "image_blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The previous release's use count: still kept up by uploads and deletes because processes of that
    # release run beside this one during a rolling upgrade and decide by it. Read by nothing here (it
    # misses images deleted by SQL); the next release drops it.
    refs: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    source_sha256: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    format: Mapped[str | None] = mapped_column(String(8), nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ImageVariant(Base):
    """A thumbnail of a blob, by width: the row decides which host makes it (one claim per variant,
    across every host), and once ``ready`` it holds the object's size, so delivery never asks the
    store. ``building`` rows older than the rules' lease are taken over (their builder died)."""

    __tablename__ = "image_variants"

    sha256: Mapped[str] = mapped_column(
        String(64), ForeignKey("image_blobs.sha256", ondelete="CASCADE"), primary_key=True
    )
    width: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(8))  # building | ready
    claimed_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # set when ready


class Image(Base):
    """One upload: an opaque public id, its owner and the blob it points at."""

    __tablename__ = "images"
    __table_args__ = (Index("ix_images_owner_pk", "owner_id", "pk"),)

    pk: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)  # order and cursors
    id: Mapped[str] = mapped_column(ImageId, unique=True)  # 128 random bits, URL-safe
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
    lang: Mapped[str | None] = mapped_column(String(16), nullable=True)  # the app's language; NULL: default


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
    lang: Mapped[str | None] = mapped_column(String(16), nullable=True)  # from its ticket; NULL: default
