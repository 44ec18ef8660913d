"""The SQL of H5 (tickets, cookie sessions, home-page visits): named units of work for ``Database.run``.

Every unit here is on the fast path (``@sql_unit``, hand-written ``Sql``): the ticket comes with
every login and the cookie check and the home visit with every page a WebView opens.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from demo.common.infra.db import Row, Sql, SqlCursor, idempotent, sql_unit

HOME_IMAGES = 60  # newest images shown on the home page

NEW_TICKET = Sql(
    "INSERT INTO h5_tickets (ticket_hash, auth_session_id, created_at, expires_at, lang)"
    " VALUES (:ticket_hash, :auth_session_id, :now, :expires_at, :lang)"
)
# A ticket that is good: unused, unexpired, and its app session alive.
GOOD_TICKET = Sql(
    "SELECT h5_tickets.id, h5_tickets.auth_session_id, h5_tickets.lang, users.id AS user_id,"
    " COALESCE(users.phone, users.former_phone) AS phone"
    " FROM h5_tickets JOIN auth_sessions ON auth_sessions.id = h5_tickets.auth_session_id"
    " JOIN users ON users.id = auth_sessions.user_id"
    " WHERE h5_tickets.ticket_hash = :ticket_hash AND h5_tickets.used_at IS NULL AND h5_tickets.expires_at > :now"
    " AND auth_sessions.revoked_at IS NULL AND auth_sessions.expires_at > :now"
)
# The conditional UPDATE is the single-use guarantee: of two racing exchanges, one wins.
SPEND_TICKET = Sql("UPDATE h5_tickets SET used_at = :now WHERE id = :id AND used_at IS NULL")
NEW_SESSION = Sql(
    "INSERT INTO h5_sessions (cookie_hash, auth_session_id, ticket_id, created_at, expires_at, lang)"
    " VALUES (:cookie_hash, :auth_session_id, :ticket_id, :now, :expires_at, :lang)"
)
END_SESSION = Sql("UPDATE h5_sessions SET revoked_at = :now WHERE id = :id")
# The visitor behind a cookie while both the cookie session and its app session are alive, and the
# language of its pages (its ticket's). A frozen account (its number recycled, see accounts/queries.py)
# shows the number it had, as the app does.
_VISITOR = (
    "h5_sessions.id, h5_sessions.lang, auth_sessions.id AS auth_session_id, users.id AS user_id,"
    " COALESCE(users.phone, users.former_phone) AS phone,"
    " users.created_at, users.last_login_at, users.h5_visit_count"
)
_LIVE = (
    " FROM h5_sessions JOIN auth_sessions ON auth_sessions.id = h5_sessions.auth_session_id"
    " JOIN users ON users.id = auth_sessions.user_id"
)
_LIVE_WHERE = (
    " WHERE h5_sessions.cookie_hash = :cookie_hash AND h5_sessions.revoked_at IS NULL"
    " AND h5_sessions.expires_at > :now AND auth_sessions.revoked_at IS NULL"
    " AND auth_sessions.expires_at > :now"
)
_VISITOR_TIMES = ("created_at", "last_login_at")
LIVE_SESSION = Sql(f"SELECT {_VISITOR}{_LIVE}{_LIVE_WHERE}", datetimes=_VISITOR_TIMES)
# The visitor on every row, with one of their newest images (or none: one row of NULLs).
HOME = Sql(
    f"SELECT {_VISITOR}, images.id AS image_id, images.format, images.width, images.height"
    f"{_LIVE} LEFT OUTER JOIN images ON images.owner_id = users.id{_LIVE_WHERE}"
    f" ORDER BY images.pk DESC LIMIT {HOME_IMAGES}",
    datetimes=_VISITOR_TIMES,
)
COUNT_VISIT = Sql("UPDATE users SET h5_visit_count = h5_visit_count + 1, h5_last_visit_at = :now WHERE id = :user_id")


@dataclass(frozen=True)
class NewSession:
    """A cookie session to create from a spent ticket (only the hash of the cookie is stored)."""

    cookie_hash: str
    expires_at: dt.datetime


@dataclass(frozen=True)
class Exchange:
    """What ``exchange`` did: ``spent`` is None when the ticket was not good (nothing else happened);
    ``current`` the visitor's live session, if any; ``offered`` whether an offer ticket was created
    (``current`` is another user's) instead of a new session."""

    spent: Row | None
    current: Row | None
    offered: bool


@sql_unit
def add_ticket(
    c: SqlCursor,
    auth_session_id: int,
    ticket_hash: str,
    now: dt.datetime,
    expires_at: dt.datetime,
    lang: str | None = None,
) -> None:
    """A new ticket for app session ``auth_session_id``, its pages in ``lang`` (the app's; None: the
    default language)."""
    params = {"ticket_hash": ticket_hash, "auth_session_id": auth_session_id, "now": now, "expires_at": expires_at}
    c.insert(NEW_TICKET, {**params, "lang": lang})


def spend_ticket(c: SqlCursor, ticket_hash: str, now: dt.datetime) -> Row | None:
    """The good ticket (its id, app session, language, user id and phone), now spent; None if it was not good."""
    ticket = c.first(GOOD_TICKET, {"ticket_hash": ticket_hash, "now": now})
    if ticket is None or c.execute(SPEND_TICKET, {"id": ticket.id, "now": now}) != 1:
        return None
    return ticket


def new_session(c: SqlCursor, spent: Row, session: NewSession, now: dt.datetime, replacing: int | None) -> None:
    """A cookie session from a spent ticket, in its language. The one it replaces ends: the browser no
    longer holds it."""
    if replacing is not None:
        end_session(c, replacing, now)
    c.insert(
        NEW_SESSION,
        {
            "cookie_hash": session.cookie_hash,
            "auth_session_id": spent.auth_session_id,
            "ticket_id": spent.id,
            "now": now,
            "expires_at": session.expires_at,
            "lang": spent.lang,
        },
    )


@sql_unit
def exchange(
    c: SqlCursor,
    ticket_hash: str,
    current_hash: str | None,
    now: dt.datetime,
    session: NewSession,
    offer_hash: str,
    offer_expires_at: dt.datetime,
) -> Exchange:
    """Spend a ticket. With a live session of the same user (``current_hash``), or none, the ticket
    becomes ``session`` (replacing that one); with another user's, the ticket's app session gets the
    offer ticket ``offer_hash`` instead and the current session stays."""
    spent = spend_ticket(c, ticket_hash, now)
    if spent is None:
        return Exchange(None, None, offered=False)
    current = live_session(c, current_hash, now) if current_hash else None
    if current is not None and current.user_id != spent.user_id:
        add_ticket(c, spent.auth_session_id, offer_hash, now, offer_expires_at, spent.lang)
        return Exchange(spent, current, offered=True)
    new_session(c, spent, session, now, replacing=current.id if current else None)
    return Exchange(spent, current, offered=False)


@sql_unit
def switch(c: SqlCursor, ticket_hash: str, now: dt.datetime, session: NewSession, replacing: int | None) -> bool:
    """Spend an offer ticket into ``session``, ending session ``replacing``; False if it was not good."""
    spent = spend_ticket(c, ticket_hash, now)
    if spent is None:
        return False
    new_session(c, spent, session, now, replacing)
    return True


@sql_unit
@idempotent
def live_session(c: SqlCursor, cookie_hash: str, now: dt.datetime) -> Row | None:
    """The visitor behind a cookie (``LIVE_SESSION``'s columns), or None."""
    return c.first(LIVE_SESSION, {"cookie_hash": cookie_hash, "now": now})


@sql_unit
def visit_home(c: SqlCursor, cookie_hash: str, now: dt.datetime) -> list[Row]:
    """Check the cookie and count one home-page view: the visitor on every row with one of their
    newest images (``HOME``), or no row (then nothing was counted)."""
    rows = c.all(HOME, {"cookie_hash": cookie_hash, "now": now})
    if rows:
        c.execute(COUNT_VISIT, {"user_id": rows[0].user_id, "now": now})
    return rows


@sql_unit
@idempotent  # sets the same time again
def end_session(c: SqlCursor, h5_session_id: int | None, now: dt.datetime) -> None:
    c.execute(END_SESSION, {"id": h5_session_id, "now": now})
