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
from typing import Any

from sqlalchemy import String, bindparam, func, insert, literal_column, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from demo.common import outbox, ratelimit, tokens
from demo.common.clock import Clock, isoformat
from demo.common.db import Cursor, Database, Prepared, session_cursor
from demo.common.errors import (
    InvalidCode,
    InvalidCredentials,
    InvalidField,
    PhoneTaken,
    RateLimited,
    Unauthorized,
)
from demo.common.h5 import create_ticket
from demo.common.passwords import Passwords, check_password_policy
from demo.common.phones import normalize_phone, require_region
from demo.common.principal import Principal
from demo.common.ratelimit import Window
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
# The user by phone (NULLs when there is none: the one-row table makes the row) with both failure counts.
_one_row = select(literal_column("1").label("one")).subquery("one_row")
LOGIN_LOOKUP = Prepared(
    select(_users.c.id, _users.c.phone, _users.c.password_hash, _users.c.created_at,
           ratelimit.count_of("phone_key", "phone_start").label("phone_failures"),
           ratelimit.count_of("ip_key", "ip_start").label("ip_failures"))
    .select_from(_one_row.outerjoin(_users, _users.c.phone == bindparam("phone")))
)
RECORD_LOGIN = Prepared(
    update(_users).where(_users.c.id == bindparam("user_id"))
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
        ratelimit.hit(s, Window(f"sms:ip:{ip}", r.ip_hourly, 3600), now)

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

    async def register(self, raw_phone: Any, password: str, code: str) -> Grant:
        phone = self.phone(raw_phone)
        check_password_policy(password)
        password_hash = await self.db.offloader.cpu(self.passwords.hash, password)
        now = self.clock.now()

        def work(s: Session) -> Grant | None:
            if not self._consume_code(s, phone, "regist", code, now):
                return None  # commit: the wrong guess is counted
            user = User(phone=phone, password_hash=password_hash, created_at=now, last_login_at=now)
            s.add(user)
            s.flush()  # IntegrityError here when another request registered the phone first
            return self._grant(session_cursor(s), user, now)

        try:
            grant = await self.db.run(work)
        except IntegrityError:
            raise PhoneTaken(field="phone") from None
        if grant is None:
            raise InvalidCode(field="code")
        return grant

    async def login(self, raw_phone: Any, password: str, client_ip: str) -> Grant:
        phone = self.phone(raw_phone)
        r = self.rules
        by_phone = Window(f"login:phone:{phone}", r.login_phone_failures, r.login_window)
        by_ip = Window(f"login:ip:{client_ip}", r.login_ip_failures, r.login_window)
        now = self.clock.now()
        # One statement: the user (or NULLs) and both failure counts.
        found = await self.db.run_direct(lambda c: c.first(LOGIN_LOOKUP, {
            "phone": phone, "phone_key": by_phone.key, "phone_start": by_phone.start(now),
            "ip_key": by_ip.key, "ip_start": by_ip.start(now)}))
        ratelimit.refuse_if_full(by_phone, found.phone_failures, now)
        ratelimit.refuse_if_full(by_ip, found.ip_failures, now)
        # Unknown phone: the hasher verifies against a decoy, so both failures cost the same time.
        ok = await self.db.offloader.cpu(self.passwords.verify, found.password_hash, password)
        if not ok or found.id is None:
            await self.db.run(lambda s: [ratelimit.hit(s, w, now, enforce=False) for w in (by_phone, by_ip)])
            raise InvalidCredentials()
        new_hash = None
        if self.passwords.needs_rehash(found.password_hash):
            new_hash = await self.db.offloader.cpu(self.passwords.hash, password)

        def work(c: Cursor) -> Grant:
            c.execute(RECORD_LOGIN, {"user_id": found.id, "now": now, "new_hash": new_hash})
            if found.phone_failures:
                c.execute(ratelimit.FORGET, {"key": by_phone.key})  # a success clears this phone's failures
            return self._grant(c, found, now)

        return await self.db.run_direct(work)

    async def logout(self, principal: Principal) -> None:
        now = self.clock.now()
        await self.db.run(
            lambda s: s.execute(
                update(AuthSession).where(AuthSession.id == principal.session_id).values(revoked_at=now)
            )
        )

    async def reset_password(self, raw_phone: Any, code: str, password: str) -> None:
        phone = self.phone(raw_phone)
        check_password_policy(password)
        password_hash = await self.db.offloader.cpu(self.passwords.hash, password)
        now = self.clock.now()

        def work(s: Session) -> bool:
            if not self._consume_code(s, phone, "reset", code, now):
                return False
            user_id = s.scalar(select(User.id).where(User.phone == phone))
            if user_id is None:
                return False
            s.execute(update(User).where(User.id == user_id).values(password_hash=password_hash))
            s.execute(
                update(AuthSession)
                .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
                .values(revoked_at=now)
            )
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
        """A new app session and its first H5 ticket for ``user`` (anything with id, phone, created_at)."""
        token, token_hash = tokens.new_secret()
        ttl = self.rules.token_ttl
        session_id = c.insert(NEW_SESSION, {"user_id": user.id, "token_hash": token_hash, "now": now,
                                            "expires_at": now + dt.timedelta(seconds=ttl)})
        ticket = create_ticket(c, session_id, now, self.ticket_ttl)
        return Grant(user=public_user(user), token=token, expires_in=ttl, session_id=session_id, h5_ticket=ticket)


def public_user(user: Any) -> dict[str, Any]:
    return {"id": user.id, "phone": user.phone, "created_at": isoformat(user.created_at)}
