"""Objects in the store without their row (Images.collect_orphans, run by housekeeping): a put whose
answer was lost and that landed after its upload was cleaned up, a thumbnail whose builder lost the
database. Removed once older than orphan_grace, under the blob row lock (an upload of the same bytes
racing the sweep keeps its object); a thumbnail of a blob that has its row is adopted; nothing written
before the store took this deployment's id, and nothing of another deployment's store, is touched.
Every test runs on both stores (a folder, SeaweedFS) and both databases.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
from typing import Any

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session

from demo.common import housekeeping
from demo.common.images import queries
from demo.common.images.local_store import LocalImageStore
from demo.common.images.rules import Images, StoreMismatch
from demo.common.images.storage import object_name, parse_object_name
from demo.models import Image, ImageBlob, ImageVariant
from tests.helpers import sql_cursor

from .support import blob_refs, encode, jpeg, noise, put_object, stored
from .test_rules import deliverable, new_user, other_database, read_file, variant_rows

gen_test = pytest.mark.gen_test(timeout=60)
pytestmark = pytest.mark.usefixtures("storage")


@pytest.fixture
def images(app) -> Images:
    images = app.services.images
    images.bind()  # what a server does before it serves: the objects below come after it
    return images


@pytest.fixture
def owner(app) -> int:
    return new_user(app, "+8618866668888")


def old_enough(images: Images, clock) -> None:
    """Move the clock past the grace of every object written so far."""
    clock.advance(images.rules.orphan_grace + 5)


def sha_of(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def forget_rows(app, sha256: str) -> None:
    """The blob's rows go, its objects stay: what a lost PUT answer or a lost builder leaves."""

    def forget(s: Session) -> None:
        s.execute(delete(ImageVariant).where(ImageVariant.sha256 == sha256))
        s.execute(delete(Image).where(Image.sha256 == sha256))
        s.execute(delete(ImageBlob).where(ImageBlob.sha256 == sha256))

    app.services.db.run_sync(forget)


def all_objects(app) -> list[str]:
    return stored(app, "blobs") + stored(app, "thumbs")


# -- what goes and what stays -------------------------------------------------------------------------


@gen_test
async def test_objects_without_their_row_go_once_older_than_the_grace_and_no_sooner(app, images, owner, clock):
    kept = await images.create(owner, jpeg((400, 300)))
    await images.file_for(await images.find(kept["id"]), 160)  # a thumbnail with its row: stays
    lost_put = sha_of("a put whose answer was lost")
    put_object(app, lost_put, b"landed after its upload was cleaned up")
    gone_blob = sha_of("a blob deleted while its thumbnail was made")
    put_object(app, gone_blob, b"a thumbnail whose builder lost the database", width=320)
    before = all_objects(app)

    assert images.collect_orphans() == {"orphan_objects": 0, "adopted_thumbnails": 0}  # fresh: may be landing
    clock.advance(images.rules.orphan_grace - 60)
    assert images.collect_orphans() == {"orphan_objects": 0, "adopted_thumbnails": 0}
    assert all_objects(app) == before
    clock.advance(120)
    counts = await housekeeping.run(app.services.db, images, clock.now())

    assert counts["orphan_objects"] == 2 and counts["unused_blobs"] == 0
    assert all_objects(app) == [object_name(kept["sha256"]), object_name(kept["sha256"], 160)]
    assert blob_refs(app, lost_put) is None and blob_refs(app, gone_blob) is None  # the claims went too
    assert await deliverable(images, kept) and await deliverable(images, kept, 160)
    assert images.collect_orphans() == {"orphan_objects": 0, "adopted_thumbnails": 0}


@gen_test
async def test_a_blob_and_thumbnails_whose_rows_went_go_together(app, images, owner, clock):
    record = await images.create(owner, jpeg((400, 300)))
    found = await images.find(record["id"])
    for width in (160, 320):
        await images.file_for(found, width)
    forget_rows(app, record["sha256"])
    put_object(app, record["sha256"], b"a width another release made", width=200)
    old_enough(images, clock)

    assert images.collect_orphans()["orphan_objects"] == 4
    assert all_objects(app) == [] and blob_refs(app, record["sha256"]) is None


@gen_test
async def test_a_thumbnail_of_a_blob_with_its_row_is_adopted_not_removed(app, images, owner, clock):
    """Its builder lost the database between its put and its row: the object is good (a request would
    adopt it too); the sweep gives it its ready row so the store and the database agree."""
    record = await images.create(owner, jpeg((400, 300)))
    sha = record["sha256"]
    found = await images.find(record["id"])
    thumb = await images.file_for(found, 160)
    app.services.db.run_sync(queries.forget_variant, sha, 160)
    built = await images.file_for(found, 320)

    def claimed_again(s: Session) -> None:  # its row is a builder's claim now: that builder holds it
        s.execute(delete(ImageVariant).where(ImageVariant.width == 320))
        s.add(ImageVariant(sha256=sha, width=320, state="building", claimed_at=clock.now()))

    app.services.db.run_sync(claimed_again)
    old_enough(images, clock)

    assert images.collect_orphans() == {"orphan_objects": 0, "adopted_thumbnails": 1}
    assert variant_rows(app) == [(sha, 160, "ready", thumb.size), (sha, 320, "building", None)]
    assert stored(app, "thumbs") == [object_name(sha, 160), object_name(sha, 320)]
    images._variants.pop_where(lambda key: True)
    again = await images.file_for(await images.find(record["id"]), 160)
    assert again == thumb and len(await read_file(images, again)) == thumb.size
    assert app.services.store.size(sha, 320) == built.size


@pytest.mark.settings(orphan_sweep_batch=2)
@gen_test
async def test_each_round_lists_a_bounded_step_and_the_next_goes_on_from_there(app, images, owner, clock, monkeypatch):
    kept = await images.create(owner, jpeg((40, 30)))
    orphans = [sha_of(f"orphan {n}") for n in range(5)]
    for sha in orphans:
        put_object(app, sha, b"an orphan")
    old_enough(images, clock)
    store, steps = app.services.store, []
    real_listing = store.listing

    def listing(after: str | None, limit: int) -> list[Any]:
        listed = real_listing(after, limit)
        steps.append((after, [item.name for item in listed]))
        return listed

    monkeypatch.setattr(store, "listing", listing)
    removed = [images.collect_orphans()["orphan_objects"] for _ in range(4)]

    assert sum(removed) == 5 and stored(app, "blobs") == [object_name(kept["sha256"])]
    assert [len(names) for _, names in steps[:3]] == [2, 2, 2] and len(steps[3][1]) < 2
    assert steps[0][0] is None and [after for after, _ in steps[1:4]] == [names[-1] for _, names in steps[:3]]
    images.collect_orphans()  # the last step reached the end of the store: the next one starts over
    assert steps[4][0] is None


# -- another deployment's bytes ------------------------------------------------------------------------


@gen_test
async def test_objects_written_before_the_store_took_this_deployments_id_stay(app, build_app, settings, clock):
    """A store adopted on an upgrade (or a folder copied in) may hold bytes of another deployment: the
    sweep cannot prove this one wrote them, however old."""
    foreign = sha_of("written before the store was bound")
    put_object(app, foreign, b"bytes of another deployment")
    put_object(app, foreign, b"and a thumbnail", width=160)
    await asyncio.sleep(1.1)  # an S3 store's times may count whole seconds
    images = app.services.images
    images.bind()
    await asyncio.sleep(1.1)
    ours = sha_of("written after")
    put_object(app, ours, b"an orphan of this deployment")
    old_enough(images, clock)

    assert images.collect_orphans()["orphan_objects"] == 1
    assert all_objects(app) == [object_name(foreign), object_name(foreign, 160)]


@gen_test
async def test_a_store_bound_to_another_database_is_never_swept(app, images, clock, tmp_path):
    orphan = sha_of("an orphan of the store's own deployment")
    put_object(app, orphan, b"not this database's to judge")
    old_enough(images, clock)
    other = other_database(tmp_path, app.services.offloader)
    try:
        with pytest.raises(StoreMismatch):
            Images(other, app.services.store, images.rules, clock).collect_orphans()
    finally:
        other.dispose()
    assert all_objects(app) == [object_name(orphan)]


# -- uploads of the same bytes racing the sweep ---------------------------------------------------------


@gen_test
async def test_an_upload_claiming_the_blob_after_the_sweep_checked_its_row_keeps_its_object(
    app, images, owner, build_app, settings, clock, monkeypatch
):
    """Host B's sweep finds no row for an orphan blob; host A's upload of the same bytes claims the
    row; B claims it too, takes the lock first and removes the object and the row; A's store makes the
    row again and puts the file back under its lock."""
    data = jpeg((60, 40))
    first = await images.create(owner, data)
    forget_rows(app, first["sha256"])
    old_enough(images, clock)
    other = build_app(settings).services
    checked, claimed = threading.Event(), threading.Event()
    real_run, real_store = other.db.run_sync, images._store

    def run_then_wait(unit: Any, *args: Any) -> Any:
        result = real_run(unit, *args)
        if unit is queries.blob_rows:  # B's sweep has checked the rows (and let its transaction go)
            checked.set()
            claimed.wait(10)  # A claims the row now
        return result

    monkeypatch.setattr(other.db, "run_sync", run_then_wait)
    sweep = asyncio.ensure_future(other.offloader.db(other.images.collect_orphans))
    while not checked.is_set():
        await asyncio.sleep(0.01)
    swept: list[int] = []

    async def store_after_the_sweep(*args: Any) -> dict[str, Any]:
        claimed.set()
        swept.append((await sweep)["orphan_objects"])
        return await real_store(*args)

    images._store = store_after_the_sweep  # type: ignore[method-assign]
    record = await images.create(owner, data)
    assert swept == [1]  # the object went from under the upload: the race happened
    assert blob_refs(app, record["sha256"]) == 1 and app.services.store.exists(record["sha256"])
    assert await deliverable(images, record) and await deliverable(images, record, 160)


@gen_test
async def test_the_sweep_waits_for_an_upload_holding_the_blob_lock_and_then_keeps_its_object(app, images, owner, clock):
    store, db = app.services.store, app.services.db
    first = await images.create(owner, jpeg((30, 20)))
    sha = first["sha256"]
    forget_rows(app, sha)
    old_enough(images, clock)
    # An upload of the same bytes between "file in place" and "commit": it holds the blob row lock.
    session = Session(db.engine)
    try:
        queries.claim_blob(sql_cursor(session), sha, clock.now())
        values = {k: first[k] for k in ("sha256", "format", "width", "height", "bytes")}
        session.add(Image(id=secrets.token_urlsafe(16), owner_id=owner, created_at=clock.now(), **values))
        session.flush()
        sweeper = asyncio.ensure_future(app.services.offloader.db(images.collect_orphans))
        await asyncio.sleep(0.3)
        assert not sweeper.done()  # blocked on the lock
        session.commit()
    finally:
        session.close()
    assert (await sweeper)["orphan_objects"] == 0
    assert store.exists(sha) and blob_refs(app, sha) == 1


@gen_test
async def test_uploads_of_orphaned_bytes_in_parallel_with_sweeps_never_lose_their_object(
    app, images, owner, build_app, settings, clock
):
    """Uploads of the same bytes on two hosts while both sweep, over and over: whoever wins, every
    image that was created is delivered, and no row points at a missing object."""
    other = build_app(settings).services
    data = encode(noise((120, 90)), "JPEG", quality=90)
    for round_ in range(6):
        made = await images.create(owner, data)
        forget_rows(app, made["sha256"])
        old_enough(images, clock)
        uploads = [images.create(owner, data)] + ([other.images.create(owner, data)] if round_ % 2 else [])
        sweeps = [app.services.offloader.db(images.collect_orphans), other.offloader.db(other.images.collect_orphans)]
        results = await asyncio.gather(*uploads, *sweeps)
        for record in results[: len(uploads)]:
            assert await deliverable(images, record), round_
            assert app.services.store.exists(record["sha256"])
        images._found.pop_where(lambda key: True)


# -- the listing the sweep walks ------------------------------------------------------------------------


def test_object_names_are_parsed_as_object_name_spells_them_and_nothing_else():
    sha = sha_of("x")
    assert parse_object_name(object_name(sha)) == (sha, None)
    assert parse_object_name(object_name(sha, 160)) == (sha, 160)
    for name in (
        "DEPLOYMENT",
        f"blobs/{sha}",
        f"blobs/00/00/{sha}",
        f"thumbs/{sha[:2]}/{sha[2:4]}/{sha}",
        f"thumbs/{sha[:2]}/{sha[2:4]}/{sha}-w016",
        f"thumbs/{sha[:2]}/{sha[2:4]}/{sha}-w１６",
        f"blobs/{sha[:2]}/{sha[2:4]}/{sha.upper()}",
        f"tmp/{sha}",
    ):
        assert parse_object_name(name) is None, name


def test_a_listing_resumes_after_any_object_name_in_name_order(app, images):
    """The sweep's cursor is the last name it listed, which may be gone by the next step."""
    store = app.services.store
    names = []
    for n in range(6):
        sha = sha_of(f"listed {n}")
        put_object(app, sha, b"x")
        put_object(app, sha, b"y", width=160)
        names += [object_name(sha), object_name(sha, 160)]
    names.sort()
    assert [item.name for item in store.listing(None, 100) if parse_object_name(item.name)] == names
    gone = names.pop(5)
    parsed = parse_object_name(gone)
    assert parsed is not None
    sha, width = parsed
    if width is None:
        store.delete(sha, [])  # the blob alone
    else:
        store.delete_variant(sha, width)
    for after in (names[0], names[4], gone, names[9], names[-1]):
        expected = [name for name in names if name > after][:3]
        assert [item.name for item in store.listing(after, 3)] == expected
    if isinstance(store, LocalImageStore):
        assert [item.name for item in store.listing(None, 100)] == names  # only the objects of a folder
