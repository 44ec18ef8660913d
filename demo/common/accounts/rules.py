"""Scenario 1 rules: SMS codes, registration, login, logout, password reset, token checks.

No Tornado here: handlers call these coroutines with plain values and get plain values or a
``DemoError`` back. Database work runs through ``Database.run`` and hashing through the CPU pool.
"""
from __future__ import annotations

import datetime as dt
import hmac
import math
import secrets
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import String, bindparam, func, insert, literal_column, select, update
from sqlalchemy.orm import Session

from demo.common.sms import outbox
from demo.common.infra import ratelimit
from demo.common.accounts import tokens
from demo.common.infra.clock import Clock, isoformat
from demo.common.infra.db import Conflict, Cursor, Database, Prepared, session_cursor
from demo.common.errors import (
    InvalidCode,
    InvalidCredentials,
    InvalidField,
    PhoneTaken,
    RateLimited,
    Unauthorized,
)
from demo.common.h5.rules import create_ticket
from demo.common.accounts.passwords import Passwords, check_password_policy
from demo.common.accounts.phones import normalize_phone, require_region
from demo.common.accounts.principal import Principal
from demo.common.infra.ratelimit import Window
from demo.models import AuthSession, Image, SmsCode, User

PURPOSES = ("regist", "reset")
# The statements of every login and every authenticated call, prepared (see db.Prepared).
_sessions, _users = AuthSession.__table__, User.__table__
TOKEN_QUERY = Prepared(
    select(_sessions.c.id, _sessions.c.user_id, _users.c.phone)
    .select_from(_sessions.join(_users, _users.c.id == _sessions.c.user_id))
    .where(_sessions.c.token_hash == bindparam("token_hash"), _sessions.c.revoked_at.is_(None),
           _sessions.c.expires_at > bindparam("now"))
)


class LoginWindows(NamedTuple):
    """Where a login attempt counts (Accounts.login_windows), in key order (ratelimit.reserve_statement)."""

    by_client: Window  # one client, every phone
    by_phone: Window  # every client, one phone: past its limit, the phone is slowed down to ``pace``
    by_phone_client: Window  # one client, one phone
    pace: Window  # every client, one phone: one attempt per window once ``by_phone`` is past its limit


# A login attempt is counted in its windows before the password is checked (Accounts.login).
LOGIN_RESERVE = ratelimit.reserve_statement(len(LoginWindows._fields))
LOGIN_REFUND = ratelimit.refund_statement(len(LoginWindows._fields))
# A client that signed in to a phone is remembered for it (Accounts.known_client) for TRUST_SECONDS
# to twice that: the success is counted in this window and the next, and the current one is read.
TRUST_SECONDS = 30 * 24 * 3600
_TRUSTED, _TRUSTED_NEXT = len(LoginWindows._fields), len(LoginWindows._fields) + 1  # after the windows
RECORD_TRUST = ratelimit.reserve_statement(2)
# The user by phone (NULLs when there is none: the one-row table makes the row), then the counts of the
# login's windows, this attempt included, and of the client's remembered successes (NULL: none).
_one_row = select(literal_column("1").label("one")).subquery("one_row")
LOGIN_LOOKUP = Prepared(
    select(_users.c.id, _users.c.public_id, _users.c.phone, _users.c.password_hash, _users.c.created_at,
           *(ratelimit.count_of(i).label(f"{name}_count") for i, name in enumerate(LoginWindows._fields)),
           ratelimit.count_of(_TRUSTED).label("trusted"), ratelimit.count_of(_TRUSTED_NEXT).label("trusted_next"))
    .select_from(_one_row.outerjoin(_users, _users.c.phone == bindparam("phone")))
)
# Only while the hash is the one verified: a reset between the check and here leaves no row to match,
# so a login with the old password cannot outlive the reset that revoked the sessions.
RECORD_LOGIN = Prepared(
    update(_users).where(_users.c.id == bindparam("user_id"),
                         _users.c.password_hash == bindparam("verified_hash", type_=String))
    .values(last_login_at=bindparam("now"),
            password_hash=func.coalesce(bindparam("new_hash", type_=String), _users.c.password_hash))
)
NEW_SESSION = Prepared(insert(_sessions).values(
    user_id=bindparam("user_id"), token_hash=bindparam("token_hash"), created_at=bindparam("now"),
    expires_at=bindparam("expires_at")))


@dataclass(frozen=True)
class AccountRules:
    default_region: str = "CN"
    sms_regions: frozenset[str] = frozenset({"CN"})  # countries texts may go to
    token_ttl: int = 30 * 24 * 3600
    code_ttl: int = 300
    resend_after: int = 60
    max_attempts: int = 5
    phone_daily: int = 10
    ip_hourly: int = 20
    login_phone_failures: int = 10
    login_ip_failures: int = 100
    login_window: int = 900
    login_slowdown_after: int = 10
    login_slowdown: int = 60
    code_checks_ip_hourly: int = 30


@dataclass(frozen=True)
class Grant:
    """A new app session: what the session body of the contract is made from."""

    user: dict[str, Any]
    token: str
    expires_in: int
    session_id: int
    h5_ticket: str


class Accounts:
    def __init__(
        self,
        db: Database,
        passwords: Passwords,
        sender: outbox.Sender,
        *,
        code_key: bytes,
        rules: AccountRules = AccountRules(),
        test_numbers: dict[str, str] | None = None,
        clock: Clock | None = None,
        ticket_ttl: int = 120,
    ) -> None:
        self.ticket_ttl = ticket_ttl
        self.db = db
        self.passwords = passwords
        self.sender = sender
        self.code_key = code_key
        self.rules = rules
        self.test_numbers = test_numbers or {}
        self.clock = clock or Clock()

    def phone(self, raw: Any) -> str:
        return normalize_phone(raw, self.rules.default_region)

    # -- SMS codes -----------------------------------------------------------------------------

    async def request_code(self, raw_phone: Any, purpose: Any, client_ip: str) -> dict[str, int]:
        """Issue a code and queue its text (or, for a registered phone asking to register, a notice
        without one). The answer comes once both are committed, before anything is sent: it cannot
        depend on the SMS gateway, nor on whether the phone has an account."""
        phone = self.phone(raw_phone)
        if purpose not in PURPOSES:
            raise InvalidField("purpose must be 'regist' or 'reset'.", field="purpose")
        if phone not in self.test_numbers:  # test numbers are never texted
            require_region(phone, self.rules.sms_regions)
        now = self.clock.now()
        await self.db.run(self._issue_code, phone, purpose, client_ip, now)
        self.sender.wake()
        return {"expires_in": self.rules.code_ttl, "resend_after": self.rules.resend_after}

    def _issue_code(self, s: Session, phone: str, purpose: str, ip: str, now: dt.datetime) -> None:
        r = self.rules
        # The per-phone upsert comes first: it locks this phone's counter row, so concurrent
        # requests for one phone are serialised and the resend check below cannot be raced.
        ratelimit.hit(s, Window(f"sms:phone:{phone}", r.phone_daily, 86400), now)
        last_sent = s.scalar(select(func.max(SmsCode.created_at)).where(SmsCode.phone == phone))
        if last_sent is not None and (wait := (last_sent - now).total_seconds() + r.resend_after) > 0:
            raise RateLimited(math.ceil(wait), "Wait before asking for another code.")
        ratelimit.hit(s, Window(f"sms:ip:{ratelimit.client_key(ip)}", r.ip_hourly, 3600), now)

        registered = s.scalar(select(User.id).where(User.phone == phone)) is not None
        code: str | None = self.test_numbers.get(phone) or f"{secrets.randbelow(10**6):06d}"
        if purpose == "regist" and registered:
            code, text = None, "This number already has a demo account. Sign in, or reset your password."
        elif purpose == "reset" and not registered:
            code, text = None, None  # nothing to reset; answer exactly as if a code went out
        else:
            minutes = r.code_ttl // 60
            text = f"Your demo verification code is {code}. It expires in {minutes} minutes."
        # A new code replaces any earlier one for the same phone and purpose.
        s.execute(
            update(SmsCode)
            .where(SmsCode.phone == phone, SmsCode.purpose == purpose, SmsCode.used_at.is_(None),
                   SmsCode.expires_at > now)
            .values(expires_at=now)
        )
        row = SmsCode(
            phone=phone, purpose=purpose, created_at=now, attempts=0,
            expires_at=now + dt.timedelta(seconds=r.code_ttl),
            code_hash=tokens.keyed_digest(self.code_key, phone, purpose, code) if code else "",
        )
        s.add(row)
        s.flush()
        if phone in self.test_numbers:
            code = text = None  # test numbers are never texted
        # The same row whether or not a text goes out (text None: "skipped"), so both cost the same.
        outbox.enqueue(s, row.id, phone, purpose, now, text=text, code=code)

    def _consume_code(self, s: Session, phone: str, purpose: str, code: str, now: dt.datetime) -> bool:
        """True and the code is spent, or False (a wrong guess counts against the code)."""
        row = s.scalars(
            select(SmsCode)
            .where(SmsCode.phone == phone, SmsCode.purpose == purpose, SmsCode.used_at.is_(None),
                   SmsCode.expires_at > now)
            .order_by(SmsCode.created_at.desc(), SmsCode.id.desc())
            .limit(1)
            .with_for_update()  # concurrent uses of one code queue here; only the first sees it unused
        ).first()
        if row is None or not row.code_hash or row.attempts >= self.rules.max_attempts:
            return False
        if not hmac.compare_digest(row.code_hash, tokens.keyed_digest(self.code_key, phone, purpose, code)):
            row.attempts += 1
            return False
        row.used_at = now
        return True

    # -- registration, login, logout, reset ------------------------------------------------------

    def _code_checks(self, client_ip: str) -> Window:
        """Registrations and resets share one budget per client: both are "check a code, then hash"."""
        return Window(f"code:ip:{ratelimit.client_key(client_ip)}", self.rules.code_checks_ip_hourly, 3600)

    async def _claim_code(self, phone: str, purpose: str, code: str, checks: Window,
                          now: dt.datetime) -> None:
        """Spend ``code`` before any password is hashed: a wrong code costs no hash, and of parallel
        requests carrying one good code only the first gets past here. Raises InvalidCode (the wrong
        guess is counted against the code) or RateLimited (the client's checks are used up)."""

        def work(s: Session) -> bool:
            ratelimit.hit(s, checks, now)  # first, and refused without a trace: the code keeps its tries
            return self._consume_code(s, phone, purpose, code, now)

        if not await self.db.run(work):
            raise InvalidCode(field="code")

    async def register(self, raw_phone: Any, password: str, code: str, client_ip: str) -> Grant:
        phone = self.phone(raw_phone)
        check_password_policy(password)
        checks, now = self._code_checks(client_ip), self.clock.now()
        await self._claim_code(phone, "regist", code, checks, now)
        password_hash = await self.db.offloader.cpu(self.passwords.hash, password)

        def work(s: Session) -> Grant:
            ratelimit.refund(s, checks, now)  # only failed checks count against the client
            user = User(phone=phone, password_hash=password_hash, created_at=now, last_login_at=now)
            s.add(user)
            s.flush()  # Conflict when another request registered the phone first
            return self._grant(session_cursor(s), user, now)

        try:
            return await self.db.run(work)
        except Conflict:
            raise PhoneTaken(field="phone") from None

    def login_windows(self, phone: str, client_ip: str) -> LoginWindows:
        """Where a login attempt counts.

        Guessing is bounded without letting strangers lock the owner out: one client (an address, an
        IPv6 /64) gets ``login_phone_failures`` tries per phone and ``login_ip_failures`` over all phones
        per window, then waits for the window's end. All clients together get ``login_slowdown_after``
        tries per phone per window, then the phone is slowed down, not locked: one attempt per
        ``login_slowdown`` seconds, whoever makes it. So guesses per phone stay under
        ``login_slowdown_after + login_window / login_slowdown`` per window. A client that signed in to
        the phone within ``TRUST_SECONDS`` (``known_client``) is not slowed down (its own per-phone limit
        still holds): strangers never slow the owner on a known client. From a new client the owner
        takes a turn with the strangers, who can hold every turn for a while; a password reset clears
        the phone's counters (and the clients it knew)."""
        r, client = self.rules, ratelimit.client_key(client_ip)
        return LoginWindows(
            by_client=Window(f"login:ip:{client}", r.login_ip_failures, r.login_window),
            by_phone=Window(_login_phone_key(phone), r.login_slowdown_after, r.login_window),
            by_phone_client=Window(f"{_login_phone_key(phone)}:from:{client}", r.login_phone_failures,
                                   r.login_window),
            pace=Window(f"{_login_phone_key(phone)}:pace", 1, r.login_slowdown),
        )

    def known_client(self, phone: str, client_ip: str) -> Window:
        """Where a client's successful logins to ``phone`` are remembered (see login_windows)."""
        return Window(f"{_login_phone_key(phone)}:from:{ratelimit.client_key(client_ip)}:ok", 1, TRUST_SECONDS)

    async def login(self, raw_phone: Any, password: str, client_ip: str) -> Grant:
        phone = self.phone(raw_phone)
        windows, now = self.login_windows(phone, client_ip), self.clock.now()
        counted = ratelimit.window_params(windows, now)
        known, later = self.known_client(phone, client_ip), now + dt.timedelta(seconds=TRUST_SECONDS)
        remembered = {**ratelimit.window_params([known], now, _TRUSTED),
                      **ratelimit.window_params([known], later, _TRUSTED_NEXT)}

        def reserve(c: Cursor) -> Any:
            # The attempt is counted before the password is checked, and the counters' rows stay locked
            # to the commit: parallel attempts queue here, each sees the others, none slips past a limit.
            c.execute(LOGIN_RESERVE, counted)
            found = c.first(LOGIN_LOOKUP, {"phone": phone, **counted, **remembered})  # the user and the counts
            _admit_login(windows, found, now)  # raises: the unit rolls back, a refused attempt counts nowhere
            return found

        found = await self.db.run_direct(reserve)
        # Unknown phone: the hasher verifies against a decoy, so both failures cost the same time.
        ok = await self.db.offloader.cpu(self.passwords.verify, found.password_hash, password)
        if not ok or found.id is None:
            raise InvalidCredentials()  # already counted
        new_hash = None
        if self.passwords.needs_rehash(found.password_hash):
            new_hash = await self.db.offloader.cpu(self.passwords.hash, password)

        def work(c: Cursor) -> Grant:
            if not c.execute(RECORD_LOGIN, {"user_id": found.id, "verified_hash": found.password_hash,
                                            "now": now, "new_hash": new_hash}):
                raise InvalidCredentials()  # the password changed since it was verified: no session
            c.execute(LOGIN_REFUND, counted)  # a good login is not a failure
            if found.by_phone_client_count > 1:  # and it clears this client's earlier failures for the phone
                c.execute(ratelimit.FORGET, {"key": windows.by_phone_client.key})
            if found.trusted_next is None:  # remember the client (once per TRUST_SECONDS, not every login)
                c.execute(RECORD_TRUST, {**ratelimit.window_params([known], now),
                                         **ratelimit.window_params([known], later, 1)})
            return self._grant(c, found, now)

        return await self.db.run_direct(work)

    async def logout(self, principal: Principal) -> None:
        now = self.clock.now()
        await self.db.run(
            lambda s: s.execute(
                update(AuthSession).where(AuthSession.id == principal.session_id).values(revoked_at=now)
            )
        )

    async def reset_password(self, raw_phone: Any, code: str, password: str, client_ip: str) -> None:
        phone = self.phone(raw_phone)
        check_password_policy(password)
        checks, now = self._code_checks(client_ip), self.clock.now()
        await self._claim_code(phone, "reset", code, checks, now)
        password_hash = await self.db.offloader.cpu(self.passwords.hash, password)

        def work(s: Session) -> bool:
            user_id = s.scalar(select(User.id).where(User.phone == phone))
            if user_id is None:
                return False  # deleted since the code was sent
            ratelimit.refund(s, checks, now)
            s.execute(update(User).where(User.id == user_id).values(password_hash=password_hash))
            s.execute(
                update(AuthSession)
                .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            # The owner proved who they are: failures of strangers no longer slow their logins down.
            ratelimit.forget_family(s, _login_phone_key(phone))
            return True

        if not await self.db.run(work):
            raise InvalidCode(field="code")

    # -- tokens --------------------------------------------------------------------------------

    async def authenticate(self, token: str) -> Principal:
        """The caller behind a bearer token, or Unauthorized (missing, unknown, expired, revoked)."""
        if not tokens.looks_like_token(token):
            raise Unauthorized()
        token_hash, now = tokens.digest(token), self.clock.now()

        row = await self.db.run_direct(lambda c: c.first(TOKEN_QUERY, {"token_hash": token_hash, "now": now}))
        if row is None:
            raise Unauthorized()
        return Principal(user_id=row.user_id, session_id=row.id, phone=row.phone)

    async def profile(self, principal: Principal) -> dict[str, Any]:
        def lookup(s: Session) -> dict[str, Any]:
            user = s.get(User, principal.user_id)
            image_count = s.scalar(select(func.count(Image.pk)).where(Image.owner_id == user.id))
            return {**public_user(user), "last_login_at": isoformat(user.last_login_at), "image_count": image_count}

        return await self.db.run(lookup)

    def _grant(self, c: Cursor, user: Any, now: dt.datetime) -> Grant:
        """A new app session and its first H5 ticket for ``user`` (with id, public_id, phone, created_at)."""
        token, token_hash = tokens.new_secret()
        ttl = self.rules.token_ttl
        session_id = c.insert(NEW_SESSION, {"user_id": user.id, "token_hash": token_hash, "now": now,
                                            "expires_at": now + dt.timedelta(seconds=ttl)})
        ticket = create_ticket(c, session_id, now, self.ticket_ttl)
        return Grant(user=public_user(user), token=token, expires_in=ttl, session_id=session_id, h5_ticket=ticket)


def _login_phone_key(phone: str) -> str:
    return f"login:phone:{phone}"


def _admit_login(windows: LoginWindows, found: Any, now: dt.datetime) -> None:
    """Refuse an attempt that one of ``windows`` does not allow (``found``: LOGIN_LOOKUP's row)."""
    ratelimit.refuse_if_over(windows.by_client, found.by_client_count, now)
    ratelimit.refuse_if_over(windows.by_phone_client, found.by_phone_client_count, now)
    # The phone is slowed down, not locked; never for a client that signed in to it before.
    if found.by_phone_count > windows.by_phone.limit and found.trusted is None:
        ratelimit.refuse_if_over(windows.pace, found.pace_count, now)


def public_user(user: Any) -> dict[str, Any]:
    """The user as the contract shows it: the random public id, never the internal sequential one."""
    return {"id": user.public_id, "phone": user.phone, "created_at": isoformat(user.created_at)}
