"""Images (images/rules.py) called directly, no HTTP: create, list, find, delete and the blob's
use by images; the start-up and housekeeping sweeps; the store's one deployment.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, text
from sqlalchemy.orm import Session

from demo.common import housekeeping
from demo.common.errors import InvalidField, InvalidImage, NotFound, QuotaExceeded
from demo.common.images import imaging, queries
from demo.common.images.rules import Images, StoreMismatch, bind_store, decode_cursor, encode_cursor
from demo.common.images.storage import LocalImageStore
from demo.common.infra import migrate
from demo.common.infra.db import Database
from demo.models import Deployment, Image, ImageBlob, User
from tests.helpers import make_test_engine, sql_cursor

from .support import blob_refs, count, encode, files, jpeg, media, noise, png

gen_test = pytest.mark.gen_test(timeout=60)


@pytest.fixture
def images(app) -> Images:
    return app.services.images


def new_user(app, phone: str) -> int:
    """A user row (all the rules need of a user is its id)."""

    def add(s) -> int:
        user = User(phone=phone, password_hash="-", created_at=app.services.clock.now())
        s.add(user)
        s.flush()
        return user.id

    return app.services.db.run_sync(add)


@pytest.fixture
def owner(app) -> int:
    return new_user(app, "+8618866668888")


async def deliverable(images: Images, record: dict[str, Any], width: int | None = None) -> bool:
    """Whether delivery finds the image (or its ``width`` thumbnail) and its bytes."""
    try:
        found = await images.find(record["id"])
        await images.contents(await images.file_for(found, width))
    except NotFound:
        return False
    return True


# -- create ------------------------------------------------------------------------------------------


@gen_test
async def test_create_stores_the_re_encoded_file_and_answers_its_record(app, images, owner):
    data = jpeg((80, 60)) + b"<script>trailing bytes</script>"
    record = await images.create(owner, data)
    assert set(record) == {"id", "width", "height", "format", "bytes", "sha256", "created_at"}
    assert (record["format"], record["width"], record["height"]) == ("jpeg", 80, 60)
    stored = Path(app.services.store.local_path(record["sha256"])).read_bytes()
    assert len(stored) == record["bytes"] and hashlib.sha256(stored).hexdigest() == record["sha256"]
    assert b"<script" not in stored
    assert record["created_at"].endswith("Z") or "+" in record["created_at"]
    assert blob_refs(app, record["sha256"]) == 1 and count(app, Image) == 1


@gen_test
async def test_create_takes_a_finished_file_and_leaves_it_to_its_caller(app, images, owner, tmp_path):
    upload = tmp_path / "upload.png"
    upload.write_bytes(png((30, 20)))
    record = await images.create(owner, str(upload))
    assert record["format"] == "png" and upload.exists()  # the receiver owns and removes it
    assert files(media(app) / "tmp") == []  # nothing of the processing is left behind


@gen_test
async def test_create_refuses_what_is_not_an_image_and_stores_nothing(app, images, owner):
    with pytest.raises(InvalidImage):
        await images.create(owner, b"\xff\xd8\xff" + bytes(100))
    assert count(app, Image) == 0 and count(app, ImageBlob) == 0
    assert files(media(app) / "blobs") == [] and files(media(app) / "tmp") == []


@gen_test
async def test_the_same_bytes_twice_are_one_blob_used_by_two_images(app, images, owner):
    data = png((40, 30))
    first, second = await images.create(owner, data), await images.create(owner, data)
    assert first["id"] != second["id"] and first["sha256"] == second["sha256"]
    assert blob_refs(app, first["sha256"]) == 2 and count(app, ImageBlob) == 1
    assert files(media(app) / "blobs") == [Path(app.services.store.local_path(first["sha256"]))]


@pytest.mark.settings(image_quota_count=2)
@gen_test
async def test_the_count_quota_is_checked_before_the_body_and_again_when_storing(app, images, owner):
    await images.check_room(owner)
    for _ in range(2):
        await images.create(owner, jpeg())
    with pytest.raises(QuotaExceeded):
        await images.check_room(owner)
    with pytest.raises(QuotaExceeded):
        await images.create(owner, png())
    assert count(app, Image) == 2
    await images.check_room(new_user(app, "+8618866669999"))  # per user


@pytest.mark.settings(image_quota_bytes=3000)
@gen_test
async def test_the_byte_quota_counts_stored_bytes(app, images, owner):
    first = await images.create(owner, png((40, 30)))
    assert first["bytes"] < 3000
    with pytest.raises(QuotaExceeded):
        await images.create(owner, encode(noise((40, 40)), "PNG"))  # noise: ~4.8 KB however encoded
    assert count(app, Image) == 1


# -- list and find -----------------------------------------------------------------------------------


@gen_test
async def test_list_pages_own_images_newest_first(images, owner, app):
    made = [await images.create(owner, jpeg((20 + i, 20))) for i in range(5)]
    await images.create(new_user(app, "+8618866669999"), jpeg((99, 20)))  # someone else's
    page, cursor = await images.list(owner, 2, None)
    assert [r["id"] for r in page] == [made[4]["id"], made[3]["id"]] and cursor is not None
    page, cursor = await images.list(owner, 2, cursor)
    assert [r["id"] for r in page] == [made[2]["id"], made[1]["id"]]
    page, cursor = await images.list(owner, 2, cursor)
    assert [r["id"] for r in page] == [made[0]["id"]] and cursor is None
    assert page[0] == made[0]


@gen_test
async def test_cursors_are_only_those_the_server_gave_out(images, owner):
    assert decode_cursor(encode_cursor(42)) == 42
    for cursor in ("djE6NDI=", "djE6MDQy", "x", "djI6NDI", "djE6LTE"):
        with pytest.raises(InvalidField):
            await images.list(owner, 20, cursor)


@gen_test
async def test_find_knows_ids_and_refuses_lookalikes_without_a_query(images, owner):
    record = await images.create(owner, jpeg((50, 40)))
    found = await images.find(record["id"])
    assert (found.sha256, found.format, found.width) == (record["sha256"], "jpeg", 50)
    for image_id in ("nope", "a" * 22, "../" + record["id"], record["id"] + "/"):
        with pytest.raises(NotFound):
            await images.find(image_id)


@gen_test
async def test_file_for_makes_a_thumbnail_once_and_never_upscales(app, images, owner):
    record = await images.create(owner, jpeg((400, 300)))
    found = await images.find(record["id"])
    blob = app.services.store.local_path(record["sha256"])
    assert await images.file_for(found, None) == blob and await images.file_for(found, 640) == blob
    thumb = await images.file_for(found, 160)
    assert thumb == app.services.store.local_path(record["sha256"], 160)
    assert imaging.EXTENSIONS["jpeg"] == "jpg" and os.path.exists(thumb)
    with pytest.raises(InvalidField):
        await images.file_for(found, 100)


# -- delete and the blob's use --------------------------------------------------------------------------


@gen_test
async def test_delete_removes_the_image_and_the_blob_with_its_last_image(app, images, owner):
    data = jpeg((400, 300))
    first, second = await images.create(owner, data), await images.create(owner, data)
    sha = first["sha256"]
    await images.file_for(await images.find(first["id"]), 160)  # a thumbnail too
    await images.delete(owner, first["id"])
    assert blob_refs(app, sha) == 1 and not await deliverable(images, first) and await deliverable(images, second)
    await images.delete(owner, second["id"])
    assert blob_refs(app, sha) is None and count(app, Image) == 0
    assert files(media(app) / "blobs") == [] and files(media(app) / "thumbs") == []


@gen_test
async def test_delete_of_another_users_or_an_unknown_image_is_not_found(app, images, owner):
    record = await images.create(owner, jpeg())
    other = new_user(app, "+8618866669999")
    for user_id, image_id in ((other, record["id"]), (owner, "x" * 22), (owner, "../../etc")):
        with pytest.raises(NotFound):
            await images.delete(user_id, image_id)
    assert await deliverable(images, record) and blob_refs(app, record["sha256"]) == 1


@gen_test
async def test_a_blob_shared_by_two_users_stays_until_both_delete(app, images, owner):
    other = new_user(app, "+8618866669999")
    data = png((30, 30))
    mine, theirs = await images.create(owner, data), await images.create(other, data)
    await images.delete(owner, mine["id"])
    assert blob_refs(app, theirs["sha256"]) == 1 and await deliverable(images, theirs)
    await images.delete(other, theirs["id"])
    assert blob_refs(app, theirs["sha256"]) is None and files(media(app) / "blobs") == []


# -- start-up sweep --------------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@gen_test
async def test_startup_sweep(app, images, owner, caplog):
    store = app.services.store
    kept = await images.create(owner, jpeg((40, 30)))
    kept_path = Path(store.local_path(kept["sha256"]))
    two_hours_ago = app.services.clock.timestamp() - 7200
    os.utime(kept_path, (two_hours_ago, two_hours_ago))  # old, but referenced: stays

    tmp = media(app) / "tmp"
    stray = tmp / f"up-{dead_pid()}-abcdef"
    stray.write_bytes(b"half an upload")
    in_flight = tmp / f"up-{os.getpid()}-inflight"  # a live writer's fresh file: stays
    in_flight.write_bytes(b"still arriving")

    def blob_file(seed: int) -> Path:
        sha = hashlib.sha256(str(seed).encode()).hexdigest()
        path = Path(store.local_path(sha))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"bytes nobody points at")
        return path

    # Files without a blob row: this deployment cannot prove it wrote them, so they stay, old or young.
    unclaimed_old = blob_file(1)
    os.utime(unclaimed_old, (two_hours_ago, two_hours_ago))
    unclaimed_young = blob_file(2)
    orphan_thumb = Path(store.local_path(hashlib.sha256(b"4").hexdigest(), 320))  # its blob is long gone
    orphan_thumb.parent.mkdir(parents=True, exist_ok=True)
    orphan_thumb.write_bytes(b"a thumbnail finished after its image was deleted")

    unused_sha = hashlib.sha256(b"3").hexdigest()  # a row no image uses (a crash before the upload's commit)
    unused = blob_file(3)
    now = app.services.clock.now()
    app.services.db.run_sync(lambda s: s.add(ImageBlob(sha256=unused_sha, created_at=now)))

    swept = images.sweep()

    assert not stray.exists() and in_flight.exists()
    assert unclaimed_old.exists() and unclaimed_young.exists() and not orphan_thumb.exists()
    assert "2 files in the media store" in caplog.text
    assert not unused.exists() and blob_refs(app, unused_sha) is None
    assert kept_path.exists() and blob_refs(app, kept["sha256"]) == 1
    assert await deliverable(images, kept)
    assert swept == {"temp_files": 1, "unused_blobs": 1, "unclaimed_files": 2, "orphan_thumbnails": 1}


@gen_test
async def test_sweep_waits_for_an_upload_holding_the_blob_lock(app, images, owner):
    """A blob no image uses yet, whose upload has not committed, is not swept from under it."""
    store, db = app.services.store, app.services.db
    data = jpeg((30, 20))
    first = await images.create(owner, data)
    sha = first["sha256"]
    db.run_sync(lambda s: s.execute(delete(Image)))  # gone without the API: the blob row stays, unused
    path = Path(store.local_path(sha))
    assert path.exists() and blob_refs(app, sha) == 0
    # Simulate an upload of the same bytes between "file in place" and "commit": it holds the row lock.
    session = Session(db.engine)
    try:
        queries.claim_blob(sql_cursor(session), sha, app.services.clock.now())
        session.add(
            Image(
                id=secrets.token_urlsafe(16),
                owner_id=owner,
                sha256=sha,
                format="jpeg",
                width=30,
                height=20,
                bytes=first["bytes"],
                created_at=app.services.clock.now(),
            )
        )
        session.flush()
        sweeper = asyncio.ensure_future(app.services.offloader.db(images.sweep))
        await asyncio.sleep(0.3)
        assert not sweeper.done()  # blocked on the lock
        session.commit()  # the upload commits: one image uses the blob
    finally:
        session.close()
    assert (await sweeper)["unused_blobs"] == 0
    assert path.exists() and blob_refs(app, sha) == 1


# -- the store belongs to one deployment; blobs go with their last image, by any path -------------


def other_database(tmp_path: Path, offloader) -> Database:
    engine = make_test_engine(f"sqlite:///{tmp_path / 'other.sqlite3'}")
    migrate.upgrade(engine)
    return Database(engine, offloader)


@gen_test
async def test_a_store_bound_to_another_database_refuses_and_its_files_stay(app, images, owner, tmp_path):
    image = await images.create(owner, jpeg())
    images.bind()
    blob = Path(app.services.store.local_path(image["sha256"]))
    other = other_database(tmp_path, app.services.offloader)
    try:
        with pytest.raises(StoreMismatch, match="belongs to deployment"):
            Images(other, app.services.store, app.services.images.rules).sweep()
    finally:
        other.dispose()
    assert blob.exists() and await deliverable(images, image)


def test_a_database_bound_to_another_store_refuses(app, images, tmp_path):
    images.bind()
    with pytest.raises(StoreMismatch, match="carries no deployment id"):
        elsewhere = LocalImageStore(str(tmp_path / "elsewhere"))
        bind_store(app.services.db, elsewhere, app.services.clock.now())


def test_an_existing_store_and_database_without_identity_are_adopted_on_first_use(app, images):
    """The upgrade: a store with blobs but no identity file, a database without a deployment row."""
    store = app.services.store
    assert store.identity() is None and count(app, Deployment) == 0
    deployment_id = images.bind()
    assert store.identity() == deployment_id and images.bind() == deployment_id
    assert (media(app) / "DEPLOYMENT").read_text().strip() == deployment_id
    assert app.services.db.run_sync(lambda s: s.get(Deployment, 1)).store_bound_at is not None


@gen_test
async def test_the_sweeps_keep_a_file_they_cannot_prove_this_deployment_wrote(app, images):
    foreign = Path(app.services.store.local_path(hashlib.sha256(b"another deployment's").hexdigest()))
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(b"bytes this database has no row for")
    assert images.sweep()["unclaimed_files"] == 1
    counts = await housekeeping.run(app.services.db, images, app.services.clock.now())
    assert counts["unused_blobs"] == 0
    assert foreign.exists()


@gen_test
async def test_users_deleted_by_sql_leave_only_the_blobs_others_use_after_housekeeping(app, images, owner):
    shared, own = jpeg((400, 300)), png((300, 200))
    mine = [await images.create(owner, data) for data in (shared, own)]
    theirs = await images.create(new_user(app, "+8618866669999"), shared)
    assert await deliverable(images, mine[1], 160)
    app.services.db.run_sync(lambda s: s.execute(text("DELETE FROM users WHERE id = :id"), {"id": owner}))
    assert count(app, Image) == 1  # the images went by cascade, without the rules

    counts = await housekeeping.run(app.services.db, images, app.services.clock.now())

    assert counts["unused_blobs"] == 1
    assert blob_refs(app, mine[1]["sha256"]) is None and blob_refs(app, shared_sha := theirs["sha256"]) == 1
    assert files(media(app) / "blobs") == [Path(app.services.store.local_path(shared_sha))]
    assert files(media(app) / "thumbs") == []
    assert await deliverable(images, theirs) and await deliverable(images, theirs, 160)
    assert not await deliverable(images, mine[1])
