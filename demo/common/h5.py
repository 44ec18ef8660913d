"""Scenario 3 rules: app session -> one-time ticket -> WebView cookie session -> home page visits.

A ticket is good once, for at most ``ticket_ttl`` seconds, and only while the app session that asked
for it is alive. The cookie session it becomes is checked against that app session on every request,
so app logout and password reset end the WebView's session too.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from demo.common import tokens
from demo.common.clock import Clock, isoformat
from demo.common.db import Database
from demo.common.errors import Unauthorized
from demo.common.phones import mask_phone
from demo.common.principal import Principal
from demo.models import AuthSession, H5Session, H5Ticket, Image, User

MAX_TICKET_TTL = 120
HOME_IMAGES = 60  # newest images shown on the home page


def create_ticket(s: Session, auth_session_id: int, now: dt.datetime, ttl: int = MAX_TICKET_TTL) -> str:
    """A new ticket for ``auth_session_id`` inside the caller's unit of work; returns the secret."""
    ticket, ticket_hash = tokens.new_secret()
    s.add(H5Ticket(ticket_hash=ticket_hash, auth_session_id=auth_session_id, created_at=now,
                   expires_at=now + dt.timedelta(seconds=min(ttl, MAX_TICKET_TTL))))
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
        return await self.db.run(lambda s: create_ticket(s, principal.session_id, now, self.rules.ticket_ttl))

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
        if not cookie or not tokens.looks_like_token(cookie):
            raise Unauthorized()
        cookie_hash, now = tokens.digest(cookie), self.clock.now()

        def lookup(s: Session):
            return s.execute(
                select(H5Session.id, AuthSession.id.label("auth_session_id"), User.id.label("user_id"), User.phone)
                .join(AuthSession, AuthSession.id == H5Session.auth_session_id)
                .join(User, User.id == AuthSession.user_id)
                .where(H5Session.cookie_hash == cookie_hash, H5Session.revoked_at.is_(None),
                       H5Session.expires_at > now, *_live_app_session(now))
            ).first()

        row = await self.db.run(lookup)
        if row is None:
            raise Unauthorized()
        return Principal(user_id=row.user_id, session_id=row.auth_session_id, phone=row.phone, h5_session_id=row.id)

    async def visit_home(self, principal: Principal) -> dict[str, Any]:
        """Record one home-page view (a single UPDATE) and return what the page shows."""
        now = self.clock.now()

        def work(s: Session) -> dict[str, Any]:
            s.execute(update(User).where(User.id == principal.user_id)
                      .values(h5_visit_count=User.h5_visit_count + 1, h5_last_visit_at=now))
            user = s.execute(select(User.phone, User.created_at, User.last_login_at, User.h5_visit_count)
                             .where(User.id == principal.user_id)).one()
            images = s.execute(select(Image.id, Image.format, Image.width, Image.height)
                               .where(Image.owner_id == principal.user_id)
                               .order_by(Image.pk.desc()).limit(HOME_IMAGES)).all()
            return {
                "masked_phone": mask_phone(user.phone),
                "visit_count": user.h5_visit_count,
                "last_login_at": isoformat(user.last_login_at),
                "member_since": isoformat(user.created_at),
                "images": [dict(row._mapping) for row in images],
            }

        return await self.db.run(work)

    async def logout(self, principal: Principal) -> None:
        now = self.clock.now()
        await self.db.run(lambda s: s.execute(
            update(H5Session).where(H5Session.id == principal.h5_session_id).values(revoked_at=now)))
