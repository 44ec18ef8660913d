"""Scenario 3 rules: app session -> one-time ticket -> WebView cookie session -> home page visits.

A ticket is good once, for at most ``ticket_ttl`` seconds, and only while the app session that asked
for it is alive. The cookie session it becomes is checked against that app session on every request,
so app logout and password reset end the WebView's session too.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from demo.common import tokens
from demo.common.clock import Clock, isoformat
from demo.common.db import Cursor, Database, Prepared
from demo.common.errors import Unauthorized
from demo.common.phones import mask_phone
from demo.common.principal import Principal
from demo.models import AuthSession, H5Session, H5Ticket, Image, User

MAX_TICKET_TTL = 120
HOME_IMAGES = 60  # newest images shown on the home page


def create_ticket(c: Cursor, auth_session_id: int, now: dt.datetime, ttl: int = MAX_TICKET_TTL) -> str:
    """A new ticket for ``auth_session_id`` inside the caller's unit of work; returns the secret."""
    ticket, ticket_hash = tokens.new_secret()
    c.insert(NEW_TICKET, {"ticket_hash": ticket_hash, "auth_session_id": auth_session_id, "now": now,
                          "expires_at": now + dt.timedelta(seconds=min(ttl, MAX_TICKET_TTL))})
    return ticket


def _live_app_session(now: dt.datetime):
    return (AuthSession.revoked_at.is_(None), AuthSession.expires_at > now)


@dataclass(frozen=True)
class H5Rules:
    ticket_ttl: int = MAX_TICKET_TTL
    session_ttl: int = 24 * 3600


class H5:
    def __init__(self, db: Database, rules: H5Rules = H5Rules(), clock: Clock | None = None) -> None:
        self.db = db
        self.rules = rules
        self.clock = clock or Clock()

    async def issue_ticket(self, principal: Principal) -> str:
        now = self.clock.now()
        return await self.db.run_direct(lambda c: create_ticket(c, principal.session_id, now, self.rules.ticket_ttl))

    async def exchange(self, ticket: str) -> str:
        """Spend a ticket; returns the new cookie secret, or Unauthorized (unknown, used, expired)."""
        if not tokens.looks_like_token(ticket):
            raise Unauthorized()
        ticket_hash, now = tokens.digest(ticket), self.clock.now()

        def work(s: Session) -> str | None:
            row = s.execute(
                select(H5Ticket.id, H5Ticket.auth_session_id)
                .join(AuthSession, AuthSession.id == H5Ticket.auth_session_id)
                .where(H5Ticket.ticket_hash == ticket_hash, H5Ticket.used_at.is_(None), H5Ticket.expires_at > now,
                       *_live_app_session(now))
            ).first()
            if row is None:
                return None
            # The conditional UPDATE is the single-use guarantee: of two racing exchanges, one wins.
            spent = s.execute(
                update(H5Ticket).where(H5Ticket.id == row.id, H5Ticket.used_at.is_(None)).values(used_at=now)
            ).rowcount
            if spent != 1:
                return None
            cookie, cookie_hash = tokens.new_secret()
            s.add(H5Session(cookie_hash=cookie_hash, auth_session_id=row.auth_session_id, ticket_id=row.id,
                            created_at=now, expires_at=now + dt.timedelta(seconds=self.rules.session_ttl)))
            return cookie

        cookie = await self.db.run(work)
        if cookie is None:
            raise Unauthorized("This link has expired or was already used. Open the page from the app again.")
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


def _cookie_hash(cookie: str | None) -> str:
    if not cookie or not tokens.looks_like_token(cookie):
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
