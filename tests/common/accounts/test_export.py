"""The export (demo/common/accounts/export.py) and the operator's units of demo/common/accounts/queries.py,
on SQLite and MariaDB without HTTP: what an export reads and counts, the zip in bounded pieces, and a
disabled account (migration 0011) at the login."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import zipfile

import pytest
from sqlalchemy import select

from demo.common.accounts import queries
from demo.common.accounts.export import Export, Exports, export_limit, zip_pieces
from demo.common.accounts.principal import Principal
from demo.common.errors import RateLimited, Unauthorized
from demo.common.infra import ratelimit
from demo.models import AuthSession, Image, ImageBlob, User
from tests.common.accounts.test_queries import NOW, PHONE, WINDOWS, grant, new_user
from tests.common.images.support import put_object


@pytest.fixture
def db(app):
    return app.services.db


def owner(db, phone: str = PHONE) -> int:
    return db.run_sync(lambda s: s.scalar(select(User.id).where(User.phone == phone)))


def add_image(app, user_id: int, data: bytes, n: int, fmt: str = "png") -> str:
    """An image of ``user_id`` with ``data`` as its original in the app's store; its id."""
    sha256 = hashlib.sha256(data).hexdigest()
    put_object(app, sha256, data)
    image_id = f"img-{n:04d}-0000000000000"

    def add(s) -> None:
        if s.get(ImageBlob, sha256) is None:
            s.add(ImageBlob(sha256=sha256, refs=1, created_at=NOW, bytes=len(data)))
            s.flush()
        s.add(
            Image(
                id=image_id,
                owner_id=user_id,
                sha256=sha256,
                format=fmt,
                width=10,
                height=10,
                bytes=len(data),
                created_at=NOW,
            )
        )

    app.services.db.run_sync(add)
    return image_id


def test_export_data_reads_the_user_their_live_sessions_and_their_images_only(app, db):
    session_id = new_user(db)
    new_user(db, phone="+8618866669999", token_hash="w" * 64, ticket_hash="x" * 64)
    mine = add_image(app, owner(db), b"mine", 1)
    add_image(app, owner(db, "+8618866669999"), b"theirs", 2)

    data = db.run_sync(queries.export_data, owner(db), None, NOW)

    assert data.user.phone == PHONE and data.user.public_id == "pub8866668888"
    assert [row.id for row in data.sessions] == [session_id]
    assert [row.id for row in data.images] == [mine]
    assert db.run_sync(queries.export_data, 10**9, None, NOW) is None


def test_export_data_counts_in_the_limit_first_and_refuses_past_it_without_a_trace(db):
    new_user(db)
    user_id = owner(db)
    limit = export_limit(user_id)
    for _ in range(limit.limit):
        assert db.run_sync(queries.export_data, user_id, limit, NOW) is not None
    with pytest.raises(RateLimited):
        db.run_sync(queries.export_data, user_id, limit, NOW)
    later = NOW + dt.timedelta(seconds=limit.seconds)
    assert db.run_sync(queries.export_data, user_id, limit, later) is not None  # the next window


def test_pieces_stay_near_the_chunk_and_the_zip_holds_the_originals_then_the_profile(app, db):
    session_id = new_user(db)
    user_id = owner(db)
    big = bytes(range(256)) * 4096  # 1 MiB
    ids = [add_image(app, user_id, big, 1), add_image(app, user_id, b"small", 2, "jpeg")]
    data = db.run_sync(queries.export_data, user_id, None, NOW)
    chunk = 64 * 1024

    pieces = list(zip_pieces(Export(data, NOW, session_id), app.services.store, chunk))

    assert max(map(len, pieces)) <= 2 * chunk + 4096  # a piece, plus the zip's headers around it
    with zipfile.ZipFile(io.BytesIO(b"".join(pieces))) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == [f"images/{ids[0]}.png", f"images/{ids[1]}.jpg", "profile.json"]
        assert archive.read(f"images/{ids[0]}.png") == big
        profile = json.loads(archive.read("profile.json"))
    assert profile["exported_at"] == "2026-11-22T10:00:00Z"
    assert [s["current"] for s in profile["sessions"]] == [True]
    assert [i["file"] for i in profile["images"]] == [f"images/{ids[0]}.png", f"images/{ids[1]}.jpg"]


def test_an_image_whose_original_is_lost_has_no_file(app, db):
    new_user(db)
    lost = add_image(app, owner(db), b"gone", 1)
    sha256 = hashlib.sha256(b"gone").hexdigest()
    app.services.store.delete(sha256, [])
    data = db.run_sync(queries.export_data, owner(db), None, NOW)

    with zipfile.ZipFile(io.BytesIO(b"".join(zip_pieces(Export(data, NOW), app.services.store)))) as archive:
        assert archive.namelist() == ["profile.json"]
        profile = json.loads(archive.read("profile.json"))
    assert profile["images"][0]["id"] == lost and profile["images"][0]["file"] is None
    assert profile["sessions"][0]["current"] is False  # the operator's export: no session asks


@pytest.mark.gen_test
async def test_prepare_answers_unauthorized_for_an_account_gone(app, db):
    exports = Exports(db, app.services.store, app.services.clock)
    with pytest.raises(Unauthorized):
        await exports.prepare(Principal(user_id=10**9, session_id=1, phone=PHONE))


def test_a_disabled_account_ends_its_sessions_and_its_logins_record_nothing(db):
    new_user(db)
    user_id = owner(db)
    found = db.run_sync(queries.reserve_login, PHONE, ratelimit.window_params(WINDOWS, NOW), lambda found: None, NOW)
    assert not found.disabled

    assert db.run_sync(queries.set_disabled, user_id, True, NOW) == (True, 1)
    assert db.run_sync(queries.set_disabled, user_id, True, NOW) == (False, 0)  # once
    revoked = db.run_sync(lambda s: s.scalars(select(AuthSession.revoked_at)).all())
    assert revoked == [NOW]
    again = db.run_sync(queries.reserve_login, PHONE, ratelimit.window_params(WINDOWS, NOW), lambda found: None, NOW)
    assert again.id == user_id and again.disabled
    # A login looked up before the account was disabled cannot record a session after it.
    params = ratelimit.window_params(WINDOWS[:4], NOW)
    assert db.run_sync(queries.record_login, found, None, params, None, None, grant("q" * 64, "r" * 64), NOW) is None

    assert db.run_sync(queries.set_disabled, user_id, False, NOW) == (True, 0)
    assert db.run_sync(queries.record_login, found, None, params, None, None, grant("q" * 64, "r" * 64), NOW)


def test_an_operators_deletion_keeps_an_earlier_one_and_ends_every_session(db):
    new_user(db)
    user_id = owner(db)
    later, sooner = NOW + dt.timedelta(days=7), NOW + dt.timedelta(days=1)
    assert db.run_sync(queries.schedule_deletion_by_operator, user_id, sooner, NOW) == (sooner, 1)
    assert db.run_sync(queries.schedule_deletion_by_operator, user_id, later, NOW) == (sooner, 0)
    assert db.run_sync(queries.schedule_deletion_by_operator, user_id, NOW, NOW) == (NOW, 0)  # --now
    assert db.run_sync(queries.purge_user, user_id, NOW) is True
    assert db.run_sync(queries.schedule_deletion_by_operator, user_id, NOW, NOW) == (None, 0)
