"""demo/common/accounts/queries.py: each unit of work on SQLite and MariaDB, without HTTP or rules."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select, update

from demo.common.accounts import queries
from demo.common.errors import RateLimited, Unauthorized
from demo.common.infra import ratelimit
from demo.common.infra.db import Conflict
from demo.common.infra.ratelimit import Window
from demo.models import AuthSession, H5Ticket, RateCounter, SmsCode, SmsOutbox, User
from tests.helpers import sql_cursor

PHONE = "+8618866668888"
NOW = dt.datetime(2026, 11, 22, 10, 0, 0, 123456)
CHECKS = Window("code:ip:127.0.0.1", 30, 3600)


def grant(token_hash: str = "t" * 64, ticket_hash: str = "k" * 64, ttl: int = 3600) -> queries.NewGrant:
    return queries.NewGrant(token_hash, NOW + dt.timedelta(seconds=ttl), ticket_hash, NOW + dt.timedelta(seconds=120))


def token_check(db, token_hash: str, at: dt.datetime):
    """``session_of_token`` at ``at``, writing the last use as the rules do (when a minute old)."""
    return db.run_sync(queries.session_of_token, token_hash, at, at - dt.timedelta(seconds=60))


def new_user(db, phone: str = PHONE, **kw) -> int:
    """A registered user (password hash "hash"); the id of their app session."""
    return db.run_sync(queries.register, f"pub{phone[-10:]}", phone, "hash", CHECKS, NOW, grant(**kw), NOW)


def count(db, model) -> int:
    return db.run_sync(lambda s: s.scalar(select(func.count()).select_from(model)))


@pytest.fixture
def db(app):
    return app.services.db


def test_register_stores_the_user_signed_in(db):
    session_id = new_user(db)
    user = db.run_sync(lambda s: s.scalars(select(User)).one())
    assert (
        user.public_id,
        user.phone,
        user.password_hash,
        user.created_at,
        user.last_login_at,
        user.h5_visit_count,
    ) == ("pub8866668888", PHONE, "hash", NOW, NOW, 0)
    session = db.run_sync(lambda s: s.get(AuthSession, session_id))
    assert (session.user_id, session.token_hash, session.expires_at) == (user.id, "t" * 64, NOW + dt.timedelta(hours=1))
    ticket = db.run_sync(lambda s: s.scalars(select(H5Ticket)).one())
    assert (ticket.auth_session_id, ticket.ticket_hash, ticket.used_at) == (session_id, "k" * 64, None)


def test_register_of_a_taken_phone_is_a_conflict_and_leaves_nothing(db):
    new_user(db)
    with pytest.raises(Conflict):
        new_user(db, token_hash="u" * 64, ticket_hash="v" * 64)
    assert (count(db, User), count(db, AuthSession), count(db, H5Ticket)) == (1, 1, 1)


def test_session_of_token_only_while_it_lives(db):
    session_id = new_user(db)
    row = token_check(db, "t" * 64, NOW)
    assert (row.id, row.phone) == (session_id, PHONE) and row.user_id
    assert token_check(db, "x" * 64, NOW) is None
    assert token_check(db, "t" * 64, NOW + dt.timedelta(hours=1)) is None  # expired
    db.run_sync(queries.revoke_session, session_id, NOW)
    assert token_check(db, "t" * 64, NOW) is None


def test_profile_counts_images(db):
    new_user(db)
    user_id = db.run_sync(lambda s: s.scalar(select(User.id)))
    row = db.run_sync(queries.profile, user_id)
    assert (row.public_id, row.phone, row.created_at, row.last_login_at, row.image_count) == (
        "pub8866668888",
        PHONE,
        NOW,
        NOW,
        0,
    )
    assert db.run_sync(queries.profile, user_id + 1) is None


def request(phone: str = PHONE, resend_after: int = 60, phone_daily: int = 10) -> queries.CodeRequest:
    return queries.CodeRequest(
        phone,
        "regist",
        Window(f"sms:phone:{phone}", phone_daily, 86400),
        Window("sms:ip:127.0.0.1", 20, 3600),
        resend_after,
        NOW + dt.timedelta(minutes=5),
    )


def test_issue_code_stores_the_code_and_its_text_and_replaces_the_live_one(db):
    seen = []

    def compose(registered: bool, dormant: bool) -> queries.CodeText:
        seen.append(registered)
        return queries.CodeText("h" * 64, "text", "123456")

    db.run_sync(queries.issue_code, request(resend_after=0), NOW, compose)
    db.run_sync(queries.issue_code, request(resend_after=0), NOW + dt.timedelta(seconds=1), compose)
    codes = db.run_sync(lambda s: list(s.scalars(select(SmsCode).order_by(SmsCode.id))))
    assert [c.expires_at for c in codes] == [NOW + dt.timedelta(seconds=1), NOW + dt.timedelta(minutes=5)]
    assert all(c.code_hash == "h" * 64 and c.attempts == 0 and c.used_at is None for c in codes)
    texts = db.run_sync(lambda s: list(s.scalars(select(SmsOutbox).order_by(SmsOutbox.id))))
    assert [(t.sms_code_id, t.status, t.code, t.text) for t in texts] == [
        (codes[0].id, "pending", "123456", "text"),
        (codes[1].id, "pending", "123456", "text"),
    ]
    new_user(db)
    db.run_sync(
        queries.issue_code,
        request(resend_after=0),
        NOW + dt.timedelta(seconds=2),
        lambda registered, dormant: queries.CodeText("", None, None),
    )
    assert (
        seen == [False, False]
        and db.run_sync(lambda s: s.scalar(select(SmsOutbox.status).order_by(SmsOutbox.id.desc()).limit(1)))
        == "skipped"
    )


def test_issue_code_refuses_too_soon_and_past_the_limit_without_a_trace(db):
    compose = lambda registered, dormant: queries.CodeText("h" * 64, "text", "1")  # noqa: E731
    db.run_sync(queries.issue_code, request(), NOW, compose)
    with pytest.raises(RateLimited) as refused:
        db.run_sync(queries.issue_code, request(), NOW + dt.timedelta(seconds=20), compose)
    assert refused.value.retry_after == 40
    with pytest.raises(RateLimited):
        db.run_sync(queries.issue_code, request(resend_after=0, phone_daily=1), NOW + dt.timedelta(seconds=61), compose)
    assert (count(db, SmsCode), count(db, SmsOutbox)) == (1, 1)
    counted = db.run_sync(lambda s: s.scalar(select(func.sum(RateCounter.count)).where(RateCounter.key.like("sms:%"))))
    assert counted == 2  # the first request's two windows: the refused requests were rolled back


def test_claim_code_spends_a_good_code_once_and_counts_wrong_guesses(db):
    compose = lambda registered, dormant: queries.CodeText("h" * 64, "text", "1")  # noqa: E731
    db.run_sync(queries.issue_code, request(), NOW, compose)
    claim = lambda code_hash, max_attempts=5: db.run_sync(  # noqa: E731
        queries.claim_code, PHONE, "regist", code_hash, CHECKS, max_attempts, NOW
    )
    assert claim("x" * 64) is False
    assert db.run_sync(lambda s: s.scalar(select(SmsCode.attempts))) == 1
    assert claim("h" * 64, max_attempts=1) is False  # out of tries
    assert claim("h" * 64) is True
    assert claim("h" * 64) is False  # spent
    assert db.run_sync(lambda s: s.scalar(select(SmsCode.used_at))) == NOW


def test_claim_code_refused_by_the_client_limit_leaves_the_code_its_tries(db):
    db.run_sync(queries.issue_code, request(), NOW, lambda registered, dormant: queries.CodeText("h" * 64, "t", "1"))
    with pytest.raises(RateLimited):
        db.run_sync(queries.claim_code, PHONE, "regist", "x" * 64, Window("code:ip:x", 0, 3600), 5, NOW)
    assert db.run_sync(lambda s: s.scalar(select(SmsCode.attempts))) == 0


LOGIN = [
    Window("login:ip:c", 100, 900),
    Window(f"login:phone:{PHONE}", 10, 900),
    Window(f"login:phone:{PHONE}:from:c", 10, 900),
    Window(f"login:phone:{PHONE}:pace", 1, 60),
]
KNOWN = Window(f"login:phone:{PHONE}:from:c:ok", 1, 3600)


def login_params() -> dict:
    return {
        **ratelimit.window_params(LOGIN, NOW),
        **ratelimit.window_params([KNOWN], NOW, queries.TRUSTED),
        **ratelimit.window_params([KNOWN], NOW + dt.timedelta(hours=1), queries.TRUSTED_NEXT),
    }


def test_reserve_login_counts_the_attempt_and_reads_the_user_and_the_counts(db):
    new_user(db)
    admitted = []
    found = db.run_sync(queries.reserve_login, PHONE, login_params(), admitted.append, NOW)
    assert admitted == [found]
    assert (found.phone, found.password_hash, found.created_at) == (PHONE, "hash", NOW)
    assert (
        found.by_client_count,
        found.by_phone_count,
        found.by_phone_client_count,
        found.pace_count,
        found.trusted,
        found.trusted_next,
    ) == (1, 1, 1, 1, None, None)
    again = db.run_sync(queries.reserve_login, PHONE, login_params(), lambda row: None, NOW)
    assert again.by_phone_count == 2
    stranger = db.run_sync(queries.reserve_login, "+8613900000000", login_params(), lambda row: None, NOW)
    assert stranger.id is None and stranger.password_hash is None


def test_a_refused_login_counts_nowhere(db):
    def refuse(row):
        raise RateLimited(1)

    with pytest.raises(RateLimited):
        db.run_sync(queries.reserve_login, PHONE, login_params(), refuse, NOW)
    assert db.run_sync(queries.reserve_login, PHONE, login_params(), lambda row: None, NOW).by_client_count == 1


def test_record_login_gives_the_attempt_back_and_signs_in(db):
    new_user(db)
    found = db.run_sync(queries.reserve_login, PHONE, login_params(), lambda row: None, NOW)
    found = db.run_sync(queries.reserve_login, PHONE, login_params(), lambda row: None, NOW)
    remember = {**ratelimit.window_params([KNOWN], NOW), **ratelimit.window_params([KNOWN], NOW, 1)}
    later = NOW + dt.timedelta(seconds=5)
    session_id = db.run_sync(
        queries.record_login,
        found,
        "rehashed",
        login_params(),
        LOGIN[2].key,
        remember,
        grant("s" * 64, "q" * 64),
        later,
    )
    assert token_check(db, "s" * 64, later).id == session_id
    user = db.run_sync(lambda s: s.scalars(select(User)).one())
    assert (user.password_hash, user.last_login_at) == ("rehashed", later)
    after = db.run_sync(queries.reserve_login, PHONE, login_params(), lambda row: None, NOW)
    # by_client: 2 attempts - 1 given back + this one; by_phone_client forgotten; the client remembered.
    assert (after.by_client_count, after.by_phone_client_count, after.trusted) == (2, 1, 2)


def test_record_login_writes_nothing_once_the_password_changed(db):
    new_user(db)
    found = db.run_sync(queries.reserve_login, PHONE, login_params(), lambda row: None, NOW)
    db.run_sync(queries.reset_password, PHONE, "new", CHECKS, NOW, f"login:phone:{PHONE}", NOW)
    assert db.run_sync(queries.record_login, found, None, login_params(), None, None, grant("s" * 64), NOW) is None
    assert token_check(db, "s" * 64, NOW) is None


def test_reset_password_revokes_sessions_and_forgets_the_phones_login_counters(db):
    session_id = new_user(db)
    db.run_sync(queries.reserve_login, PHONE, login_params(), lambda row: None, NOW)
    assert (
        db.run_sync(queries.reset_password, "+8613900000000", "new", CHECKS, NOW, "login:phone:+8613900000000", NOW)
        is False
    )
    assert db.run_sync(queries.reset_password, PHONE, "new", CHECKS, NOW, f"login:phone:{PHONE}", NOW) is True
    assert db.run_sync(lambda s: s.get(AuthSession, session_id)).revoked_at == NOW
    assert db.run_sync(lambda s: s.scalar(select(User.password_hash))) == "new"
    found = db.run_sync(queries.reserve_login, PHONE, login_params(), lambda row: None, NOW)
    assert (found.by_client_count, found.by_phone_count, found.by_phone_client_count) == (2, 1, 1)  # by ip kept


def test_sweeps_delete_only_what_expired(db):
    new_user(db, ttl=60)
    compose = lambda registered, dormant: queries.CodeText("h" * 64, "text", "1")  # noqa: E731
    db.run_sync(queries.issue_code, request(), NOW, compose)
    later = NOW + dt.timedelta(hours=1)
    assert db.run_sync(
        lambda s: (queries.sweep_sessions(sql_cursor(s), NOW), queries.sweep_sessions(sql_cursor(s), later))
    ) == (0, 1)
    assert db.run_sync(lambda s: queries.sweep_codes(sql_cursor(s), later)) == 0  # its text still waits
    db.run_sync(lambda s: s.execute(SmsOutbox.__table__.update().values(status="sent")))
    assert db.run_sync(lambda s: queries.sweep_codes(sql_cursor(s), later)) == 1


# -- the list of sessions, password and phone changes -----------------------------------------------


def session_row(db, session_id: int) -> AuthSession:
    return db.run_sync(lambda s: s.get(AuthSession, session_id))


def user_id_of(db, phone: str = PHONE) -> int:
    return db.run_sync(lambda s: s.scalar(select(User.id).where(User.phone == phone)))


def test_a_new_session_carries_its_device_and_a_random_public_id(db):
    session_id = db.run_sync(
        queries.register,
        "pub8866668888",
        PHONE,
        "hash",
        CHECKS,
        NOW,
        queries.NewGrant("t" * 64, NOW, "k" * 64, NOW, user_agent="DemoApp/1.0", ip="203.0.113.0/24"),
        NOW,
    )
    row = session_row(db, session_id)
    assert (row.last_used_at, row.user_agent, row.ip) == (NOW, "DemoApp/1.0", "203.0.113.0/24")
    assert len(row.public_id) == 22 and row.public_id != grant().public_id  # a fresh one per grant


def test_the_token_check_writes_the_last_use_at_most_once_a_minute(db, monkeypatch):
    session_id = new_user(db)
    touches = []
    original = queries.SqlCursor.execute

    def spying(cursor, sql, params=queries.SqlCursor.execute.__defaults__[0]):
        touches.append(sql is queries.TOUCH_SESSION)
        return original(cursor, sql, params)

    monkeypatch.setattr(queries.SqlCursor, "execute", spying)
    minute = dt.timedelta(seconds=60)
    for seconds in (0, 30, 59):  # the login set it: nothing to write within the minute
        at = NOW + dt.timedelta(seconds=seconds)
        assert db.run_sync(queries.session_of_token, "t" * 64, at, at - minute).id == session_id
    assert touches == [] and session_row(db, session_id).last_used_at == NOW
    later = NOW + dt.timedelta(seconds=61)
    db.run_sync(queries.session_of_token, "t" * 64, later, later - minute)
    db.run_sync(queries.session_of_token, "t" * 64, later, later - minute)
    assert touches == [True] and session_row(db, session_id).last_used_at == later


def test_sessions_made_before_public_ids_get_one_when_first_listed(db):
    session_id = new_user(db)
    db.run_sync(lambda s: s.execute(update(AuthSession).values(public_id=None, last_used_at=None)))
    user_id = user_id_of(db)
    first = db.run_sync(queries.list_sessions, user_id, NOW)
    assert [(r.id, r.last_used_at) for r in first] == [(session_id, NOW)]  # no last use yet: its creation
    assert len(first[0].public_id) == 22 and session_row(db, session_id).public_id == first[0].public_id
    assert db.run_sync(queries.list_sessions, user_id, NOW)[0].public_id == first[0].public_id


def test_the_list_holds_only_the_users_live_sessions(db):
    mine = new_user(db)
    db.run_sync(queries.record_login, *login_args(db, "u" * 64))
    revoked = db.run_sync(queries.record_login, *login_args(db, "v" * 64))
    db.run_sync(queries.revoke_session, revoked, NOW)
    new_user(db, phone="+8618866669999", token_hash="w" * 64, ticket_hash="x" * 64)
    listed = db.run_sync(queries.list_sessions, user_id_of(db), NOW)
    assert len(listed) == 2 and mine in {r.id for r in listed} and revoked not in {r.id for r in listed}
    assert db.run_sync(queries.list_sessions, user_id_of(db), NOW + dt.timedelta(hours=2)) == []  # expired


def login_args(db, token_hash: str) -> tuple:
    """``record_login``'s arguments for a good login of PHONE's user (no counters to touch)."""
    found = db.run_sync(queries.reserve_login, PHONE, ratelimit.window_params(WINDOWS, NOW), lambda found: None, NOW)
    return found, None, ratelimit.window_params(WINDOWS[:4], NOW), None, None, grant(token_hash, token_hash), NOW


WINDOWS = [Window(f"login:test:{n}", 100, 900) for n in range(6)]


def test_end_session_only_ends_a_live_session_of_the_user(db):
    mine = new_user(db)
    theirs = new_user(db, phone="+8618866669999", token_hash="w" * 64, ticket_hash="x" * 64)
    their_id = session_row(db, theirs).public_id
    assert db.run_sync(queries.end_session, user_id_of(db), their_id, NOW) is False
    assert session_row(db, theirs).revoked_at is None
    my_id = session_row(db, mine).public_id
    assert db.run_sync(queries.end_session, user_id_of(db), my_id, NOW) is True
    assert db.run_sync(queries.end_session, user_id_of(db), my_id, NOW) is False  # already ended
    assert token_check(db, "t" * 64, NOW) is None


def test_end_other_sessions_keeps_the_callers_and_needs_it_alive(db):
    mine = new_user(db)
    others = [db.run_sync(queries.record_login, *login_args(db, h * 64)) for h in "uv"]
    assert db.run_sync(queries.end_other_sessions, user_id_of(db), mine, NOW) == 2
    assert [session_row(db, s).revoked_at for s in [mine, *others]] == [None, NOW, NOW]
    db.run_sync(queries.revoke_session, mine, NOW)
    with pytest.raises(Unauthorized):
        db.run_sync(queries.end_other_sessions, user_id_of(db), mine, NOW)


def test_change_password_replaces_only_the_verified_hash_and_ends_the_others(db):
    mine = new_user(db)
    other = db.run_sync(queries.record_login, *login_args(db, "u" * 64))
    attempt = ratelimit.window_params(WINDOWS[:4], NOW)
    assert db.run_sync(queries.change_password, user_id_of(db), mine, "hash", "new", attempt, NOW) is True
    assert db.run_sync(lambda s: s.scalar(select(User.password_hash))) == "new"
    assert (session_row(db, mine).revoked_at, session_row(db, other).revoked_at) == (None, NOW)
    # A second change that verified the old hash finds it gone: nothing written.
    assert db.run_sync(queries.change_password, user_id_of(db), mine, "hash", "newer", attempt, NOW) is False
    assert db.run_sync(lambda s: s.scalar(select(User.password_hash))) == "new"


def test_change_password_from_an_ended_session_changes_nothing(db):
    mine = new_user(db)
    db.run_sync(queries.revoke_session, mine, NOW)
    attempt = ratelimit.window_params(WINDOWS[:4], NOW)
    with pytest.raises(Unauthorized):
        db.run_sync(queries.change_password, user_id_of(db), mine, "hash", "new", attempt, NOW)
    assert db.run_sync(lambda s: s.scalar(select(User.password_hash))) == "hash"


def notice(text: str | None = "moved") -> queries.Notice:
    return queries.Notice(PHONE, "phone_notice", text, NOW + dt.timedelta(days=1))


def change_phone(db, session_id: int, new_phone: str, verified_hash: str = "hash", text: str | None = "moved"):
    attempt = ratelimit.window_params(WINDOWS[:4], NOW)
    return db.run_sync(
        queries.change_phone,
        user_id_of(db),
        session_id,
        PHONE,
        new_phone,
        verified_hash,
        CHECKS,
        NOW,
        attempt,
        notice(text),
        NOW,
    )


def test_change_phone_moves_the_user_and_queues_a_notice_to_the_old_phone(db):
    mine = new_user(db)
    user = change_phone(db, mine, "+8618866669999")
    assert (user.public_id, user.phone) == ("pub8866668888", "+8618866669999")
    code = db.run_sync(lambda s: s.scalars(select(SmsCode)).one())
    text = db.run_sync(lambda s: s.scalars(select(SmsOutbox)).one())
    assert (code.phone, code.purpose, code.code_hash, code.expires_at) == (
        PHONE,
        "phone_notice",
        "",
        NOW + dt.timedelta(days=1),
    )
    assert (text.sms_code_id, text.phone, text.status, text.code, text.text) == (
        code.id,
        PHONE,
        "pending",
        None,
        "moved",
    )


def test_change_phone_to_a_taken_phone_or_with_a_stale_password_leaves_nothing(db):
    mine = new_user(db)
    new_user(db, phone="+8618866669999", token_hash="w" * 64, ticket_hash="x" * 64)
    with pytest.raises(Conflict):
        change_phone(db, mine, "+8618866669999")
    assert change_phone(db, mine, "+8618866667777", verified_hash="an older hash") is None
    assert db.run_sync(lambda s: s.scalar(select(User.phone).where(User.public_id == "pub8866668888"))) == PHONE
    assert (count(db, SmsCode), count(db, SmsOutbox)) == (0, 0)
    db.run_sync(queries.revoke_session, mine, NOW)
    with pytest.raises(Unauthorized):
        change_phone(db, mine, "+8618866667777")
    assert (count(db, SmsCode), count(db, SmsOutbox)) == (0, 0)
