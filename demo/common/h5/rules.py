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

from demo.common.accounts import tokens
from demo.common.accounts.phones import mask_phone
from demo.common.accounts.principal import Principal
from demo.common.errors import Unauthorized
from demo.common.h5 import queries
from demo.common.i18n import N_
from demo.common.infra.clock import Clock, isoformat
from demo.common.infra.db import Database, Row

if TYPE_CHECKING:
    from demo.conf.settings import Settings

XSRF_BYTES = 16  # of the session's HMAC in a form token: 128 bits


def new_ticket(now: dt.datetime, ttl: int) -> tuple[str, str, dt.datetime]:
    """A new ticket's secret, its hash (what is stored) and its expiry, ``ttl`` seconds on: the setting
    h5_ticket_ttl, whose range (demo/conf/settings.py, checked at start-up) caps it."""
    ticket, ticket_hash = tokens.new_secret()
    return ticket, ticket_hash, now + dt.timedelta(seconds=ttl)


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
    lang: str | None = None  # the link's (its app's) language: the choice page's


class H5:
    def __init__(self, db: Database, rules: H5Rules, clock: Clock | None = None, *, xsrf_key: bytes) -> None:
        self.db = db
        self.rules = rules
        self.clock = clock or Clock()
        self.xsrf_key = xsrf_key

    async def issue_ticket(self, principal: Principal, lang: str | None = None) -> str:
        """A ticket for the caller's app session; its pages are in ``lang`` (the app's language)."""
        now = self.clock.now()
        ticket, ticket_hash, expires_at = new_ticket(now, self.rules.ticket_ttl)
        await self.db.run(queries.add_ticket, principal.session_id, ticket_hash, now, expires_at, lang)
        return ticket

    async def exchange(self, ticket: str, current_cookie: str | None = None) -> str | SwitchOffer:
        """Spend a ticket (Unauthorized: unknown, used, expired). Returns the new cookie secret, which
        replaces the visitor's live H5 session (``current_cookie``) when that is the same user's; when
        it is another user's, that session stays and a ``SwitchOffer`` lets the visitor choose."""
        ticket_hash, now = _ticket_hash(ticket), self.clock.now()
        current_hash = _cookie_hash(current_cookie) if _is_cookie(current_cookie) else None
        cookie, session = self._new_session(now)
        offer, offer_hash, offer_expires_at = new_ticket(now, self.rules.ticket_ttl)
        done = await self.db.run(
            queries.exchange, ticket_hash, current_hash, now, session, offer_hash, offer_expires_at
        )
        if done.spent is None:
            raise _expired()
        if done.offered and done.current is not None:
            return SwitchOffer(offer, mask_phone(done.spent.phone), mask_phone(done.current.phone), done.spent.lang)
        return cookie

    async def switch(self, ticket: str, current: Principal) -> str:
        """The visitor chose the account of a ``SwitchOffer``: spend its ticket and end the current
        H5 session; returns the new cookie secret."""
        ticket_hash, now = _ticket_hash(ticket), self.clock.now()
        cookie, session = self._new_session(now)
        if not await self.db.run(queries.switch, ticket_hash, now, session, current.h5_session_id):
            raise _expired()
        return cookie

    def _new_session(self, now: dt.datetime) -> tuple[str, queries.NewSession]:
        """A new cookie secret and the session to store for it."""
        cookie, cookie_hash = tokens.new_secret()
        return cookie, queries.NewSession(cookie_hash, now + dt.timedelta(seconds=self.rules.session_ttl))

    async def authenticate(self, cookie: str | None) -> Principal:
        """The visitor behind an H5 cookie, while both it and its app session are alive."""
        row = await self.db.run(queries.live_session, _cookie_hash(cookie), self.clock.now())
        if row is None:
            raise Unauthorized()
        return _principal(row)

    async def visit_home(self, cookie: str | None) -> tuple[Principal, dict[str, Any]]:
        """Check the cookie, record one home-page view and return what the page shows: one unit of
        work, two statements (the visitor with their newest images, then the UPDATE), because this is
        the page every WebView opens."""
        rows = await self.db.run(queries.visit_home, _cookie_hash(cookie), self.clock.now())
        if not rows:
            raise Unauthorized()
        visitor = rows[0]
        return _principal(visitor), {
            "masked_phone": mask_phone(visitor.phone),
            "visit_count": visitor.h5_visit_count + 1,  # the row now holds this value
            "last_login_at": isoformat(visitor.last_login_at),
            "member_since": isoformat(visitor.created_at),
            "images": [
                {"id": r.image_id, "format": r.format, "width": r.width, "height": r.height}
                for r in rows
                if r.image_id is not None
            ],
        }

    async def logout(self, principal: Principal) -> None:
        await self.db.run(queries.end_session, principal.h5_session_id, self.clock.now())

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


def _expired() -> Unauthorized:
    return Unauthorized(N_("This link has expired or was already used. Open the page from the app again."))


def _ticket_hash(ticket: str) -> str:
    if not tokens.looks_like_token(ticket):
        raise Unauthorized()
    return tokens.digest(ticket)


def _is_cookie(cookie: str | None) -> bool:
    return cookie is not None and bool(cookie) and tokens.looks_like_token(cookie)


def _cookie_hash(cookie: str | None) -> str:
    if cookie is None or not _is_cookie(cookie):
        raise Unauthorized()
    return tokens.digest(cookie)


def _principal(row: Row) -> Principal:
    return Principal(
        user_id=row.user_id, session_id=row.auth_session_id, phone=row.phone, h5_session_id=row.id, lang=row.lang
    )
