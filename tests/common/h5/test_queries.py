"""demo/common/h5/queries.py: each unit of work on SQLite and MariaDB, without HTTP or rules."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from demo.common.accounts import queries as accounts
from demo.common.h5 import queries
from demo.common.infra.ratelimit import Window
from demo.models import H5Session, H5Ticket, Image, ImageBlob, User

NOW = dt.datetime(2026, 11, 22, 10, 0, 0, 123456)
LATER = NOW + dt.timedelta(minutes=1)
SESSION = queries.NewSession("c" * 64, NOW + dt.timedelta(hours=1))


@pytest.fixture
def db(app):
    return app.services.db


def signed_in(db, phone: str = "+8618866668888", n: str = "a") -> int:
    """A user with an app session (token n*64, until NOW + 1 day) and its ticket (ticket n*63+"t"); its id."""
    grant = accounts.NewGrant(n * 64, NOW + dt.timedelta(days=1), n * 63 + "t", NOW + dt.timedelta(minutes=2))
    return db.run_sync(accounts.register, f"pub-{n}", phone, "hash", Window("k", 1, 60), NOW, grant, NOW)


def test_a_ticket_becomes_a_session_once(db):
    session_id = signed_in(db)
    done = db.run_sync(queries.exchange, "a" * 63 + "t", None, NOW, SESSION, "o" * 64, LATER)
    assert (done.spent.auth_session_id, done.spent.phone, done.current, done.offered) == (
        session_id,
        "+8618866668888",
        None,
        False,
    )
    again = db.run_sync(
        queries.exchange, "a" * 63 + "t", None, NOW, queries.NewSession("d" * 64, LATER), "p" * 64, LATER
    )
    assert again.spent is None  # spent
    visitor = db.run_sync(queries.live_session, "c" * 64, NOW)
    assert (
        visitor.auth_session_id,
        visitor.phone,
        visitor.created_at,
        visitor.last_login_at,
        visitor.h5_visit_count,
    ) == (session_id, "+8618866668888", NOW, NOW, 0)
    assert db.run_sync(queries.live_session, "d" * 64, NOW) is None


def test_an_expired_ticket_or_one_of_a_dead_app_session_is_not_good(db):
    session_id = signed_in(db)
    late = NOW + dt.timedelta(minutes=2)
    assert db.run_sync(queries.exchange, "a" * 63 + "t", None, late, SESSION, "o" * 64, late).spent is None
    db.run_sync(queries.add_ticket, session_id, "n" * 64, NOW, LATER)
    db.run_sync(accounts.revoke_session, session_id, NOW)
    assert db.run_sync(queries.exchange, "n" * 64, None, NOW, SESSION, "o" * 64, LATER).spent is None
    assert db.run_sync(lambda s: s.scalars(select(H5Session)).all()) == []


def test_a_ticket_of_the_same_user_replaces_the_session_and_of_another_user_offers_a_switch(db):
    first = signed_in(db)
    db.run_sync(queries.exchange, "a" * 63 + "t", None, NOW, SESSION, "o" * 64, LATER)
    db.run_sync(queries.add_ticket, first, "m" * 64, NOW, LATER)
    replaced = db.run_sync(
        queries.exchange, "m" * 64, "c" * 64, NOW, queries.NewSession("d" * 64, LATER), "o" * 64, LATER
    )
    assert not replaced.offered and replaced.current.id
    assert db.run_sync(queries.live_session, "c" * 64, NOW) is None  # ended: the browser no longer holds it
    assert db.run_sync(queries.live_session, "d" * 64, NOW).auth_session_id == first

    signed_in(db, "+8613900000000", "b")
    offer = db.run_sync(
        queries.exchange, "b" * 63 + "t", "d" * 64, NOW, queries.NewSession("e" * 64, LATER), "o" * 64, LATER
    )
    assert offer.offered and offer.spent.phone == "+8613900000000" and offer.current.phone == "+8618866668888"
    assert db.run_sync(queries.live_session, "e" * 64, NOW) is None  # no session for the link yet
    current = db.run_sync(queries.live_session, "d" * 64, NOW)
    assert db.run_sync(queries.switch, "o" * 64, NOW, queries.NewSession("e" * 64, LATER), current.id) is True
    assert db.run_sync(queries.live_session, "d" * 64, NOW) is None
    assert db.run_sync(queries.live_session, "e" * 64, NOW).phone == "+8613900000000"
    assert db.run_sync(queries.switch, "o" * 64, NOW, queries.NewSession("f" * 64, LATER), None) is False


def test_visit_home_counts_a_view_and_lists_the_newest_images(db):
    signed_in(db)
    db.run_sync(queries.exchange, "a" * 63 + "t", None, NOW, SESSION, "o" * 64, LATER)
    [visit] = db.run_sync(queries.visit_home, "c" * 64, NOW)
    assert visit.h5_visit_count == 0 and visit.image_id is None

    def add_images(s):
        user_id = s.scalar(select(User.id))
        s.add(ImageBlob(sha256="f" * 64, refs=2, created_at=NOW))
        s.flush()
        s.add_all(
            Image(
                id=f"img{i}",
                owner_id=user_id,
                sha256="f" * 64,
                format="jpeg",
                width=i,
                height=1,
                bytes=1,
                created_at=NOW,
            )
            for i in (1, 2)
        )

    db.run_sync(add_images)
    rows = db.run_sync(queries.visit_home, "c" * 64, LATER)
    assert [(r.image_id, r.format, r.width, r.height) for r in rows] == [("img2", "jpeg", 2, 1), ("img1", "jpeg", 1, 1)]
    assert rows[0].h5_visit_count == 1
    user = db.run_sync(lambda s: s.scalars(select(User)).one())
    assert (user.h5_visit_count, user.h5_last_visit_at) == (2, LATER)
    assert db.run_sync(queries.visit_home, "x" * 64, NOW) == []


def test_end_session(db):
    signed_in(db)
    db.run_sync(queries.exchange, "a" * 63 + "t", None, NOW, SESSION, "o" * 64, LATER)
    db.run_sync(queries.end_session, db.run_sync(queries.live_session, "c" * 64, NOW).id, NOW)
    assert db.run_sync(queries.live_session, "c" * 64, NOW) is None
    assert db.run_sync(lambda s: s.scalar(select(H5Ticket.used_at))) == NOW
