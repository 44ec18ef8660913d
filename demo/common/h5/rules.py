"""Scenario 3 rules: app session -> one-time ticket -> WebView cookie session -> home page visits.

A ticket is good once, for at most ``ticket_ttl`` seconds, and only while the app session that asked
for it is alive. The cookie session it becomes is checked against that app session on every request,
so app logout and password reset end the WebView's session too.

A ticket never silently replaces a live cookie session of another user (someone else's link would
otherwise sign the WebView into their account); the visitor is asked instead. Form tokens (XSRF)
are bound to the cookie session, so no cookie an attacker can plant makes a valid one.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from demo.common.accounts import tokens
from demo.common.infra.clock import Clock, isoformat
from demo.common.infra.db import Cursor, Database, Prepared, session_cursor
from demo.common.errors import Unauthorized
from demo.common.accounts.phones import mask_phone
from demo.common.accounts.principal import Principal
from demo.models import AuthSession, H5Session, H5Ticket, Image, User

if TYPE_CHECKING:
    from demo.conf.settings import Settings

MAX_TICKET_TTL = 120
HOME_IMAGES = 60  # newest images shown on the home page
XSRF_BYTES = 16  # of the session's HMAC in a form token: 128 bits


def create_ticket(c: Cursor, auth_session_id: int, now: dt.datetime, ttl: int = MAX_TICKET_TTL) -> str:
    """A new ticket for ``auth_session_id`` inside the caller's unit of work; returns the secret."""
    ticket, ticket_hash = tokens.new_secret()
    c.insert(NEW_TICKET, {"ticket_hash": ticket_hash, "auth_session_id": auth_session_id, "now": now,
                          "expires_at": now + dt.timedelta(seconds=min(ttl, MAX_TICKET_TTL))})
    return ticket


def _live_app_session(now: dt.datetime):
    return (AuthSession.revoked_at.is_(None), AuthSession.expires_at > now)


@dataclass(frozen=True, kw_only=True)
class H5Rules:
    """The settings the H5 rules read (defaults and meaning: demo/conf/settings.py)."""

    ticket_ttl: int
    session_ttl: int

    @classmethod
    def from_settings(cls, settings: Settings) -> H5Rules:
        return cls(ticket_ttl=settings.h5_ticket_ttl, session_ttl=settings.h5_session_ttl)


@dataclass(frozen=True)
class SwitchOffer:
    """A ticket of one user reached a WebView signed in as another: what the choice page shows.

    The link's own ticket is spent (its URL stays in the history and with whoever sent it);
    ``ticket`` is a fresh one for the same app session that lives only in the choice page's form,
    whose post needs the current session's XSRF token."""

    ticket: str
    link_phone: str  # masked: the account the link belongs to
    current_phone: str  # masked: the account the WebView stays signed in as


class H5:
    def __init__(self, db: Database, rules: H5Rules, clock: Clock | None = None, *,
                 xsrf_key: bytes) -> None:
        self.db = db
        self.rules = rules
        self.clock = clock or Clock()
        self.xsrf_key = xsrf_key

    async def issue_ticket(self, principal: Principal) -> str:
        now = self.clock.now()
        return await self.db.run_direct(lambda c: create_ticket(c, principal.session_id, now, self.rules.ticket_ttl))

    async def exchange(self, ticket: str, current_cookie: str | None = None) -> str | SwitchOffer:
        """Spend a ticket (Unauthorized: unknown, used, expired). Returns the new cookie secret, which
        replaces the visitor's live H5 session (``current_cookie``) when that is the same user's; when
        it is another user's, that session stays and a ``SwitchOffer`` lets the visitor choose."""
        ticket_hash, now = _ticket_hash(ticket), self.clock.now()
        current_hash = _cookie_hash(current_cookie) if _is_cookie(current_cookie) else None

        def work(s: Session) -> str | SwitchOffer | None:
            spent = self._spend(s, ticket_hash, now)
            if spent is None:
                return None
            c = session_cursor(s)
            current = c.first(LIVE_SESSION, {"cookie_hash": current_hash, "now": now}) if current_hash else None
            if current is not None and current.user_id != spent.user_id:
                offer = create_ticket(c, spent.auth_session_id, now, self.rules.ticket_ttl)
                return SwitchOffer(offer, mask_phone(spent.phone), mask_phone(current.phone))
            return self._new_session(s, spent, now, replacing=current.id if current else None)

        return _granted(await self.db.run(work))

    async def switch(self, ticket: str, current: Principal) -> str:
        """The visitor chose the account of a ``SwitchOffer``: spend its ticket and end the current
        H5 session; returns the new cookie secret."""
        ticket_hash, now = _ticket_hash(ticket), self.clock.now()

        def work(s: Session) -> str | None:
            spent = self._spend(s, ticket_hash, now)
            return None if spent is None else self._new_session(s, spent, now, replacing=current.h5_session_id)

        return _granted(await self.db.run(work))

    def _spend(self, s: Session, ticket_hash: str, now: dt.datetime) -> Any:
        """The ticket's id, app session, user id and phone, the ticket now spent; None if it was not good."""
        row = s.execute(
            select(H5Ticket.id, H5Ticket.auth_session_id, User.id.label("user_id"), User.phone)
            .join(AuthSession, AuthSession.id == H5Ticket.auth_session_id)
            .join(User, User.id == AuthSession.user_id)
            .where(H5Ticket.ticket_hash == ticket_hash, H5Ticket.used_at.is_(None), H5Ticket.expires_at > now,
                   *_live_app_session(now))
        ).first()
        if row is None:
            return None
        # The conditional UPDATE is the single-use guarantee: of two racing exchanges, one wins.
        spent = s.execute(
            update(H5Ticket).where(H5Ticket.id == row.id, H5Ticket.used_at.is_(None)).values(used_at=now)
        ).rowcount
        return row if spent == 1 else None

    def _new_session(self, s: Session, spent: Any, now: dt.datetime, replacing: int | None) -> str:
        """A cookie session from a spent ticket. The one it replaces ends: the browser no longer holds it."""
        if replacing is not None:
            s.execute(update(H5Session).where(H5Session.id == replacing).values(revoked_at=now))
        cookie, cookie_hash = tokens.new_secret()
        s.add(H5Session(cookie_hash=cookie_hash, auth_session_id=spent.auth_session_id, ticket_id=spent.id,
                        created_at=now, expires_at=now + dt.timedelta(seconds=self.rules.session_ttl)))
        return cookie

    async def authenticate(self, cookie: str | None) -> Principal:
        """The visitor behind an H5 cookie, while both it and its app session are alive."""
        cookie_hash, now = _cookie_hash(cookie), self.clock.now()
        row = await self.db.run_direct(lambda c: c.first(LIVE_SESSION, {"cookie_hash": cookie_hash, "now": now}))
        if row is None:
            raise Unauthorized()
        return _principal(row)

    async def visit_home(self, cookie: str | None) -> tuple[Principal, dict[str, Any]]:
        """Check the cookie, record one home-page view and return what the page shows: one unit of
        work, two statements (the visitor with their newest images, then the UPDATE), because this is
        the page every WebView opens."""
        cookie_hash, now = _cookie_hash(cookie), self.clock.now()

        def work(c: Cursor) -> list[Any]:
            rows = c.all(HOME, {"cookie_hash": cookie_hash, "now": now})
            if rows:
                c.execute(COUNT_VISIT, {"user_id": rows[0].user_id, "now": now})
            return rows

        rows = await self.db.run_direct(work)
        if not rows:
            raise Unauthorized()
        visitor = rows[0]
        return _principal(visitor), {
            "masked_phone": mask_phone(visitor.phone),
            "visit_count": visitor.h5_visit_count + 1,  # the row now holds this value
            "last_login_at": isoformat(visitor.last_login_at),
            "member_since": isoformat(visitor.created_at),
            "images": [{"id": r.image_id, "format": r.format, "width": r.width, "height": r.height}
                       for r in rows if r.image_id is not None],
        }

    async def logout(self, principal: Principal) -> None:
        now = self.clock.now()
        await self.db.run(lambda s: s.execute(
            update(H5Session).where(H5Session.id == principal.h5_session_id).values(revoked_at=now)))

    # -- XSRF tokens: an HMAC of the cookie session, not a double-submitted cookie ----------------

    def xsrf_token(self, cookie: str | None) -> str:
        """The form token of the H5 session behind ``cookie`` (Unauthorized without one), masked with
        fresh random bytes on every page so that a compressed page cannot reveal it (BREACH)."""
        mask = secrets.token_bytes(XSRF_BYTES)
        return base64.urlsafe_b64encode(mask + _xor(mask, self._xsrf_mac(cookie))).decode().rstrip("=")

    def xsrf_matches(self, cookie: str | None, token: str) -> bool:
        """Whether ``token`` is a form token of the H5 session behind ``cookie`` (Unauthorized without one)."""
        expected = self._xsrf_mac(cookie)
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii") + b"=" * (-len(token) % 4))
        except (binascii.Error, UnicodeEncodeError):
            return False
        if len(raw) != 2 * XSRF_BYTES:
            return False
        return hmac.compare_digest(_xor(raw[:XSRF_BYTES], raw[XSRF_BYTES:]), expected)

    def _xsrf_mac(self, cookie: str | None) -> bytes:
        return hmac.new(self.xsrf_key, _cookie_hash(cookie).encode(), hashlib.sha256).digest()[:XSRF_BYTES]


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _granted(result: str | SwitchOffer | None) -> str | SwitchOffer:
    if result is None:
        raise Unauthorized("This link has expired or was already used. Open the page from the app again.")
    return result


def _ticket_hash(ticket: str) -> str:
    if not tokens.looks_like_token(ticket):
        raise Unauthorized()
    return tokens.digest(ticket)


def _is_cookie(cookie: str | None) -> bool:
    return bool(cookie) and tokens.looks_like_token(cookie)


def _cookie_hash(cookie: str | None) -> str:
    if not _is_cookie(cookie):
        raise Unauthorized()
    return tokens.digest(cookie)


# The page every WebView opens runs these on each view (see db.Prepared for why they are prepared).
_h5, _app, _users, _images = (H5Session.__table__, AuthSession.__table__, User.__table__, Image.__table__)
_tickets = H5Ticket.__table__
NEW_TICKET = Prepared(insert(_tickets).values(
    ticket_hash=bindparam("ticket_hash"), auth_session_id=bindparam("auth_session_id"), created_at=bindparam("now"),
    expires_at=bindparam("expires_at")))
_VISITOR = (_h5.c.id, _app.c.id.label("auth_session_id"), _users.c.id.label("user_id"), _users.c.phone,
            _users.c.created_at, _users.c.last_login_at, _users.c.h5_visit_count)
_LIVE = _h5.join(_app, _app.c.id == _h5.c.auth_session_id).join(_users, _users.c.id == _app.c.user_id)
_LIVE_WHERE = (_h5.c.cookie_hash == bindparam("cookie_hash"), _h5.c.revoked_at.is_(None),
               _h5.c.expires_at > bindparam("now"), _app.c.revoked_at.is_(None), _app.c.expires_at > bindparam("now"))
LIVE_SESSION = Prepared(select(*_VISITOR).select_from(_LIVE).where(*_LIVE_WHERE))
# The visitor on every row, with one of their newest images (or none: one row of NULLs).
HOME = Prepared(
    select(*_VISITOR, _images.c.id.label("image_id"), _images.c.format, _images.c.width, _images.c.height)
    .select_from(_LIVE.outerjoin(_images, _images.c.owner_id == _users.c.id))
    .where(*_LIVE_WHERE).order_by(_images.c.pk.desc()).limit(HOME_IMAGES)
)
COUNT_VISIT = Prepared(
    update(_users).where(_users.c.id == bindparam("user_id"))
    .values(h5_visit_count=_users.c.h5_visit_count + 1, h5_last_visit_at=bindparam("now"))
)


def _principal(row: Any) -> Principal:
    return Principal(user_id=row.user_id, session_id=row.auth_session_id, phone=row.phone, h5_session_id=row.id)
