"""The SQL of accounts (SMS codes, users, app sessions): named units of work for ``Database.run``.

All on the fast path (``@sql_unit``, hand-written ``Sql``): the token check and the login run on
every call, and one style keeps the rest easy to follow. A unit raises ``RateLimited`` where a limit
refuses the request: the unit rolls back, so a refused request counts nowhere.
"""

from __future__ import annotations

import datetime as dt
import hmac
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from demo.common.errors import RateLimited
from demo.common.h5 import queries as h5_queries
from demo.common.infra import ratelimit
from demo.common.infra.db import Row, Sql, SqlCursor, idempotent, sql_unit
from demo.common.infra.ratelimit import Window
from demo.common.sms import queries as sms_queries

# -- statements --------------------------------------------------------------------------------------

TOKEN = Sql(
    "SELECT auth_sessions.id, auth_sessions.user_id, users.phone"
    " FROM auth_sessions JOIN users ON users.id = auth_sessions.user_id"
    " WHERE auth_sessions.token_hash = :token_hash AND auth_sessions.revoked_at IS NULL"
    " AND auth_sessions.expires_at > :now"
)
USER_ID = Sql("SELECT id FROM users WHERE phone = :phone")
NEW_USER = Sql(
    "INSERT INTO users (public_id, phone, password_hash, created_at, last_login_at, h5_visit_count)"
    " VALUES (:public_id, :phone, :password_hash, :now, :now, 0)"
)
PROFILE = Sql(
    "SELECT users.public_id, users.phone, users.created_at, users.last_login_at,"
    " (SELECT COUNT(images.pk) FROM images WHERE images.owner_id = users.id) AS image_count"
    " FROM users WHERE users.id = :user_id",
    datetimes=["created_at", "last_login_at"],
)
NEW_SESSION = Sql(
    "INSERT INTO auth_sessions (user_id, token_hash, created_at, expires_at)"
    " VALUES (:user_id, :token_hash, :now, :expires_at)"
)
REVOKE_SESSION = Sql("UPDATE auth_sessions SET revoked_at = :now WHERE id = :id")
REVOKE_SESSIONS = Sql("UPDATE auth_sessions SET revoked_at = :now WHERE user_id = :user_id AND revoked_at IS NULL")
SET_PASSWORD = Sql("UPDATE users SET password_hash = :password_hash WHERE id = :user_id")
SWEEP_SESSIONS = Sql("DELETE FROM auth_sessions WHERE expires_at < :before")

LAST_CODE = Sql("SELECT MAX(created_at) AS created_at FROM sms_codes WHERE phone = :phone", datetimes=["created_at"])
# A new code replaces any earlier one for the same phone and purpose.
EXPIRE_CODES = Sql(
    "UPDATE sms_codes SET expires_at = :now WHERE phone = :phone AND purpose = :purpose"
    " AND used_at IS NULL AND expires_at > :now"
)
NEW_CODE = Sql(
    "INSERT INTO sms_codes (phone, purpose, code_hash, created_at, expires_at, attempts)"
    " VALUES (:phone, :purpose, :code_hash, :now, :expires_at, 0)"
)
# The live code; concurrent uses of one code queue on its row lock, only the first sees it unused.
_LIVE_CODE = (
    "SELECT id, code_hash, attempts FROM sms_codes WHERE phone = :phone AND purpose = :purpose"
    " AND used_at IS NULL AND expires_at > :now ORDER BY created_at DESC, id DESC LIMIT 1"
)
LIVE_CODE = Sql(sqlite=_LIVE_CODE, mysql=f"{_LIVE_CODE} FOR UPDATE")
WRONG_GUESS = Sql("UPDATE sms_codes SET attempts = attempts + 1 WHERE id = :id")
USE_CODE = Sql("UPDATE sms_codes SET used_at = :now WHERE id = :id")
# A code's outbox rows go with it (ON DELETE CASCADE): never one the sender has not finished with.
SWEEP_CODES = Sql(
    "DELETE FROM sms_codes WHERE expires_at < :before AND NOT EXISTS (SELECT 1 FROM sms_outbox"
    " WHERE sms_outbox.sms_code_id = sms_codes.id AND sms_outbox.status IN (:pending, :sending))"
)

# A login attempt is counted in LOGIN_WINDOWS windows (ratelimit.window_params 0..3, in key order)
# before the password is checked; a client's remembered successes are windows 4 (now) and 5 (later).
LOGIN_WINDOWS = 4
TRUSTED, TRUSTED_NEXT = LOGIN_WINDOWS, LOGIN_WINDOWS + 1
# The user by phone (NULLs when there is none: the one-row table makes the row), then the counts of the
# login's windows, this attempt included, and of the client's remembered successes (NULL: none).
LOGIN_LOOKUP = Sql(
    "SELECT users.id, users.public_id, users.phone, users.password_hash, users.created_at,"
    f" {ratelimit.count_of(0)} AS by_client_count, {ratelimit.count_of(1)} AS by_phone_count,"
    f" {ratelimit.count_of(2)} AS by_phone_client_count, {ratelimit.count_of(3)} AS pace_count,"
    f" {ratelimit.count_of(TRUSTED)} AS trusted, {ratelimit.count_of(TRUSTED_NEXT)} AS trusted_next"
    " FROM (SELECT 1 AS one) AS one_row LEFT OUTER JOIN users ON users.phone = :phone",
    datetimes=["created_at"],
)
# Only while the hash is the one verified: a reset between the check and here leaves no row to match,
# so a login with the old password cannot outlive the reset that revoked the sessions.
RECORD_LOGIN = Sql(
    "UPDATE users SET last_login_at = :now, password_hash = COALESCE(:new_hash, password_hash)"
    " WHERE id = :user_id AND password_hash = :verified_hash"
)


# -- what the rules hand over -------------------------------------------------------------------------


@dataclass(frozen=True)
class NewGrant:
    """An app session and its first H5 ticket to create (only hashes of the secrets are stored)."""

    token_hash: str
    expires_at: dt.datetime
    ticket_hash: str
    ticket_expires_at: dt.datetime


@dataclass(frozen=True)
class CodeText:
    """What a code request stores: the code's keyed hash ("" when no code is issued), and the text to
    send with its code (None: the outbox row is written as skipped)."""

    code_hash: str
    text: str | None
    code: str | None


@dataclass(frozen=True)
class CodeRequest:
    phone: str
    purpose: str
    by_phone: Window  # counted first: it locks the phone's counter, serialising its requests
    by_client: Window
    resend_after: int  # seconds between two codes to one phone
    expires_at: dt.datetime


# -- units of work ------------------------------------------------------------------------------------


@sql_unit
def issue_code(c: SqlCursor, request: CodeRequest, now: dt.datetime, compose: Callable[[bool], CodeText]) -> None:
    """Count the request, refuse it within ``resend_after`` of the phone's last code, then store a new
    code (replacing the live one) and its outbox row, as ``compose(registered)`` makes them."""
    # The per-phone upsert comes first: it locks this phone's counter row, so concurrent requests
    # for one phone are serialised and the resend check below cannot be raced.
    ratelimit.hit(c, request.by_phone, now)
    last = c.first(LAST_CODE, {"phone": request.phone})
    last_sent = last.created_at if last is not None else None
    if last_sent is not None and (wait := (last_sent - now).total_seconds() + request.resend_after) > 0:
        raise RateLimited(math.ceil(wait), "Wait before asking for another code.")
    ratelimit.hit(c, request.by_client, now)
    made = compose(c.first(USER_ID, {"phone": request.phone}) is not None)
    params = {"phone": request.phone, "purpose": request.purpose, "now": now}
    c.execute(EXPIRE_CODES, params)
    code_id = c.insert(NEW_CODE, {**params, "code_hash": made.code_hash, "expires_at": request.expires_at})
    # The same row whether or not a text goes out, so both cost the same.
    sms_queries.enqueue(c, code_id, request.phone, request.purpose, now, text=made.text, code=made.code)


@sql_unit
def claim_code(
    c: SqlCursor, phone: str, purpose: str, code_hash: str, checks: Window, max_attempts: int, now: dt.datetime
) -> bool:
    """Count a code check against the client (``checks``; refused without a trace: the code keeps its
    tries), then spend the live code if ``code_hash`` is its hash: True, or False (a wrong guess counts
    against the code)."""
    ratelimit.hit(c, checks, now)
    row = c.first(LIVE_CODE, {"phone": phone, "purpose": purpose, "now": now})
    if row is None or not row.code_hash or row.attempts >= max_attempts:
        return False
    if not hmac.compare_digest(row.code_hash, code_hash):
        c.execute(WRONG_GUESS, {"id": row.id})
        return False
    c.execute(USE_CODE, {"id": row.id, "now": now})
    return True


def add_grant(c: SqlCursor, user_id: int, grant: NewGrant, now: dt.datetime) -> int:
    """Create ``grant`` for ``user_id``; the app session's id."""
    session_id = c.insert(
        NEW_SESSION, {"user_id": user_id, "token_hash": grant.token_hash, "now": now, "expires_at": grant.expires_at}
    )
    h5_queries.add_ticket(c, session_id, grant.ticket_hash, now, grant.ticket_expires_at)
    return session_id


@sql_unit
def register(
    c: SqlCursor,
    public_id: str,
    phone: str,
    password_hash: str,
    checks: Window,
    checked_at: dt.datetime,
    grant: NewGrant,
    now: dt.datetime,
) -> int:
    """A new user, signed in (``grant``); the app session's id. Refunds the code check counted at
    ``checked_at`` (only failed checks count against the client). ``Conflict`` when the phone (or the
    public id) is taken."""
    ratelimit.refund_one(c, checks, checked_at)
    user_id = c.insert(NEW_USER, {"public_id": public_id, "phone": phone, "password_hash": password_hash, "now": now})
    return add_grant(c, user_id, grant, now)


@sql_unit
def reserve_login(c: SqlCursor, phone: str, params: dict[str, Any], admit: Callable[[Row], None]) -> Row:
    """Count a login attempt in its windows (``params``: windows 0..3, and the client's remembered
    successes as windows 4 and 5), then return the user (NULLs when none) with the counts
    (``LOGIN_LOOKUP``), once ``admit`` accepted them (it raises RateLimited otherwise). The counters'
    rows stay locked to the commit: parallel attempts queue here, each sees the others, none slips
    past a limit."""
    ratelimit.reserve(c, params, LOGIN_WINDOWS)
    found = c.first(LOGIN_LOOKUP, {"phone": phone, **params})
    assert found is not None  # the one-row table makes a row
    admit(found)
    return found


@sql_unit
def record_login(
    c: SqlCursor,
    found: Row,
    new_hash: str | None,
    params: dict[str, Any],
    forget: str | None,
    remember: dict[str, Any] | None,
    grant: NewGrant,
    now: dt.datetime,
) -> int | None:
    """A good login of ``found`` (``reserve_login``'s row): record it (and ``new_hash``, a rehash), give
    its attempt back (``params``), forget the counter ``forget``, count a remembered success
    (``remember``: ``window_params`` of 2 windows) and create ``grant``; the app session's id. None, and
    nothing written, when the password changed since it was verified."""
    if not c.execute(
        RECORD_LOGIN, {"user_id": found.id, "verified_hash": found.password_hash, "now": now, "new_hash": new_hash}
    ):
        return None
    ratelimit.refund(c, params, LOGIN_WINDOWS)
    if forget is not None:
        ratelimit.forget(c, forget)
    if remember is not None:
        ratelimit.reserve(c, remember, 2)
    return add_grant(c, found.id, grant, now)


@sql_unit
def reset_password(
    c: SqlCursor,
    phone: str,
    password_hash: str,
    checks: Window,
    checked_at: dt.datetime,
    login_family: str,
    now: dt.datetime,
) -> bool:
    """Set the password of ``phone``'s user, end their app sessions, refund the code check and reset the
    login counters under ``login_family``; False if there is no such user (deleted since the code)."""
    user = c.first(USER_ID, {"phone": phone})
    if user is None:
        return False
    ratelimit.refund_one(c, checks, checked_at)
    c.execute(SET_PASSWORD, {"user_id": user.id, "password_hash": password_hash})
    c.execute(REVOKE_SESSIONS, {"user_id": user.id, "now": now})
    ratelimit.forget_family(c, login_family)
    return True


@sql_unit
@idempotent
def session_of_token(c: SqlCursor, token_hash: str, now: dt.datetime) -> Row | None:
    """The live app session of a token: its id, user_id and the user's phone; or None."""
    return c.first(TOKEN, {"token_hash": token_hash, "now": now})


@sql_unit
@idempotent  # sets the same time again
def revoke_session(c: SqlCursor, session_id: int, now: dt.datetime) -> None:
    c.execute(REVOKE_SESSION, {"id": session_id, "now": now})


@sql_unit
@idempotent
def profile(c: SqlCursor, user_id: int) -> Row | None:
    """The user's public_id, phone, created_at, last_login_at and image_count; None if there is none."""
    return c.first(PROFILE, {"user_id": user_id})


def sweep_codes(c: SqlCursor, before: dt.datetime) -> int:
    """Delete codes expired before ``before`` whose texts are finished."""
    return c.execute(SWEEP_CODES, {"before": before, "pending": sms_queries.PENDING, "sending": sms_queries.SENDING})


def sweep_sessions(c: SqlCursor, before: dt.datetime) -> int:
    """Delete app sessions expired before ``before`` (their tickets and H5 sessions go with them)."""
    return c.execute(SWEEP_SESSIONS, {"before": before})
