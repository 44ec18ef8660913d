"""Recycled numbers in demo/common/accounts/queries.py, on SQLite and MariaDB without HTTP: what makes an
account dormant, the reset, registration and SMS login that freeze it and give the number a fresh
account (once, for requests made at once: real threads on the real database), the lookups of a frozen
account, its purge; and migration 0012 (users copied on SQLite with every row that points at them)."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from alembic import command
from sqlalchemy import func, inspect, select, text, update

from demo.common.accounts import queries, tokens
from demo.common.errors import InvalidCredentials
from demo.common.infra import migrate, ratelimit
from demo.common.infra.db import Conflict
from demo.models import AuthSession, RateCounter, SmsCode, User
from tests.common.accounts.test_queries import CHECKS, NOW, PHONE, WINDOWS, grant, new_user
from tests.helpers import make_test_engine, sql_cursor

LATER = NOW + dt.timedelta(days=400)
DORMANT_BEFORE = LATER - dt.timedelta(days=365)  # after NOW: a user last active at NOW is dormant at LATER
KEY = b"k" * 32


@pytest.fixture
def db(app):
    return app.services.db


def users(db) -> list[tuple[int, str | None, str | None, dt.datetime | None, str]]:
    """Every user as (id, phone, former_phone, frozen_at, password_hash), oldest first."""
    query = select(User.id, User.phone, User.former_phone, User.frozen_at, User.password_hash).order_by(User.id)
    return [tuple(row) for row in db.run_sync(lambda s: s.execute(query).all())]


def dormant(db, dormant_before: dt.datetime | None, now: dt.datetime = LATER) -> bool:
    row = db.run_sync(
        lambda s: sql_cursor(s).first(queries.HOLDER, {"phone": PHONE, "dormant_before": dormant_before, "now": now})
    )
    return bool(row.dormant)


def live_sessions(db, user_id: int) -> int:
    live = select(func.count()).where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
    return db.run_sync(lambda s: s.scalar(live))


def reset(db, password_hash: str = "new", dormant_before: dt.datetime | None = DORMANT_BEFORE) -> bool:
    family = queries.login_phone_key(PHONE)
    return db.run_sync(queries.reset_password, PHONE, password_hash, CHECKS, LATER, family, LATER, dormant_before)


def test_an_account_is_dormant_without_a_login_a_session_used_or_an_h5_visit_since(db):
    session_id = new_user(db)  # registered (a login) at NOW, its session expiring an hour later
    assert dormant(db, NOW + dt.timedelta(seconds=1))
    assert not dormant(db, NOW)  # active at that very time
    assert not dormant(db, None)  # the rule is off
    used = NOW + dt.timedelta(days=100)
    db.run_sync(lambda s: s.execute(update(User).values(h5_last_visit_at=used)))
    assert not dormant(db, DORMANT_BEFORE - dt.timedelta(days=1)) and dormant(db, used + dt.timedelta(seconds=1))
    # A live session used since keeps the account, an expired or ended one does not.
    later_use = {"last_used_at": used + dt.timedelta(days=10), "expires_at": LATER + dt.timedelta(days=1)}
    db.run_sync(lambda s: s.execute(update(AuthSession).where(AuthSession.id == session_id).values(**later_use)))
    assert not dormant(db, used + dt.timedelta(days=5))
    assert not dormant(db, used + dt.timedelta(days=5), now=LATER)
    assert dormant(db, used + dt.timedelta(days=5), now=LATER + dt.timedelta(days=2))  # expired by then
    db.run_sync(lambda s: s.execute(update(AuthSession).values(revoked_at=LATER)))
    assert dormant(db, used + dt.timedelta(days=5))


def test_a_reset_freezes_a_dormant_account_and_gives_the_number_a_fresh_one_with_the_password(db):
    new_user(db)
    old = users(db)[0][0]
    assert reset(db) is True
    (frozen_id, *frozen), (fresh_id, *fresh) = users(db)
    assert frozen_id == old and frozen == [None, PHONE, LATER, "hash"]
    assert fresh == [PHONE, None, None, "new"]
    assert live_sessions(db, old) == 0  # whoever held its sessions proves no more than the number's holder
    # The fresh account is active (made now): the next reset is its own.
    assert reset(db, "newer") is True
    assert users(db)[1] == (fresh_id, PHONE, None, None, "newer")


def test_a_reset_of_an_active_account_sets_its_password_as_before(db):
    new_user(db)
    assert reset(db, dormant_before=NOW - dt.timedelta(seconds=1)) is True
    assert [u[1:] for u in users(db)] == [(PHONE, None, None, "new")]
    assert reset(db, dormant_before=None) is True  # the rule off
    assert db.run_sync(queries.reset_password, "+8618866660000", "x", CHECKS, LATER, "f", LATER, None) is False


def test_a_registration_freezes_a_dormant_account_and_an_active_one_conflicts_with_nothing_changed(db):
    new_user(db)
    args = ("pubfresh", PHONE, "registered", CHECKS, LATER, grant("u" * 64, "v" * 64), LATER)
    with pytest.raises(Conflict):
        db.run_sync(queries.register, *args, NOW - dt.timedelta(seconds=1))
    assert [u[1:] for u in users(db)] == [(PHONE, None, None, "hash")]
    session_id = db.run_sync(queries.register, *args, DORMANT_BEFORE)
    assert [u[1:] for u in users(db)] == [(None, PHONE, LATER, "hash"), (PHONE, None, None, "registered")]
    assert live_sessions(db, users(db)[1][0]) == 1 and session_id


def issue_login_code(db, code_hash: str) -> None:
    code = SmsCode(phone=PHONE, purpose="login", code_hash=code_hash, created_at=LATER, expires_at=LATER, attempts=0)
    code.expires_at = LATER + dt.timedelta(minutes=5)
    db.run_sync(lambda s: s.add(code))


def code_login(db, code_hash: str, dormant_before: dt.datetime | None = DORMANT_BEFORE, token: str = "w"):
    """A login with a code as the rules make it: the code checked and spent, then the login recorded."""
    params = ratelimit.window_params(WINDOWS, LATER)
    found = db.run_sync(queries.reserve_code_login, PHONE, params, lambda found: None, code_hash, 5, LATER)
    if found is None:
        return None
    counted, new_grant = ratelimit.window_params(WINDOWS[:4], LATER), grant(token * 64, token * 64)
    return db.run_sync(queries.record_code_login, found, counted, None, None, new_grant, LATER, dormant_before, "fresh")


def test_an_sms_login_on_a_dormant_number_signs_in_to_a_fresh_account(db):
    new_user(db)
    good = tokens.keyed_digest(KEY, PHONE, "login", "123456")
    issue_login_code(db, good)
    session_id, found = code_login(db, good)
    (old, *frozen), (fresh, *made) = users(db)
    assert frozen == [None, PHONE, LATER, "hash"] and made == [PHONE, None, None, "fresh"]
    assert (found.id, found.phone, found.password_hash, found.created_at, found.deletion_pending) == (
        fresh,
        PHONE,
        "fresh",
        LATER,
        0,
    )
    assert found.public_id != "pub8866668888" and live_sessions(db, fresh) == 1 and live_sessions(db, old) == 0
    assert code_login(db, good) is None  # spent
    # The fresh account is active: the next code login is its own.
    issue_login_code(db, good)
    assert code_login(db, good, token="y")[1].id == fresh and len(users(db)) == 2


def test_a_phone_change_onto_a_dormant_number_freezes_its_account_and_a_stale_one_undoes_it(db):
    new_user(db)
    mover_session = new_user(db, phone="+8618866669999", token_hash="m" * 64, ticket_hash="n" * 64)
    mover = users(db)[1][0]
    db.run_sync(lambda s: s.execute(update(AuthSession).values(expires_at=LATER + dt.timedelta(days=1))))
    db.run_sync(lambda s: s.execute(update(AuthSession).where(AuthSession.user_id != mover).values(revoked_at=NOW)))
    attempt = ratelimit.window_params(WINDOWS[:4], LATER)

    def change(verified_hash: str):
        args = (mover, mover_session, "+8618866669999", PHONE, verified_hash, CHECKS, LATER, attempt, None, LATER)
        return db.run_sync(queries.change_phone, *args, LATER - dt.timedelta(days=1))

    with pytest.raises(InvalidCredentials):  # the password changed since it was checked: nothing stays
        change("an older hash")
    assert [u[1:3] for u in users(db)] == [(PHONE, None), ("+8618866669999", None)]
    # The mover's own session was used at LATER - 1 day at the latest: it is not dormant itself.
    assert change("hash").phone == PHONE
    assert [u[1:3] for u in users(db)] == [(None, PHONE), (PHONE, None)]


def test_the_frozen_account_lookups(db):
    new_user(db)
    assert db.run_sync(queries.frozen_account, PHONE, LATER) is None
    assert reset(db)  # the first account frozen at LATER
    first = users(db)[0][0]
    # The fresh account goes dormant and is frozen in turn, later: the login tries the latest one.
    again = LATER + dt.timedelta(days=400)
    family = queries.login_phone_key(PHONE)
    assert db.run_sync(
        queries.reset_password, PHONE, "third", CHECKS, again, family, again, again - dt.timedelta(days=365)
    )
    second = users(db)[1][0]
    found = db.run_sync(queries.frozen_account, PHONE, again)
    assert (found.id, found.phone, found.password_hash, found.deletion_pending) == (second, PHONE, "new", 0)
    # A final deletion is gone for logins: the one before it is not tried either (only the latest).
    db.run_sync(lambda s: s.execute(update(User).where(User.id == second).values(deletion_due_at=again)))
    assert db.run_sync(queries.frozen_account, PHONE, again).id == first
    own = db.run_sync(queries.account, first)
    assert (own.id, own.phone, own.password_hash) == (first, None, "hash")


def test_the_purge_of_a_frozen_account_leaves_the_numbers_codes_and_counters_to_its_holder(db):
    new_user(db)
    assert reset(db)
    frozen = users(db)[0][0]
    key = queries.sms_phone_key(PHONE)
    code = SmsCode(phone=PHONE, purpose="reset", code_hash="h", created_at=LATER, expires_at=LATER, attempts=0)
    db.run_sync(lambda s: s.add_all([code, RateCounter(key=key, window_start=0, count=1, expires_at=LATER)]))
    db.run_sync(lambda s: s.execute(update(User).where(User.id == frozen).values(deletion_due_at=LATER)))
    assert db.run_sync(queries.purge_user, frozen, LATER) is True
    assert [u[1] for u in users(db)] == [PHONE]
    assert db.run_sync(lambda s: s.scalar(select(func.count()).select_from(SmsCode))) == 1
    assert db.run_sync(lambda s: s.scalar(select(func.count()).select_from(RateCounter))) == 1


def at_once(*calls):
    """Run ``calls`` in threads released together (each on its own pooled connection); their results."""
    barrier, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(n, call):
        barrier.wait()
        try:
            results[n] = call()
        except Exception as error:  # noqa: BLE001 - handed to the test
            results[n] = error

    threads = [threading.Thread(target=run, args=(n, call)) for n, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.mark.parametrize("rounds", [5])
def test_requests_for_a_dormant_number_at_once_make_one_fresh_account(db, rounds):
    """Two resets (as two processes would run them), or a reset and an SMS login, for one dormant number
    at once: one freezes the account and makes the fresh one, the other acts on that fresh account."""
    good = tokens.keyed_digest(KEY, PHONE, "login", "123456")
    for n in range(rounds):
        db.run_sync(lambda s: [s.execute(text(f"DELETE FROM {t}")) for t in ("auth_sessions", "sms_codes", "users")])
        new_user(db)
        if n % 2:
            issue_login_code(db, good)
            done = at_once(lambda: reset(db, "a"), lambda: code_login(db, good))
            assert done[0] is True and done[1] is not None, done
        else:
            done = at_once(lambda: reset(db, "a"), lambda: reset(db, "b"))
            assert done == [True, True], done
        (_, *frozen), (fresh, *holder) = users(db)
        assert frozen[:2] == [None, PHONE] and holder[:2] == [PHONE, None], users(db)
        if n % 2:
            assert done[1][1].id == fresh


# -- migration 0012 --------------------------------------------------------------------------------------


def test_0012_keeps_every_user_and_what_points_at_them_and_downgrades_only_without_frozen_accounts(
    empty_database_url,
):
    engine = make_test_engine(empty_database_url)
    rows = [
        "INSERT INTO users (public_id, phone, password_hash, created_at, h5_visit_count)"
        " VALUES ('pub', '+8618866668888', 'x', :now, 0)",
        "INSERT INTO auth_sessions (user_id, token_hash, created_at, expires_at) VALUES (1, 't', :now, :now)",
        "INSERT INTO h5_tickets (ticket_hash, auth_session_id, created_at, expires_at) VALUES ('k', 1, :now, :now)",
    ]
    counts = text(
        "SELECT (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM auth_sessions), (SELECT COUNT(*) FROM h5_tickets)"
    )
    try:
        migrate.upgrade(engine, "0010")
        with engine.begin() as conn:
            for row in rows:
                conn.execute(text(row), {"now": NOW})
        migrate.upgrade(engine, "0012")
        with engine.connect() as conn:
            assert tuple(conn.execute(counts).one()) == (1, 1, 1)
        with engine.begin() as conn:
            conn.execute(text("UPDATE users SET former_phone = phone, phone = NULL, frozen_at = :now"), {"now": NOW})
        with pytest.raises(RuntimeError, match="frozen accounts"):
            command.downgrade(migrate.alembic_config(engine), "0010")
        with engine.begin() as conn:
            conn.execute(text("UPDATE users SET phone = former_phone, former_phone = NULL, frozen_at = NULL"))
        command.downgrade(migrate.alembic_config(engine), "0010")
        with engine.connect() as conn:
            assert tuple(conn.execute(counts).one()) == (1, 1, 1)
        columns = {c["name"]: c for c in inspect(engine).get_columns("users")}
        assert "former_phone" not in columns and columns["phone"]["nullable"] is False
    finally:
        engine.dispose()
