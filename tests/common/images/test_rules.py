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

import pytest
from sqlalchemy import delete, text
from sqlalchemy.orm import Session

from demo.common import housekeeping
from demo.common.images import queries
from demo.common.images.rules import Images, StoreMismatch, bind_store
from demo.common.images.storage import LocalImageStore
from demo.common.infra import migrate
from demo.common.infra.db import Database, make_engine, sql_cursor
from demo.models import Deployment, Image, ImageBlob
from tests.common.images.support import (
    assert_error,
    blob_refs,
    count,
    fetch,
    files,
    jpeg,
    media,
    png,
    row_id,
    second_user,
    uploaded,
)

gen_test = pytest.mark.gen_test(timeout=60)


# -- start-up sweep --------------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@gen_test
async def test_startup_sweep(api, user, app, caplog):
    store = app.services.store
    kept = await uploaded(api, user.token, jpeg((40, 30)))
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

    swept = app.services.images.sweep()

    assert not stray.exists() and in_flight.exists()
    assert unclaimed_old.exists() and unclaimed_young.exists() and not orphan_thumb.exists()
    assert "2 files in the media store" in caplog.text
    assert not unused.exists() and blob_refs(app, unused_sha) is None
    assert kept_path.exists() and blob_refs(app, kept["sha256"]) == 1
    assert (await fetch(api, kept["url"])).code == 200
    assert swept == {"temp_files": 1, "unused_blobs": 1, "unclaimed_files": 2, "orphan_thumbnails": 1}


@gen_test
async def test_sweep_waits_for_an_upload_holding_the_blob_lock(api, user, app):
    """A blob no image uses yet, whose upload has not committed, is not swept from under it."""
    store, db = app.services.store, app.services.db
    data = jpeg((30, 20))
    first = await uploaded(api, user.token, data)
    sha = first["sha256"]
    db.run_sync(lambda s: s.execute(delete(Image)))  # gone without the API: the blob row stays, unused
    path = Path(store.local_path(sha))
    assert path.exists() and blob_refs(app, sha) == 0
    owner = row_id(app, user)
    # Simulate an upload of the same bytes between "file in place" and "commit": it holds the row lock.
    session = Session(db.engine)
    try:
        queries.claim_blob(sql_cursor(session), sha, app.services.clock.now())
        session.add(Image(id=secrets.token_urlsafe(16), owner_id=owner, sha256=sha, format="jpeg", width=30,
                          height=20, bytes=first["bytes"], created_at=app.services.clock.now()))
        session.flush()
        sweeper = asyncio.ensure_future(app.services.offloader.db(app.services.images.sweep))
        await asyncio.sleep(0.3)
        assert not sweeper.done()  # blocked on the lock
        session.commit()  # the upload commits: one image uses the blob
    finally:
        session.close()
    assert (await sweeper)["unused_blobs"] == 0
    assert path.exists() and blob_refs(app, sha) == 1


# -- the store belongs to one deployment; blobs go with their last image, by any path -------------


def other_database(tmp_path: Path, offloader) -> Database:
    engine = make_engine(f"sqlite:///{tmp_path / 'other.sqlite3'}")
    migrate.upgrade(engine)
    return Database(engine, offloader)


@gen_test
async def test_a_store_bound_to_another_database_refuses_and_its_files_stay(api, user, app, tmp_path):
    image = await uploaded(api, user.token, jpeg())
    app.services.images.bind()
    blob = Path(app.services.store.local_path(image["sha256"]))
    other = other_database(tmp_path, app.services.offloader)
    try:
        with pytest.raises(StoreMismatch, match="belongs to deployment"):
            Images(other, app.services.store).sweep()
    finally:
        other.dispose()
    assert blob.exists() and (await fetch(api, image["url"])).code == 200


def test_a_database_bound_to_another_store_refuses(app, tmp_path):
    app.services.images.bind()
    with pytest.raises(StoreMismatch, match="carries no deployment id"):
        elsewhere = LocalImageStore(str(tmp_path / "elsewhere"))
        bind_store(app.services.db.engine, elsewhere, app.services.clock.now())


def test_an_existing_store_and_database_without_identity_are_adopted_on_first_use(app):
    """The upgrade: a store with blobs but no identity file, a database without a deployment row."""
    store = app.services.store
    assert store.identity() is None and count(app, Deployment) == 0
    deployment_id = app.services.images.bind()
    assert store.identity() == deployment_id and app.services.images.bind() == deployment_id
    assert (media(app) / "DEPLOYMENT").read_text().strip() == deployment_id
    assert app.services.db.run_sync(lambda s: s.get(Deployment, 1)).store_bound_at is not None


@gen_test
async def test_the_sweeps_keep_a_file_they_cannot_prove_this_deployment_wrote(api, user, app):
    foreign = Path(app.services.store.local_path(hashlib.sha256(b"another deployment's").hexdigest()))
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(b"bytes this database has no row for")
    assert app.services.images.sweep()["unclaimed_files"] == 1
    counts = await housekeeping.run(app.services.db, app.services.images, app.services.clock.now())
    assert counts["unused_blobs"] == 0
    assert foreign.exists()


@gen_test
async def test_users_deleted_by_sql_leave_only_the_blobs_others_use_after_housekeeping(
        api, user, app, outbox):
    shared, own = jpeg((400, 300)), png((300, 200))
    mine = [await uploaded(api, user.token, data) for data in (shared, own)]
    other_token = await second_user(api, outbox)
    theirs = await uploaded(api, other_token, shared)
    assert (await fetch(api, mine[1]["thumbnails"]["160"])).code == 200
    internal = row_id(app, user)
    app.services.db.run_sync(lambda s: s.execute(text("DELETE FROM users WHERE id = :id"), {"id": internal}))
    assert count(app, Image) == 1  # the images went by cascade, without the API

    counts = await housekeeping.run(app.services.db, app.services.images, app.services.clock.now())

    assert counts["unused_blobs"] == 1
    assert blob_refs(app, mine[1]["sha256"]) is None and blob_refs(app, shared_sha := theirs["sha256"]) == 1
    assert files(media(app) / "blobs") == [Path(app.services.store.local_path(shared_sha))]
    assert files(media(app) / "thumbs") == []
    for url in (theirs["url"], theirs["thumbnails"]["160"]):
        assert (await fetch(api, url)).code == 200
    assert_error(await fetch(api, mine[1]["url"]), 404, "not_found")
