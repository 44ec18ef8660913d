"""Account deletion and SMS login in demo/common/accounts/queries.py, and the purge of
demo/common/housekeeping.py, on SQLite and MariaDB without HTTP; migration 0010 in place."""

from __future__ import annotations

import datetime as dt

import pytest
from alembic import command
from sqlalchemy import inspect, select, text, update

from demo.common import housekeeping
from demo.common.accounts import queries, tokens
from demo.common.errors import Unauthorized, Unavailable
from demo.common.infra import migrate, ratelimit
from demo.common.infra.db import long_work, sql_unit
from demo.models import AuthSession, Image, ImageBlob, RateCounter, SmsCode, User
from tests.common.accounts.test_queries import CHECKS, NOW, PHONE, WINDOWS, count, login_args, new_user
from tests.helpers import make_test_engine

OTHER = "+8618866669999"
DUE = NOW + dt.timedelta(days=7)
KEY = b"k" * 32


@pytest.fixture
def db(app):
    return app.services.db


def user_id(db, phone: str = PHONE) -> int:
    return db.run_sync(lambda s: s.scalar(select(User.id).where(User.phone == phone)))


def due_at(db, phone: str = PHONE) -> dt.datetime | None:
    return db.run_sync(lambda s: s.scalar(select(User.deletion_due_at).where(User.phone == phone)))


def schedule(db, session_id: int, verified_hash: str | None = "hash", refunds=(), due: dt.datetime = DUE) -> bool:
    return db.run_sync(queries.schedule_deletion, user_id(db), session_id, verified_hash, list(refunds), due, NOW)


def live_sessions(db) -> int:
    return len(db.run_sync(lambda s: s.scalars(select(AuthSession.id).where(AuthSession.revoked_at.is_(None))).all()))


def test_schedule_deletion_ends_every_session_and_gives_the_attempt_back(db):
    session_id = new_user(db)
    db.run_sync(_add_grant, 0)
    attempt = ratelimit.window_params([CHECKS], NOW)
    db.run_sync(lambda s: s.add(RateCounter(key=CHECKS.key, window_start=CHECKS.start(NOW), count=2, expires_at=DUE)))
    assert live_sessions(db) == 2
    assert schedule(db, session_id, refunds=[(attempt, 1)]) is True
    assert due_at(db) == DUE and live_sessions(db) == 0
    assert db.run_sync(lambda s: s.scalar(select(RateCounter.count))) == 1


def _add_grant(s, _: int) -> None:
    """A second session for PHONE's user (another device)."""
    user = s.scalar(select(User.id).where(User.phone == PHONE))
    s.add(AuthSession(user_id=user, token_hash="z" * 64, created_at=NOW, expires_at=DUE))


def test_schedule_deletion_writes_nothing_when_the_password_changed_or_the_session_ended(db):
    session_id = new_user(db)
    assert schedule(db, session_id, verified_hash="an older hash") is False
    assert due_at(db) is None and live_sessions(db) == 1
    assert schedule(db, session_id, verified_hash=None) is True  # a code proved it: no hash to compare
    with pytest.raises(Unauthorized):  # its session ended with the first: nothing changes
        schedule(db, session_id, verified_hash=None, due=DUE + dt.timedelta(days=1))
    assert due_at(db) == DUE


def test_a_login_in_the_grace_period_clears_the_deletion_and_a_final_one_is_gone(db):
    session_id = new_user(db)
    assert schedule(db, session_id)
    found, *rest = login_args(db, "u" * 64)
    assert found.id == user_id(db) and found.deletion_pending
    assert db.run_sync(queries.record_login, found, *rest) is not None
    assert due_at(db) is None
    # Scheduled again and final: the lookup finds no user, and a login read before cannot record.
    db.run_sync(lambda s: s.execute(update(User).values(deletion_due_at=NOW)))
    assert login_args(db, "v" * 64)[0].id is None
    assert db.run_sync(queries.record_login, found, None, *rest[1:]) is None
    assert due_at(db) == NOW


def code_login(db, code_hash: str, phone: str = PHONE):
    params = ratelimit.window_params(WINDOWS, NOW)
    return db.run_sync(queries.reserve_code_login, phone, params, lambda found: None, code_hash, 5, NOW)


def issue(db, phone: str, code_hash: str) -> None:
    db.run_sync(
        lambda s: s.add(
            SmsCode(phone=phone, purpose="login", code_hash=code_hash, created_at=NOW, expires_at=DUE, attempts=0)
        )
    )


def attempts(db, phone: str) -> list[tuple[int, bool]]:
    rows = db.run_sync(lambda s: s.execute(select(SmsCode.attempts, SmsCode.used_at).where(SmsCode.phone == phone)))
    return [(n, used is not None) for n, used in rows]


def test_reserve_code_login_spends_a_good_code_once_and_counts_wrong_ones(db):
    new_user(db)
    good = tokens.keyed_digest(KEY, PHONE, "login", "123456")
    issue(db, PHONE, good)
    assert code_login(db, tokens.keyed_digest(KEY, PHONE, "login", "000000")) is None
    assert attempts(db, PHONE) == [(1, False)]
    found = code_login(db, good)
    assert found is not None and found.id == user_id(db)
    assert attempts(db, PHONE) == [(1, True)]
    assert code_login(db, good) is None  # spent
    # Every attempt was counted in the login's windows (a good one is given back by record_login).
    assert db.run_sync(lambda s: s.scalar(select(RateCounter.count).where(RateCounter.key == WINDOWS[0].key))) == 3


def test_reserve_code_login_for_a_phone_without_an_account_takes_the_steps_of_a_wrong_guess(db):
    issue(db, OTHER, "")  # what a code request writes for it: a row without a code
    assert code_login(db, tokens.keyed_digest(KEY, OTHER, "login", "123456"), OTHER) is None
    assert attempts(db, OTHER) == [(1, False)]


def test_reserve_code_login_for_a_final_deletion_keeps_the_code(db):
    session_id = new_user(db)
    good = tokens.keyed_digest(KEY, PHONE, "login", "123456")
    issue(db, PHONE, good)
    assert schedule(db, session_id, due=NOW)
    assert code_login(db, good) is None and attempts(db, PHONE) == [(0, False)]


# -- the purge ------------------------------------------------------------------------------------------


def add_image(db, phone: str, sha256: str, image_id: str) -> None:
    def add(s) -> None:
        owner = s.scalar(select(User.id).where(User.phone == phone))
        if s.get(ImageBlob, sha256) is None:
            s.add(ImageBlob(sha256=sha256, refs=0, created_at=NOW))
            s.flush()
        s.execute(update(ImageBlob).where(ImageBlob.sha256 == sha256).values(refs=ImageBlob.refs + 1))
        s.add(
            Image(id=image_id, owner_id=owner, sha256=sha256, format="jpeg", width=1, height=1, bytes=1, created_at=NOW)
        )

    db.run_sync(add)


def refs(db) -> dict[str, int]:
    return dict(db.run_sync(lambda s: s.execute(select(ImageBlob.sha256, ImageBlob.refs)).all()))


def test_purge_user_deletes_the_account_its_images_codes_and_counters_only(db):
    session_id = new_user(db)
    new_user(db, phone=OTHER, token_hash="w" * 64, ticket_hash="x" * 64)
    add_image(db, PHONE, "a" * 64, "mine-shared-0000000")
    add_image(db, PHONE, "a" * 64, "mine-shared-1111111")
    add_image(db, PHONE, "b" * 64, "mine-only-000000000")
    add_image(db, OTHER, "a" * 64, "theirs-00000000000")
    issue(db, PHONE, "h" * 64)
    issue(db, OTHER, "h" * 64)
    for key in (f"sms:phone:{PHONE}", f"login:phone:{PHONE}:from:127.0.0.1", f"sms:phone:{OTHER}", "login:ip:x"):
        db.run_sync(lambda s, key=key: s.add(RateCounter(key=key, window_start=0, count=1, expires_at=DUE)))
    mine = user_id(db)
    assert schedule(db, session_id, due=NOW)

    assert db.run_sync(queries.due_deletions, NOW, 10) == [mine]
    assert db.run_sync(queries.purge_user, mine, NOW) is True
    assert user_id(db) is None and user_id(db, OTHER) is not None
    assert refs(db) == {"a" * 64: 1, "b" * 64: 0}  # the blobs are the sweep's: their legacy counts follow
    assert db.run_sync(lambda s: s.scalars(select(Image.id)).all()) == ["theirs-00000000000"]
    assert db.run_sync(lambda s: s.scalars(select(SmsCode.phone)).all()) == [OTHER]
    assert sorted(db.run_sync(lambda s: s.scalars(select(RateCounter.key)).all())) == [
        "login:ip:x",
        f"sms:phone:{OTHER}",
    ]
    assert count(db, AuthSession) == 1
    assert db.run_sync(queries.purge_user, mine, NOW) is False  # nothing left: another process's turn


def test_purge_user_leaves_an_account_a_login_brought_back(db):
    session_id = new_user(db)
    assert schedule(db, session_id, due=NOW)
    mine = user_id(db)
    assert db.run_sync(queries.due_deletions, NOW, 10) == [mine]
    db.run_sync(lambda s: s.execute(update(User).values(deletion_due_at=None)))  # a login got in first
    assert db.run_sync(queries.purge_user, mine, NOW) is False and user_id(db) == mine
    assert db.run_sync(queries.due_deletions, NOW, 10) == []


@pytest.mark.gen_test
async def test_housekeeping_purges_the_due_accounts_in_batches_and_then_their_blobs(db, app, monkeypatch):
    monkeypatch.setattr(housekeeping, "PURGE_BATCH", 2)
    for n in range(3):
        phone = f"+86188666600{n:02d}"
        session_id = new_user(db, phone=phone, token_hash=f"{n}" * 64, ticket_hash=f"{n}k".ljust(64, "k"))
        db.run_sync(queries.schedule_deletion, user_id(db, phone), session_id, None, [], NOW, NOW)
    new_user(db, phone=OTHER, token_hash="w" * 64, ticket_hash="x" * 64)
    assert (await housekeeping.run(db, app.services.images, NOW))["purged_users"] == 2
    assert (await housekeeping.run(db, app.services.images, NOW))["purged_users"] == 1
    assert db.run_sync(lambda s: s.scalars(select(User.phone)).all()) == [OTHER]


@pytest.mark.gen_test
async def test_a_purge_that_fails_leaves_the_others_and_the_sweeps_to_go_on(db, app, monkeypatch):
    for n in range(2):
        phone = f"+86188666600{n:02d}"
        session_id = new_user(db, phone=phone, token_hash=f"{n}" * 64, ticket_hash=f"{n}k".ljust(64, "k"))
        db.run_sync(queries.schedule_deletion, user_id(db, phone), session_id, None, [], NOW, NOW)
    first = db.run_sync(queries.due_deletions, NOW, 10)[0]
    real = queries.purge_user

    def failing(c, user_id: int, now):
        if user_id == first:
            raise Unavailable()  # e.g. a lock this account's purge waits on
        return real(c, user_id, now)

    monkeypatch.setattr(queries, "purge_user", sql_unit(long_work(failing)))
    counts = await housekeeping.run(db, app.services.images, NOW)
    assert counts["purged_users"] == 1 and "unused_blobs" in counts
    assert db.run_sync(queries.due_deletions, NOW, 10) == [first]  # tried again next round


# -- migration 0010 ---------------------------------------------------------------------------------------


def test_0010_adds_the_deletion_time_in_place_keeping_sessions_and_images(empty_database_url):
    """On SQLite a table copy of users would have emptied auth_sessions and images through their ON
    DELETE CASCADE."""
    engine = make_test_engine(empty_database_url)
    rows = [
        "INSERT INTO users (public_id, phone, password_hash, created_at, h5_visit_count)"
        " VALUES ('pub', '+8618866668888', 'x', :now, 0)",
        "INSERT INTO auth_sessions (user_id, token_hash, created_at, expires_at) VALUES (1, 't', :now, :now)",
        "INSERT INTO image_blobs (sha256, refs, created_at) VALUES ('s', 1, :now)",
        "INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, created_at)"
        " VALUES ('i', 1, 's', 'png', 1, 1, 1, :now)",
    ]
    counts = text("SELECT (SELECT COUNT(*) FROM auth_sessions), (SELECT COUNT(*) FROM images)")
    try:
        migrate.upgrade(engine, "0009")
        with engine.begin() as conn:
            for row in rows:
                conn.execute(text(row), {"now": NOW})
        migrate.upgrade(engine, "0010")
        with engine.connect() as conn:
            assert tuple(conn.execute(counts).one()) == (1, 1)
            assert conn.execute(text("SELECT deletion_due_at FROM users")).scalar() is None
        assert "ix_users_deletion_due_at" in {i["name"] for i in inspect(engine).get_indexes("users")}
        command.downgrade(migrate.alembic_config(engine), "0009")
        with engine.connect() as conn:
            assert tuple(conn.execute(counts).one()) == (1, 1)
        assert "deletion_due_at" not in {c["name"] for c in inspect(engine).get_columns("users")}
    finally:
        engine.dispose()
