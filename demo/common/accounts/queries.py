"""The SQL of accounts (SMS codes, users, app sessions and their list, password and phone changes):
named units of work for ``Database.run``.

All on the fast path (``@sql_unit``, hand-written ``Sql``): the token check and the login run on
every call, and one style keeps the rest easy to follow. A unit raises ``RateLimited`` where a limit
refuses the request: the unit rolls back, so a refused request counts nowhere.

The units that change a user's sessions or credentials (sign-outs, password and phone changes, a
deletion and its purge) lock the user's row first, as a login's ``record_login`` does with its UPDATE:
one user's changes and logins take their turns there, so none sees another half done, and (on
MariaDB) no two of them lock the same rows in opposite orders.

An account whose deletion is final (``deletion_due_at`` passed) is gone for logins at once, though
housekeeping purges it a little later: ``LOGIN_LOOKUP`` does not see it and ``RECORD_LOGIN`` does not
match it. Before that, a login clears the deletion (the grace period).
"""

from __future__ import annotations

import datetime as dt
import hmac
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from demo.common.accounts.tokens import new_public_id
from demo.common.errors import AccountDisabled, InvalidCredentials, RateLimited, Unauthorized
from demo.common.h5 import queries as h5_queries
from demo.common.i18n import N_
from demo.common.images import queries as image_queries
from demo.common.infra import ratelimit
from demo.common.infra.db import Row, Sql, SqlCursor, idempotent, long_work, sql_unit
from demo.common.infra.ratelimit import Window
from demo.common.sms import queries as sms_queries

if TYPE_CHECKING:
    from demo.common.sms.costguard import SendGuard, UseGuard, Verdict

# -- statements --------------------------------------------------------------------------------------

# A frozen account's phone is the number it had (and signs in with); ``frozen`` says it is one.
TOKEN = Sql(
    "SELECT auth_sessions.id, auth_sessions.user_id, COALESCE(users.phone, users.former_phone) AS phone,"
    " (users.phone IS NULL) AS frozen,"
    " (auth_sessions.last_used_at IS NULL OR auth_sessions.last_used_at < :stale) AS stale"
    " FROM auth_sessions JOIN users ON users.id = auth_sessions.user_id"
    " WHERE auth_sessions.token_hash = :token_hash AND auth_sessions.revoked_at IS NULL"
    " AND auth_sessions.expires_at > :now"
)
# Written by the token check only when the session's last use is older than :stale (once a minute):
# the SELECT above, which says whether it is (a flag, not the time: nothing to parse), is what every
# request costs.
TOUCH_SESSION = Sql(
    "UPDATE auth_sessions SET last_used_at = :now WHERE id = :id AND (last_used_at IS NULL OR last_used_at < :stale)"
)
NEW_USER = Sql(
    "INSERT INTO users (public_id, phone, password_hash, created_at, last_login_at, h5_visit_count)"
    " VALUES (:public_id, :phone, :password_hash, :now, :now, 0)"
)
PROFILE = Sql(
    "SELECT users.public_id, COALESCE(users.phone, users.former_phone) AS phone, (users.phone IS NULL) AS frozen,"
    " users.created_at, users.last_login_at,"
    " (SELECT COUNT(images.pk) FROM images WHERE images.owner_id = users.id) AS image_count"
    " FROM users WHERE users.id = :user_id",
    datetimes=["created_at", "last_login_at"],
)
NEW_SESSION = Sql(
    "INSERT INTO auth_sessions (user_id, token_hash, created_at, expires_at, public_id, last_used_at, user_agent, ip)"
    " VALUES (:user_id, :token_hash, :now, :expires_at, :public_id, :now, :user_agent, :ip)"
)
REVOKE_SESSION = Sql("UPDATE auth_sessions SET revoked_at = :now WHERE id = :id")
REVOKE_SESSIONS = Sql("UPDATE auth_sessions SET revoked_at = :now WHERE user_id = :user_id AND revoked_at IS NULL")
SET_PASSWORD = Sql("UPDATE users SET password_hash = :password_hash WHERE id = :user_id")
# The user's row, locked to the commit (SQLite: the unit's BEGIN IMMEDIATE already holds the database).
_USER_ROW = "SELECT id FROM users WHERE id = :user_id"
LOCK_USER = Sql(sqlite=_USER_ROW, mysql=f"{_USER_ROW} FOR UPDATE")
LIVE_SESSION = Sql(
    "SELECT id FROM auth_sessions WHERE id = :id AND user_id = :user_id AND revoked_at IS NULL AND expires_at > :now"
)
# The list of sessions shows at most this many, the most recently used first.
SESSIONS_LISTED = 100
LIST_SESSIONS = Sql(
    "SELECT id, public_id, created_at, COALESCE(last_used_at, created_at) AS last_used_at, user_agent, ip"
    " FROM auth_sessions WHERE user_id = :user_id AND revoked_at IS NULL AND expires_at > :now"
    f" ORDER BY COALESCE(last_used_at, created_at) DESC, id DESC LIMIT {SESSIONS_LISTED}",
    datetimes=["created_at", "last_used_at"],
)
NAME_SESSION = Sql("UPDATE auth_sessions SET public_id = :public_id WHERE id = :id AND public_id IS NULL")
SESSION_PUBLIC_ID = Sql("SELECT public_id FROM auth_sessions WHERE id = :id")
END_OWN_SESSION = Sql(
    "UPDATE auth_sessions SET revoked_at = :now WHERE public_id = :public_id AND user_id = :user_id"
    " AND revoked_at IS NULL AND expires_at > :now"
)
END_OTHER_SESSIONS = Sql(
    "UPDATE auth_sessions SET revoked_at = :now WHERE user_id = :user_id AND id <> :keep AND revoked_at IS NULL"
)
# Only while the hash is the one verified: of two changes that verified the same old password, the
# first wins and the second matches no row.
CHANGE_PASSWORD = Sql(
    "UPDATE users SET password_hash = :new_hash WHERE id = :user_id AND password_hash = :verified_hash"
)
# The same, and only from the phone the caller had (None: a frozen account, which this unfreezes): a
# taken phone breaks the unique key (Conflict).
CHANGE_PHONE = Sql(
    "UPDATE users SET phone = :new_phone, former_phone = NULL, frozen_at = NULL WHERE id = :user_id"
    " AND (phone = :old_phone OR (:old_phone IS NULL AND phone IS NULL)) AND password_hash = :verified_hash"
)
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


# Counters of one phone (the per-phone SMS quota, the login counters and every key under it): the rules
# build their windows on these keys, and a purged account's are deleted by them.
def sms_phone_key(phone: str) -> str:
    return f"sms:phone:{phone}"


def login_phone_key(phone: str) -> str:
    return f"login:phone:{phone}"


# A login attempt is counted in LOGIN_WINDOWS windows (ratelimit.window_params 0..3, in key order)
# before the password is checked; a client's remembered successes are windows 4 (now) and 5 (later).
LOGIN_WINDOWS = 4
TRUSTED, TRUSTED_NEXT = LOGIN_WINDOWS, LOGIN_WINDOWS + 1
# An account not deleted, or still in its deletion's grace period (a final one is gone for logins).
_NOT_DELETED = "(users.deletion_due_at IS NULL OR users.deletion_due_at > :now)"
# The user by phone (NULLs when there is none: the one-row table makes the row), whether a deletion
# waits (that this login undoes), then the counts of the login's windows, this attempt included, and
# of the client's remembered successes (NULL: none).
LOGIN_LOOKUP = Sql(
    "SELECT users.id, users.public_id, users.phone, users.password_hash, users.created_at,"
    " (users.deletion_due_at IS NOT NULL) AS deletion_pending, (users.disabled_at IS NOT NULL) AS disabled,"
    f" {ratelimit.count_of(0)} AS by_client_count, {ratelimit.count_of(1)} AS by_phone_count,"
    f" {ratelimit.count_of(2)} AS by_phone_client_count, {ratelimit.count_of(3)} AS pace_count,"
    f" {ratelimit.count_of(TRUSTED)} AS trusted, {ratelimit.count_of(TRUSTED_NEXT)} AS trusted_next"
    f" FROM (SELECT 1 AS one) AS one_row LEFT OUTER JOIN users ON users.phone = :phone AND {_NOT_DELETED}",
    datetimes=["created_at"],
)
# Only while the hash is the one verified: a reset between the check and here leaves no row to match,
# so a login with the old password cannot outlive the reset that revoked the sessions. A login undoes a
# deletion in its grace period, never a final one (housekeeping may be purging it right now). Nor
# does it sign in an account an operator disabled since it was looked up.
RECORD_LOGIN = Sql(
    "UPDATE users SET last_login_at = :now, password_hash = COALESCE(:new_hash, password_hash),"
    " deletion_due_at = NULL"
    f" WHERE id = :user_id AND password_hash = :verified_hash AND {_NOT_DELETED} AND disabled_at IS NULL"
)

# -- account deletion ---------------------------------------------------------------------------------
# Only while the password is the one verified (NULL: proved by a code instead), and not twice.
SCHEDULE_DELETION = Sql(
    "UPDATE users SET deletion_due_at = :due_at WHERE id = :user_id AND deletion_due_at IS NULL"
    " AND (:verified_hash IS NULL OR password_hash = :verified_hash)"
)
DUE_DELETIONS = Sql("SELECT id FROM users WHERE deletion_due_at <= :now ORDER BY deletion_due_at, id LIMIT :limit")
# The account to purge, locked to the commit, if its deletion is (still) final: a login that got in
# first has cleared it.
_DUE_USER = "SELECT id, phone FROM users WHERE id = :user_id AND deletion_due_at <= :now"
DUE_USER = Sql(sqlite=_DUE_USER, mysql=f"{_DUE_USER} FOR UPDATE")
DELETE_SESSIONS = Sql("DELETE FROM auth_sessions WHERE user_id = :user_id")  # their H5 rows go by cascade
DELETE_CODES = Sql("DELETE FROM sms_codes WHERE phone = :phone")  # their outbox rows go by cascade
DELETE_USER = Sql("DELETE FROM users WHERE id = :user_id")


# -- what the rules hand over -------------------------------------------------------------------------


@dataclass(frozen=True)
class NewGrant:
    """An app session and its first H5 ticket to create (only hashes of the secrets are stored), with
    what the list of sessions shows of it: its public id, the client's user agent and network."""

    token_hash: str
    expires_at: dt.datetime
    ticket_hash: str
    ticket_expires_at: dt.datetime
    public_id: str = field(default_factory=new_public_id)
    user_agent: str | None = None
    ip: str | None = None
    lang: str | None = None  # the app's language: its H5 ticket's (h5_tickets.lang)


@dataclass(frozen=True)
class Notice:
    """A text without a code to queue (e.g. to the old phone after a change): ``text`` None writes the
    outbox row as skipped. ``expires_at`` is how long it may wait for the gateway before it is dropped."""

    phone: str
    purpose: str
    text: str | None
    expires_at: dt.datetime
    lang: str | None = None  # the text's language (sms_outbox.lang)


@dataclass(frozen=True)
class CodeText:
    """What a code request stores: the code's keyed hash ("" when no code is issued), and the text to
    send with its code (None: the outbox row is written as skipped)."""

    code_hash: str
    text: str | None
    code: str | None
    lang: str | None = None  # the text's language (sms_outbox.lang)


@dataclass(frozen=True)
class CodeRequest:
    phone: str
    purpose: str
    by_phone: Window  # counted first: it locks the phone's counter, serialising its requests
    by_client: Window
    resend_after: int  # seconds between two codes to one phone
    expires_at: dt.datetime
    dormant_before: dt.datetime | None = None  # an account last active before this is dormant (None: none is)
    guard: SendGuard | None = None  # the SMS cost guard's counters (None: none, a test number)


# -- units of work ------------------------------------------------------------------------------------


@sql_unit
def issue_code(
    c: SqlCursor, request: CodeRequest, now: dt.datetime, compose: Callable[[bool, bool], CodeText]
) -> Verdict | None:
    """Count the request, refuse it within ``resend_after`` of the phone's last code, then store a new
    code (replacing the live one) and its outbox row, as ``compose(registered, dormant)`` makes them
    (``dormant``: the phone's account is, so a code for it would give the number a fresh account),
    and count it against the SMS cost guard (``request.guard``: the daily budget and the prefix's
    breaker, whose verdict is returned; past either the unit rolls back with nothing stored)."""
    # The per-phone upsert comes first: it locks this phone's counter row, so concurrent requests
    # for one phone are serialised and the resend check below cannot be raced.
    ratelimit.hit(c, request.by_phone, now)
    last = c.first(LAST_CODE, {"phone": request.phone})
    last_sent = last.created_at if last is not None else None
    if last_sent is not None and (wait := (last_sent - now).total_seconds() + request.resend_after) > 0:
        raise RateLimited(math.ceil(wait), N_("Wait before asking for another code."))
    ratelimit.hit(c, request.by_client, now)
    holder = c.first(HOLDER, {"phone": request.phone, "dormant_before": request.dormant_before, "now": now})
    made = compose(holder is not None, bool(holder is not None and holder.dormant))
    params = {"phone": request.phone, "purpose": request.purpose, "now": now}
    c.execute(EXPIRE_CODES, params)
    code_id = c.insert(NEW_CODE, {**params, "code_hash": made.code_hash, "expires_at": request.expires_at})
    # The same row whether or not a text goes out, so both cost the same.
    sms_queries.enqueue(c, code_id, request.phone, request.purpose, now, text=made.text, code=made.code, lang=made.lang)
    # Last, though nothing is queued until the commit anyway: the budget's row is every request's, and
    # its lock is held from here to the commit only. (Codes, then these counters, in every unit.)
    return sms_queries.guard_send(c, request.guard, now) if request.guard is not None else None


@sql_unit
def claim_code(
    c: SqlCursor,
    phone: str,
    purpose: str,
    code_hash: str,
    checks: Window,
    max_attempts: int,
    now: dt.datetime,
    used: UseGuard | None = None,
) -> bool:
    """Count a code check against the client (``checks``; refused without a trace: the code keeps its
    tries), then spend the live code if ``code_hash`` is its hash: True, or False (a wrong guess counts
    against the code). A spent code counts as used for the SMS cost guard's breaker (``used``)."""
    ratelimit.hit(c, checks, now)
    row = c.first(LIVE_CODE, {"phone": phone, "purpose": purpose, "now": now})
    if row is None or not row.code_hash or row.attempts >= max_attempts:
        return False
    if not hmac.compare_digest(row.code_hash, code_hash):
        c.execute(WRONG_GUESS, {"id": row.id})
        return False
    c.execute(USE_CODE, {"id": row.id, "now": now})
    if used is not None:
        sms_queries.count_use(c, used, now)
    return True


def add_grant(c: SqlCursor, user_id: int, grant: NewGrant, now: dt.datetime) -> int:
    """Create ``grant`` for ``user_id``; the app session's id."""
    session_id = c.insert(
        NEW_SESSION,
        {
            "user_id": user_id,
            "token_hash": grant.token_hash,
            "now": now,
            "expires_at": grant.expires_at,
            "public_id": grant.public_id,
            "user_agent": grant.user_agent,
            "ip": grant.ip,
        },
    )
    h5_queries.add_ticket(c, session_id, grant.ticket_hash, now, grant.ticket_expires_at, grant.lang)
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
    dormant_before: dt.datetime | None = None,
) -> int:
    """A new user, signed in (``grant``); the app session's id. Refunds the code check counted at
    ``checked_at`` (only failed checks count against the client). An account of the phone dormant at
    ``dormant_before`` is frozen first (see free_number). ``Conflict`` when the phone (or the public
    id) is taken."""
    ratelimit.refund_one(c, checks, checked_at)
    free_number(c, phone, dormant_before, now)  # an active holder stays: the INSERT conflicts
    user_id = c.insert(NEW_USER, {"public_id": public_id, "phone": phone, "password_hash": password_hash, "now": now})
    return add_grant(c, user_id, grant, now)


@sql_unit
def reserve_login(
    c: SqlCursor, phone: str, params: dict[str, Any], admit: Callable[[Row], None], now: dt.datetime
) -> Row:
    """Count a login attempt in its windows (``params``: windows 0..3, and the client's remembered
    successes as windows 4 and 5), then return the user (NULLs when none, or when its deletion is
    final at ``now``) with the counts (``LOGIN_LOOKUP``), once ``admit`` accepted them (it raises
    RateLimited otherwise). The counters' rows stay locked to the commit: parallel attempts queue
    here, each sees the others, none slips past a limit."""
    return _reserve_login(c, phone, params, admit, now)


def _reserve_login(
    c: SqlCursor, phone: str, params: dict[str, Any], admit: Callable[[Row], None], now: dt.datetime
) -> Row:
    ratelimit.reserve(c, params, LOGIN_WINDOWS)
    found = c.first(LOGIN_LOOKUP, {"phone": phone, "now": now, **params})
    assert found is not None  # the one-row table makes a row
    admit(found)
    return found


@sql_unit
def reserve_code_login(
    c: SqlCursor,
    phone: str,
    params: dict[str, Any],
    admit: Callable[[Row], None],
    code_hash: str,
    max_attempts: int,
    now: dt.datetime,
    used: UseGuard | None = None,
) -> Row | None:
    """A login with an SMS code: count the attempt as ``reserve_login`` does, then spend the phone's live
    ``login`` code if ``code_hash`` is its hash. The user (``LOGIN_LOOKUP``'s row), or None: no such
    user, or a wrong, spent or dead code (a wrong guess counts against the code, and the attempt stays
    counted). A phone without an account has no code with a hash (none was issued), so it takes the
    same steps as a wrong guess. A spent code counts as used for the cost guard (``used``). (A dormant
    account is frozen by ``record_code_login``, which locks the user before counters, as every unit
    does that takes both.)"""
    found = _reserve_login(c, phone, params, admit, now)
    row = c.first(LIVE_CODE, {"phone": phone, "purpose": "login", "now": now})
    if row is None or row.attempts >= max_attempts:
        return None
    if not (row.code_hash and hmac.compare_digest(row.code_hash, code_hash)):
        c.execute(WRONG_GUESS, {"id": row.id})
        return None
    if found.id is None:  # purged since the code was sent: keep the code unspent, as nothing was done
        return None
    c.execute(USE_CODE, {"id": row.id, "now": now})
    if used is not None:
        sms_queries.count_use(c, used, now)
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
    return _record_login(c, found, new_hash, params, forget, remember, grant, now)


def _record_login(
    c: SqlCursor,
    found: Row,
    new_hash: str | None,
    params: dict[str, Any],
    forget: str | None,
    remember: dict[str, Any] | None,
    grant: NewGrant,
    now: dt.datetime,
) -> int | None:
    if not c.execute(
        RECORD_LOGIN, {"user_id": found.id, "verified_hash": found.password_hash, "now": now, "new_hash": new_hash}
    ):
        return None  # the password changed since, or the account's deletion became final
    ratelimit.refund(c, params, LOGIN_WINDOWS)
    if forget is not None:
        ratelimit.forget(c, forget)
    if remember is not None:
        ratelimit.reserve(c, remember, 2)
    return add_grant(c, found.id, grant, now)


@sql_unit
def record_code_login(
    c: SqlCursor,
    found: Row,
    params: dict[str, Any],
    forget: str | None,
    remember: dict[str, Any] | None,
    grant: NewGrant,
    now: dt.datetime,
    dormant_before: dt.datetime | None,
    fresh_hash: str,
) -> tuple[int, Row] | None:
    """``record_login`` for a login with a code to ``found.phone`` (``reserve_code_login``'s row): the
    session's id and the account signed in. That is a fresh account, made with ``fresh_hash`` (a hash
    no password matches), when the number's was dormant at ``dormant_before`` (it is frozen: see
    free_number), and the number's account as it is now when it changed hands since ``found`` was read.
    None, and nothing written, when no account holds the number any more, or its deletion is final."""
    holder, froze = free_number(c, found.phone, dormant_before, now)
    if froze:
        public_id = new_public_id()
        fresh = {"public_id": public_id, "phone": found.phone, "password_hash": fresh_hash, "now": now}
        user_id = c.insert(NEW_USER, fresh)
        found = found._replace(
            id=user_id, public_id=public_id, password_hash=fresh_hash, created_at=now, deletion_pending=0, disabled=0
        )
    elif holder is None:
        return None
    elif holder.id != found.id:
        current = c.first(ACCOUNT, {"user_id": holder.id})
        if current is None:
            return None
        found = found._replace(**current._asdict())
    if found.disabled:  # decided on the account signed in: a disabled one frozen off the number is not the holder's
        raise AccountDisabled()  # rolls back: told only to one who proved the phone with its code
    session_id = _record_login(c, found, None, params, forget, remember, grant, now)
    return None if session_id is None else (session_id, found)


@sql_unit
def reset_password(
    c: SqlCursor,
    phone: str,
    password_hash: str,
    checks: Window,
    checked_at: dt.datetime,
    login_family: str,
    now: dt.datetime,
    dormant_before: dt.datetime | None = None,
) -> bool:
    """Set the password of ``phone``'s user, end their app sessions, refund the code check and reset the
    login counters under ``login_family``; False if there is no such user (deleted since the code). A
    user dormant at ``dormant_before`` is frozen instead, and a fresh account of the phone gets the
    password (see free_number)."""
    if c.first(HOLDER, {"phone": phone, "dormant_before": None, "now": now}) is None:
        return False
    # Counters, then the user: the order of register (and of this unit before recycled numbers).
    ratelimit.refund_one(c, checks, checked_at)
    user, froze = free_number(c, phone, dormant_before, now)
    if user is None and not froze:
        return False  # purged meanwhile (the refund is harmless: the code was good)
    if user is None:
        c.insert(NEW_USER, {"public_id": new_public_id(), "phone": phone, "password_hash": password_hash, "now": now})
    else:
        c.execute(SET_PASSWORD, {"user_id": user.id, "password_hash": password_hash})
        c.execute(REVOKE_SESSIONS, {"user_id": user.id, "now": now})
    ratelimit.forget_family(c, login_family)
    return True


# -- recycled numbers ---------------------------------------------------------------------------------
# Carriers hand a number on once its subscriber leaves it. An account of the number with no login, no
# session used (the token check writes that once a minute) and no H5 visit since :dormant_before is
# dormant (NULL: the rule is off, none is): a code for its number proves only that someone holds the
# number now, so the reset, login or registration it comes with freezes the account off the number
# (phone NULL, former_phone the number) and gives the number a fresh account. The frozen account signs
# in with its former number and its password (a password login that fails on the number's account
# tries the latest one frozen off it), and gets no codes: it has no number.
_DORMANT = (
    "(COALESCE(users.last_login_at, users.created_at) < :dormant_before"
    " AND (users.h5_last_visit_at IS NULL OR users.h5_last_visit_at < :dormant_before)"
    " AND NOT EXISTS (SELECT 1 FROM auth_sessions WHERE auth_sessions.user_id = users.id"
    " AND auth_sessions.revoked_at IS NULL AND auth_sessions.expires_at > :now"
    " AND COALESCE(auth_sessions.last_used_at, auth_sessions.created_at) >= :dormant_before))"
)
HOLDER = Sql(f"SELECT id, {_DORMANT} AS dormant FROM users WHERE phone = :phone")
_HOLDER_NOW = "SELECT id FROM users WHERE phone = :phone"
HOLDER_NOW = Sql(sqlite=_HOLDER_NOW, mysql=f"{_HOLDER_NOW} FOR UPDATE")
# Only while it is still the number's account and still dormant: of two requests that found it so, one
# freezes it; so does a login or a token check of its owner that commits first keep it.
FREEZE = Sql(
    "UPDATE users SET phone = NULL, former_phone = :phone, frozen_at = :now"
    f" WHERE id = :user_id AND phone = :phone AND {_DORMANT}"
)
_ACCOUNT = (
    "SELECT users.id, users.public_id, {phone} AS phone, users.password_hash, users.created_at,"
    " (users.deletion_due_at IS NOT NULL) AS deletion_pending, (users.disabled_at IS NOT NULL) AS disabled"
    " FROM users WHERE "
)
# A user as LOGIN_LOOKUP shows one, by id.
ACCOUNT = Sql(_ACCOUNT.format(phone="users.phone") + "users.id = :user_id", datetimes=["created_at"])
# The latest account frozen off :phone whose deletion is not final, as LOGIN_LOOKUP shows a user (with
# the number it signs in with as its phone).
FROZEN_ACCOUNT = Sql(
    _ACCOUNT.format(phone="users.former_phone")
    + f"users.former_phone = :phone AND {_NOT_DELETED} ORDER BY users.frozen_at DESC, users.id DESC LIMIT 1",
    datetimes=["created_at"],
)


def free_number(
    c: SqlCursor, phone: str, dormant_before: dt.datetime | None, now: dt.datetime
) -> tuple[Row | None, bool]:
    """The account that holds ``phone`` (its id), after freezing it if it was dormant: ``(None, True)``
    then (its sessions end too, and the number is free for a fresh account), ``(None, False)`` when no
    account holds the number."""
    params = {"phone": phone, "dormant_before": dormant_before, "now": now}
    holder = c.first(HOLDER, params)
    if holder is None or not holder.dormant:
        return holder, False
    if c.execute(FREEZE, {**params, "user_id": holder.id}):
        # Whoever holds its old sessions proves no more than the number's holder does: the owner signs
        # in again with the password, and learns so that the account is frozen.
        c.execute(REVOKE_SESSIONS, {"user_id": holder.id, "now": now})
        return None, True
    # Another request froze it first (and gave the number a fresh account), or its owner came back.
    return c.first(HOLDER_NOW, {"phone": phone}), False


@sql_unit
def frozen_account(c: SqlCursor, phone: str, now: dt.datetime) -> Row | None:
    """The latest account frozen off ``phone`` (``FROZEN_ACCOUNT``'s row), or None."""
    return c.first(FROZEN_ACCOUNT, {"phone": phone, "now": now})


@sql_unit
def account(c: SqlCursor, user_id: int) -> Row | None:
    """The user ``user_id`` (``ACCOUNT``'s row, its phone None when frozen), or None."""
    return c.first(ACCOUNT, {"user_id": user_id})


@sql_unit
@idempotent  # the touch sets last use to now only where it is stale: a second run changes nothing
def session_of_token(c: SqlCursor, token_hash: str, now: dt.datetime, touch_before: dt.datetime) -> Row | None:
    """The live app session of a token: its id, user_id and the user's phone; or None. A last use
    before ``touch_before`` is moved to ``now``: one more statement in the unit, once in a while,
    instead of a write on every request."""
    row = c.first(TOKEN, {"token_hash": token_hash, "now": now, "stale": touch_before})
    if row is not None and row.stale:
        c.execute(TOUCH_SESSION, {"id": row.id, "now": now, "stale": touch_before})
    return row


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


# -- the list of sessions, password and phone changes -----------------------------------------------


def _lock_user_with_session(c: SqlCursor, user_id: int, session_id: int, now: dt.datetime) -> None:
    """Lock the user's row, then check that the caller's session still lives: Unauthorized if another
    request ended it meanwhile (nothing is then changed)."""
    c.first(LOCK_USER, {"user_id": user_id})
    if c.first(LIVE_SESSION, {"id": session_id, "user_id": user_id, "now": now}) is None:
        raise Unauthorized()


@sql_unit
def list_sessions(c: SqlCursor, user_id: int, now: dt.datetime) -> list[Row]:
    """The user's live app sessions (``LIST_SESSIONS``' columns), the most recently used first. Sessions
    made before public ids existed get one here, once."""
    rows = c.all(LIST_SESSIONS, {"user_id": user_id, "now": now})
    named = []
    for row in rows:
        if row.public_id is None:
            public_id = new_public_id()
            if not c.execute(NAME_SESSION, {"id": row.id, "public_id": public_id}):
                named_first = c.first(SESSION_PUBLIC_ID, {"id": row.id})  # by a parallel list
                assert named_first is not None  # the row was just listed, in this transaction
                public_id = named_first.public_id
            row = row._replace(public_id=public_id)
        named.append(row)
    return named


@sql_unit
def end_session(c: SqlCursor, user_id: int, public_id: str, now: dt.datetime) -> bool:
    """End the live session ``public_id`` of ``user_id`` (its H5 tickets and cookies die with it: they
    are only good while it lives); False if the user has no such live session."""
    c.first(LOCK_USER, {"user_id": user_id})
    return c.execute(END_OWN_SESSION, {"public_id": public_id, "user_id": user_id, "now": now}) == 1


@sql_unit
def end_other_sessions(c: SqlCursor, user_id: int, session_id: int, now: dt.datetime) -> int:
    """End every session of ``user_id`` but ``session_id`` (which must still live: Unauthorized); how
    many ended."""
    _lock_user_with_session(c, user_id, session_id, now)
    return c.execute(END_OTHER_SESSIONS, {"user_id": user_id, "keep": session_id, "now": now})


@sql_unit
def change_password(
    c: SqlCursor,
    user_id: int,
    session_id: int,
    verified_hash: str,
    new_hash: str,
    attempt: dict[str, Any],
    now: dt.datetime,
) -> bool:
    """Replace the password whose hash is ``verified_hash``, give back the login attempt counted for the
    check (``attempt``: ``reserve_login``'s params) and end every other session. False, and nothing
    written, when the password changed since it was verified (another change won); Unauthorized when
    the caller's session ended meanwhile."""
    if not c.execute(CHANGE_PASSWORD, {"user_id": user_id, "verified_hash": verified_hash, "new_hash": new_hash}):
        return False  # another change (or a reset) came first; this UPDATE also locked the user's row
    _lock_user_with_session(c, user_id, session_id, now)
    ratelimit.refund(c, attempt, LOGIN_WINDOWS)
    c.execute(END_OTHER_SESSIONS, {"user_id": user_id, "keep": session_id, "now": now})
    return True


@sql_unit
def change_phone(
    c: SqlCursor,
    user_id: int,
    session_id: int,
    old_phone: str | None,
    new_phone: str,
    verified_hash: str,
    checks: Window,
    checked_at: dt.datetime,
    attempt: dict[str, Any],
    notice: Notice | None,
    now: dt.datetime,
    dormant_before: dt.datetime | None = None,
) -> Row | None:
    """Move the user from ``old_phone`` (None: a frozen account, which this unfreezes) to ``new_phone``
    (the password checked was ``verified_hash``), give back the code check (``checks`` at
    ``checked_at``) and the login attempt (``attempt``), and queue ``notice`` to the old phone; the
    user's profile (``PROFILE``). An account of ``new_phone`` dormant at ``dormant_before`` is frozen
    first (see free_number). None, and nothing written, when the password or phone changed since they
    were checked; ``Conflict`` when another account has ``new_phone``; Unauthorized when the caller's
    session ended meanwhile."""
    params = {"user_id": user_id, "old_phone": old_phone, "new_phone": new_phone, "verified_hash": verified_hash}
    _, froze = free_number(c, new_phone, dormant_before, now)
    if not c.execute(CHANGE_PHONE, params):
        if froze:  # the freeze is undone with the unit: the number must not be left without its account
            raise InvalidCredentials(N_("Wrong password."), field="password")
        return None
    _lock_user_with_session(c, user_id, session_id, now)
    ratelimit.refund_one(c, checks, checked_at)
    ratelimit.refund(c, attempt, LOGIN_WINDOWS)
    if notice is not None:  # None: a frozen account, whose old number is another account's now
        # A code row without a code (its hash never matches) carries the text through the outbox and its
        # sender, as every text goes; its expiry is how long the text may wait for the gateway.
        code = {"phone": notice.phone, "purpose": notice.purpose, "now": now, "expires_at": notice.expires_at}
        code_id = c.insert(NEW_CODE, {**code, "code_hash": ""})
        sms_queries.enqueue(
            c, code_id, notice.phone, notice.purpose, now, text=notice.text, code=None, lang=notice.lang
        )
    return c.first(PROFILE, {"user_id": user_id})


# -- account deletion ---------------------------------------------------------------------------------


@sql_unit
def schedule_deletion(
    c: SqlCursor,
    user_id: int,
    session_id: int,
    verified_hash: str | None,
    refunds: list[tuple[dict[str, Any], int]],
    due_at: dt.datetime,
    now: dt.datetime,
) -> bool:
    """Schedule the deletion of ``user_id`` at ``due_at`` and end every session of theirs (their H5
    tickets and cookies die with them), giving back the proof's counted attempt (``refunds``:
    ``ratelimit.refund``'s params and size). ``verified_hash``: the password checked (None: a code
    proved it). False, and nothing written, when the password changed since it was checked;
    Unauthorized when the caller's session ended meanwhile (a deletion scheduled by another request
    ends them all)."""
    _lock_user_with_session(c, user_id, session_id, now)
    if not c.execute(SCHEDULE_DELETION, {"user_id": user_id, "verified_hash": verified_hash, "due_at": due_at}):
        return False  # a live session means no deletion waits: the password changed
    for params, size in refunds:
        ratelimit.refund(c, params, size)
    c.execute(REVOKE_SESSIONS, {"user_id": user_id, "now": now})
    return True


@sql_unit
def due_deletions(c: SqlCursor, now: dt.datetime, limit: int) -> list[int]:
    """The ids of at most ``limit`` accounts whose deletion is final at ``now``, the oldest first."""
    return [row.id for row in c.all(DUE_DELETIONS, {"now": now, "limit": limit})]


@sql_unit
@long_work  # a big account's images and sessions: housekeeping's, never a request's
def purge_user(c: SqlCursor, user_id: int, now: dt.datetime) -> bool:
    """Delete everything of an account whose deletion is final at ``now``: its images (their blobs'
    legacy counts go down; a blob no image uses any more is left to ``Images.collect_unused``, which
    removes its objects in whichever store under the blob's lock), sessions (and their H5 rows), the
    SMS codes and texts of its phone, the phone's counters, and the user row; the phone can register
    anew. False if there is nothing to purge (a login undid the deletion, another process purged it)."""
    user = c.first(DUE_USER, {"user_id": user_id, "now": now})
    if user is None:
        return False
    # Lock order: users, image_blobs, images (as an upload), then sessions, counters, codes (as a
    # code request: counters before codes).
    image_queries.release_all(c, user_id)
    c.execute(DELETE_SESSIONS, {"user_id": user_id})
    if user.phone is not None:  # a frozen account's former number, its codes and counters are its new holder's
        ratelimit.forget(c, sms_phone_key(user.phone))
        ratelimit.forget_family(c, login_phone_key(user.phone))
        c.execute(DELETE_CODES, {"phone": user.phone})
    c.execute(DELETE_USER, {"user_id": user_id})
    return True


# -- the export of one's data, and the operator's commands (demo/admin/users.py) -----------------------

_OPERATOR_VIEW = (
    "SELECT users.id, users.public_id, users.phone, users.created_at, users.last_login_at,"
    " users.h5_visit_count, users.h5_last_visit_at, users.deletion_due_at, users.disabled_at,"
    " users.former_phone, users.frozen_at,"
    " (SELECT COUNT(images.pk) FROM images WHERE images.owner_id = users.id) AS image_count,"
    " (SELECT COALESCE(SUM(images.bytes), 0) FROM images WHERE images.owner_id = users.id) AS image_bytes,"
    " (SELECT COUNT(auth_sessions.id) FROM auth_sessions WHERE auth_sessions.user_id = users.id"
    " AND auth_sessions.revoked_at IS NULL AND auth_sessions.expires_at > :now) AS live_sessions"
    " FROM users WHERE "
)
_VIEW_TIMES = ["created_at", "last_login_at", "h5_last_visit_at", "deletion_due_at", "disabled_at", "frozen_at"]
USER_BY_PUBLIC_ID = Sql(_OPERATOR_VIEW + "users.public_id = :value", datetimes=_VIEW_TIMES)
USER_BY_PHONE = Sql(_OPERATOR_VIEW + "users.phone = :value", datetimes=_VIEW_TIMES)
USER_BY_ID = Sql(_OPERATOR_VIEW + "users.id = :value", datetimes=_VIEW_TIMES)
# The accounts frozen off a number (Recycled numbers in docs/API.md), the latest first.
USERS_FROZEN_OFF = Sql(
    _OPERATOR_VIEW + "users.former_phone = :value ORDER BY users.frozen_at DESC, users.id DESC", datetimes=_VIEW_TIMES
)
DISABLE_USER = Sql("UPDATE users SET disabled_at = :now WHERE id = :user_id AND disabled_at IS NULL")
ENABLE_USER = Sql("UPDATE users SET disabled_at = NULL WHERE id = :user_id AND disabled_at IS NOT NULL")
# An operator's deletion: as DELETE /users/me's, but an earlier one already scheduled stands.
OPERATOR_DELETION = Sql(
    "UPDATE users SET deletion_due_at = :due_at WHERE id = :user_id"
    " AND (deletion_due_at IS NULL OR deletion_due_at > :due_at)"
)
DELETION_DUE = Sql("SELECT deletion_due_at FROM users WHERE id = :user_id", datetimes=["deletion_due_at"])
EXPORTED_IMAGES = Sql(
    "SELECT id, sha256, format, width, height, bytes, created_at FROM images WHERE owner_id = :user_id ORDER BY pk",
    datetimes=["created_at"],
)


@dataclass(frozen=True)
class ExportData:
    """What an export holds of a user, read in one unit of work: the user (``USER_BY_PUBLIC_ID``'s
    columns), their live sessions (``LIST_SESSIONS``') and their images (``EXPORTED_IMAGES``')."""

    user: Row
    sessions: list[Row]
    images: list[Row]


@sql_unit
def find_user(c: SqlCursor, *, public_id: str | None = None, phone: str | None = None, now: dt.datetime) -> Row | None:
    """The user by public id or by phone, as the operator sees them (``_OPERATOR_VIEW``), or None."""
    sql, value = (USER_BY_PUBLIC_ID, public_id) if public_id is not None else (USER_BY_PHONE, phone)
    return c.first(sql, {"value": value, "now": now})


@sql_unit
def frozen_off(c: SqlCursor, phone: str, now: dt.datetime) -> list[Row]:
    """The accounts frozen off ``phone``, as the operator sees them (``_OPERATOR_VIEW``), latest first."""
    return c.all(USERS_FROZEN_OFF, {"value": phone, "now": now})


@sql_unit
def export_data(c: SqlCursor, user_id: int, limit: Window | None, now: dt.datetime) -> ExportData | None:
    """Count the export in ``limit`` (RateLimited past it; None: not limited, the operator's), then
    read what it holds; None when the user is gone. The limit is counted first, before any work."""
    if limit is not None:
        ratelimit.hit(c, limit, now)
    user = c.first(USER_BY_ID, {"value": user_id, "now": now})
    if user is None:
        return None
    return ExportData(user, list_sessions(c, user.id, now), c.all(EXPORTED_IMAGES, {"user_id": user.id}))


@sql_unit
def set_disabled(c: SqlCursor, user_id: int, disabled: bool, now: dt.datetime) -> tuple[bool, int]:
    """Disable (every session ends with it: app tokens, H5 tickets and cookies) or enable the user:
    whether it changed, and how many sessions ended."""
    c.first(LOCK_USER, {"user_id": user_id})
    changed = bool(c.execute(DISABLE_USER if disabled else ENABLE_USER, {"user_id": user_id, "now": now}))
    ended = c.execute(REVOKE_SESSIONS, {"user_id": user_id, "now": now}) if disabled else 0
    return changed, ended


@sql_unit
def end_all_sessions(c: SqlCursor, user_id: int, now: dt.datetime) -> int:
    """End every session of the user (their H5 tickets and cookies die with them); how many."""
    c.first(LOCK_USER, {"user_id": user_id})
    return c.execute(REVOKE_SESSIONS, {"user_id": user_id, "now": now})


@sql_unit
def schedule_deletion_by_operator(
    c: SqlCursor, user_id: int, due_at: dt.datetime, now: dt.datetime
) -> tuple[dt.datetime | None, int]:
    """DELETE /users/me's deletion, asked by an operator: due at ``due_at`` (``now``: final at once,
    for the purge) unless an earlier one is scheduled; every session ends. The time it is final (None:
    no such user), and how many sessions ended."""
    if c.first(LOCK_USER, {"user_id": user_id}) is None:
        return None, 0
    c.execute(OPERATOR_DELETION, {"user_id": user_id, "due_at": due_at})
    ended = c.execute(REVOKE_SESSIONS, {"user_id": user_id, "now": now})
    row = c.first(DELETION_DUE, {"user_id": user_id})
    return (row.deletion_due_at if row is not None else None), ended
