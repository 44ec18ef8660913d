"""Images (images/rules.py) called directly, no HTTP: create, list, find, delete and the blob's
use by images; thumbnails made once across hosts; the start-up and housekeeping sweeps; the store's
one deployment. Every test runs on both stores (a folder, SeaweedFS) and both databases.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, text
from sqlalchemy.orm import Session

from demo.common import housekeeping
from demo.common.errors import InvalidField, InvalidImage, NotFound, QuotaExceeded, Unavailable
from demo.common.images import imaging, queries, rules
from demo.common.images.local_store import LocalImageStore
from demo.common.images.rules import ImageFile, Images, StoreMismatch, bind_store, decode_cursor, encode_cursor
from demo.common.images.storage import StoreUnavailable, object_name
from demo.common.infra import migrate
from demo.common.infra.db import Database
from demo.models import Deployment, Image, ImageBlob, ImageVariant, User
from tests.helpers import SeaweedFS, make_test_engine, sql_cursor

from .support import blob_refs, count, encode, jpeg, media, noise, open_image, png, put_object, stored, temp_files

gen_test = pytest.mark.gen_test(timeout=60)
pytestmark = pytest.mark.usefixtures("storage")


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


async def read_file(images: Images, file: ImageFile) -> bytes:
    """The whole file as delivery reads it: from memory if small, else streamed."""
    data = await images.contents(file)
    if data is None:
        data = b"".join([piece async for piece in images.chunks(file, 0, file.size)])
    return data


async def deliverable(images: Images, record: dict[str, Any], width: int | None = None) -> bool:
    """Whether delivery finds the image (or its ``width`` thumbnail) and its bytes."""
    try:
        found = await images.find(record["id"])
        file = await images.file_for(found, width)
        return len(await read_file(images, file)) == file.size
    except NotFound:
        return False


def variant_rows(app) -> list[tuple[str, int, str, int | None]]:
    return app.services.db.run_sync(
        lambda s: [(v.sha256, v.width, v.state, v.bytes) for v in s.query(ImageVariant).order_by(ImageVariant.width)]
    )


# -- create ------------------------------------------------------------------------------------------


@gen_test
async def test_create_stores_the_re_encoded_file_and_answers_its_record(app, images, owner):
    data = jpeg((80, 60)) + b"<script>trailing bytes</script>"
    record = await images.create(owner, data)
    assert set(record) == {"id", "width", "height", "format", "bytes", "sha256", "created_at"}
    assert (record["format"], record["width"], record["height"]) == ("jpeg", 80, 60)
    stored = app.services.store.read(record["sha256"])
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
    assert temp_files(app) == []  # nothing of the processing is left behind


@gen_test
async def test_create_refuses_what_is_not_an_image_and_stores_nothing(app, images, owner):
    with pytest.raises(InvalidImage):
        await images.create(owner, b"\xff\xd8\xff" + bytes(100))
    assert count(app, Image) == 0 and count(app, ImageBlob) == 0
    assert stored(app, "blobs") == [] and temp_files(app) == []


@gen_test
async def test_the_same_bytes_twice_are_one_blob_used_by_two_images(app, images, owner):
    data = png((40, 30))
    first, second = await images.create(owner, data), await images.create(owner, data)
    assert first["id"] != second["id"] and first["sha256"] == second["sha256"]
    assert blob_refs(app, first["sha256"]) == 2 and count(app, ImageBlob) == 1
    assert stored(app, "blobs") == [object_name(first["sha256"])]


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


@pytest.mark.settings(upload_memory=1)  # room for one put at a time (a share is at most the budget)
@gen_test
async def test_puts_that_hold_their_file_in_memory_wait_for_room_in_the_upload_memory(app, images, owner, monkeypatch):
    """An S3 put sends its file from one buffer: concurrent uploads hold at most the budget in puts.
    A folder's put is a rename and never waits."""
    store, real_put, lock = app.services.store, app.services.store.put, threading.Lock()
    at_once, most = [0], [0]

    def counting_put(*args: Any, **kwargs: Any) -> None:
        with lock:
            at_once[0] += 1
            most[0] = max(most[0], at_once[0])
        try:
            time.sleep(0.05)  # long enough for the other uploads to arrive meanwhile
            real_put(*args, **kwargs)
        finally:
            with lock:
                at_once[0] -= 1

    monkeypatch.setattr(store, "put", counting_put)
    owners = [owner, *(new_user(app, f"+861886666880{n}") for n in range(3))]  # one user's uploads queue anyway
    made = await asyncio.gather(*(images.create(user, png((60 + n, 40))) for n, user in enumerate(owners)))
    assert len({image["sha256"] for image in made}) == 4
    if store.put_in_memory:
        assert most[0] == 1
    elif app.services.settings.database_url.startswith("mysql"):  # SQLite runs one write at a time anyway
        assert most[0] > 1
    assert images.upload_memory.in_use == 0


# A remote store on a server database: the deployment this is for. (A folder does not hang like this;
# SQLite runs one write at a time, so every upload waits for the hung one there anyway.)
@pytest.mark.parametrize("storage", [pytest.param("s3", marks=pytest.mark.s3)], indirect=True)
@pytest.mark.parametrize("database_url", [pytest.param("mysql", marks=pytest.mark.mysql)], indirect=True)
@gen_test
async def test_a_hung_remote_store_holds_at_most_half_the_database_threads(app, images, owner, monkeypatch):
    """Puts run under the blob row lock on a database thread: a store that hangs must leave the other
    half of the threads to logins and pages (db_pool_size 4: two waiting puts at most)."""
    store, release, waiting = app.services.store, threading.Event(), []
    real_put = store.put

    def hung_put(*args: Any, **kwargs: Any) -> None:
        waiting.append(1)
        release.wait(20)
        real_put(*args, **kwargs)

    monkeypatch.setattr(store, "put", hung_put)
    owners = [owner, *(new_user(app, f"+861886666881{n}") for n in range(3))]
    uploads = [asyncio.ensure_future(images.create(user, png((50 + n, 40)))) for n, user in enumerate(owners)]
    try:
        while len(waiting) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await asyncio.wait_for(app.services.db.ping(), 2)  # a free database thread answers at once
        assert time.monotonic() - started < 1
        assert len(waiting) == 2  # the other two uploads wait outside the database
    finally:
        release.set()
    made = await asyncio.gather(*uploads)
    assert len({image["sha256"] for image in made}) == 4


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
    assert (found.sha256, found.format, found.width, found.bytes) == (record["sha256"], "jpeg", 50, record["bytes"])
    for image_id in ("nope", "a" * 22, "../" + record["id"], record["id"] + "/"):
        with pytest.raises(NotFound):
            await images.find(image_id)


@gen_test
async def test_file_for_makes_a_thumbnail_once_and_never_upscales(app, images, owner):
    record = await images.create(owner, jpeg((400, 300)))
    sha = record["sha256"]
    found = await images.find(record["id"])
    original = ImageFile(sha, None, record["bytes"], "jpeg")
    assert await images.file_for(found, None) == original and await images.file_for(found, 640) == original
    assert original.etag == f'"{sha}"' and not original.thumbnail
    thumb = await images.file_for(found, 160)
    assert thumb == ImageFile(sha, 160, app.services.store.size(sha, 160), "jpeg")
    assert thumb.etag == f'"{sha}-w160"' and thumb.thumbnail
    assert open_image(await read_file(images, thumb)).size == (160, 120)
    assert await images.file_for(found, 160) == thumb and stored(app, "thumbs") == [object_name(sha, 160)]
    assert variant_rows(app) == [(sha, 160, "ready", thumb.size)]
    with pytest.raises(InvalidField):
        await images.file_for(found, 100)


@gen_test
async def test_contents_are_kept_in_memory_up_to_an_item_size_and_larger_files_are_streamed(app, images, owner):
    small = await images.create(owner, jpeg((40, 30)))
    file = await images.file_for(await images.find(small["id"]), None)
    data = await images.contents(file)
    assert data is not None and len(data) == small["bytes"]
    app.services.store.delete(small["sha256"], ())  # the store loses it: memory still has it
    assert await images.contents(file) == data
    big = ImageFile(small["sha256"], None, images.rules.memory_cache_item + 1, "jpeg")
    assert await images.contents(big) is None
    large = await images.create(owner, encode(noise((400, 400)), "PNG"))  # ~480 KB of noise
    file = await images.file_for(await images.find(large["id"]), None)
    pieces = [piece async for piece in images.chunks(file, 1000, file.size)]
    assert b"".join(pieces) == app.services.store.read(large["sha256"])[1000:]
    if isinstance(app.services.store, LocalImageStore):  # obstore hands on what arrived, at least CHUNK
        assert len(pieces) == 2
    url = await images.redirect_url(file)
    assert url == app.services.store.redirect_url(large["sha256"])  # signed in the same second: the same
    assert await images.redirect_url(file) == url  # reused for half its life


@gen_test
async def test_an_object_the_store_lost_is_not_found_and_a_lost_thumbnail_is_made_again(app, images, owner):
    record = await images.create(owner, jpeg((400, 300)))
    found = await images.find(record["id"])
    thumb = await images.file_for(found, 320)
    app.services.store.delete_variant(record["sha256"], 320)
    with pytest.raises(NotFound):
        await images.contents(thumb)
    assert variant_rows(app) == []  # forgotten: the next request makes it again
    again = await images.file_for(found, 320)
    assert again == thumb and open_image(await read_file(images, again)).size == (320, 240)
    app.services.store.delete(record["sha256"], (320,))
    with pytest.raises(NotFound):
        await images.contents(await images.file_for(found, None))


# -- thumbnails across hosts -------------------------------------------------------------------------


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """The widths of every thumbnail made, by any app of this process (each app is a host here)."""
    made: list[int] = []
    real = imaging.make_thumbnail

    def counted(src: Any, fmt: str, width: int, dst: str) -> None:
        made.append(width)
        time.sleep(0.2)  # slow enough that the other hosts ask while it is being made
        real(src, fmt, width, dst)

    monkeypatch.setattr(imaging, "make_thumbnail", counted)
    return made


@gen_test
async def test_hosts_asking_for_a_new_thumbnail_at_once_make_it_once(app, images, owner, build_app, settings, builds):
    record = await images.create(owner, jpeg((400, 300)))
    other = build_app(settings).services.images  # a second host: same database, same store

    async def ask(host: Images) -> ImageFile:
        return await host.file_for(await host.find(record["id"]), 160)

    files = await asyncio.gather(*(ask(host) for host in (images, other, images, other, other)))
    assert builds == [160] and len(set(files)) == 1
    assert variant_rows(app) == [(record["sha256"], 160, "ready", files[0].size)]
    assert await read_file(images, files[0]) == await read_file(other, files[0])
    assert stored(app, "thumbs") == [object_name(record["sha256"], 160)] and temp_files(app) == []


@gen_test
async def test_bytes_deleted_on_one_host_and_uploaded_again_get_their_thumbnail_on_another(
    app, images, owner, build_app, settings
):
    """The other host knew the thumbnail of the first image; the blob went with that image (its
    thumbnails with it) and the same bytes came back as a new image: the new id must not reuse the
    old thumbnail's size (behind nginx: a redirect to an object that is gone, a 404)."""
    data = encode(noise((400, 300)), "JPEG", quality=90)
    first = await images.create(owner, data)
    other = build_app(settings).services.images  # a second host: same database, same store
    thumb = await other.file_for(await other.find(first["id"]), 160)
    await images.delete(owner, first["id"])  # here: the blob and its thumbnails go
    assert images.store.size(thumb.sha256, 160) is None
    again = await images.create(owner, data)
    remade = await other.file_for(await other.find(again["id"]), 160)
    assert images.store.size(remade.sha256, 160) == remade.size
    assert variant_rows(app) == [(remade.sha256, 160, "ready", remade.size)]


@gen_test
async def test_a_claim_whose_builder_died_is_taken_over_once_its_lease_is_over(app, images, owner, clock, builds):
    record = await images.create(owner, jpeg((400, 300)))
    sha, lease = record["sha256"], images.rules.variant_lease
    claimed = ImageVariant(sha256=sha, width=160, state="building", claimed_at=clock.now())
    app.services.db.run_sync(lambda s: s.add(claimed))  # a host that claimed it, then died
    asking = asyncio.ensure_future(images.file_for(await images.find(record["id"]), 160))
    await asyncio.sleep(0.5)
    clock.advance(lease - 1)
    await asyncio.sleep(0.8)
    assert not asking.done() and builds == []  # waiting for the other builder, within its lease
    clock.advance(2)
    thumb = await asyncio.wait_for(asking, 10)
    assert builds == [160] and variant_rows(app) == [(sha, 160, "ready", thumb.size)]


@gen_test
async def test_a_builder_hung_past_its_lease_is_taken_over_and_both_finish_on_one_thumbnail(
    app, images, owner, build_app, settings, clock, monkeypatch
):
    """A builder that hangs (a store call begun while the store was down) must not hold the other
    hosts' askers once the store is back: after variant_lease one of them makes the thumbnail. When
    the hung one comes back it finishes on the same row and the same bytes, without an error."""
    assert images.rules.variant_lease <= rules.BUILDER_WAIT / 2  # every asker gets its turn to take over
    record = await images.create(owner, jpeg((400, 300)))
    other = build_app(settings).services.images  # a second host: same database, same store
    started, go, real = threading.Event(), threading.Event(), imaging.make_thumbnail
    made: list[str] = []

    def hangs_once(src: Any, fmt: str, width: int, dst: str) -> None:
        made.append(threading.current_thread().name)
        if len(made) == 1:
            started.set()
            go.wait(10)
        real(src, fmt, width, dst)

    monkeypatch.setattr(imaging, "make_thumbnail", hangs_once)
    hung = asyncio.ensure_future(images.file_for(await images.find(record["id"]), 160))
    while not started.is_set():
        await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(other.file_for(await other.find(record["id"]), 160))
    await asyncio.sleep(0.3)
    assert not waiting.done() and len(made) == 1  # within the lease: the other host waits
    clock.advance(images.rules.variant_lease + 0.5)
    taken_over = await asyncio.wait_for(waiting, 10)
    assert len(made) == 2 and not hung.done()
    go.set()
    late = await asyncio.wait_for(hung, 10)
    assert late == taken_over
    assert variant_rows(app) == [(record["sha256"], 160, "ready", late.size)]
    assert stored(app, "thumbs") == [object_name(record["sha256"], 160)] and temp_files(app) == []


@gen_test
async def test_a_missing_object_while_the_store_does_not_show_its_identity_is_unavailable_and_keeps_the_rows(
    app, images, owner, build_app, settings, monkeypatch
):
    """A store that is starting answers "no such object" for what it holds (SeaweedFS before its
    volumes are back): delivery must not tell the client the image is gone (404), nor forget a
    thumbnail's row. Once the store shows its identity again, a missing object is a 404."""
    images.bind()  # as main.py does at start-up: the store carries the deployment's id
    record = await images.create(owner, jpeg((400, 300)))
    found = await images.find(record["id"])
    await images.file_for(found, 160)
    other = build_app(settings).services.images  # a second host: nothing of it in memory
    other.store.delete(record["sha256"], [160])  # what the starting store does not find
    monkeypatch.setattr(other.store, "identity", lambda: None)
    for width in (None, 160, 320):  # the original, a thumbnail made before, one to make now
        with pytest.raises(Unavailable):
            await read_file(other, await other.file_for(await other.find(record["id"]), width))
    assert [row[:3] for row in variant_rows(app)] == [(record["sha256"], 160, "ready")]
    monkeypatch.undo()  # the store is whole again: the objects really are gone
    with pytest.raises(NotFound):
        await read_file(other, await other.file_for(await other.find(record["id"]), None))


@gen_test
async def test_a_request_waiting_on_a_stuck_builder_answers_unavailable_then_the_lease_ends_it(
    app, images, owner, clock, builds, monkeypatch
):
    record = await images.create(owner, jpeg((400, 300)))
    sha = record["sha256"]
    claimed = ImageVariant(sha256=sha, width=160, state="building", claimed_at=clock.now())
    app.services.db.run_sync(lambda s: s.add(claimed))  # a host that claimed it and hangs
    monkeypatch.setattr(rules, "BUILDER_WAIT", 0.3)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(images.file_for(await images.find(record["id"]), 160), 5)
    assert builds == []
    clock.advance(images.rules.variant_lease + 1)
    thumb = await images.file_for(await images.find(record["id"]), 160)
    assert builds == [160] and variant_rows(app) == [(sha, 160, "ready", thumb.size)]


@gen_test
async def test_a_thumbnail_finished_after_its_image_was_deleted_leaves_nothing(app, images, owner, monkeypatch):
    record = await images.create(owner, jpeg((400, 300)))
    found = await images.find(record["id"])
    started, go = threading.Event(), threading.Event()
    real = imaging.make_thumbnail

    def held(src: Any, fmt: str, width: int, dst: str) -> None:
        started.set()
        go.wait(10)
        real(src, fmt, width, dst)

    monkeypatch.setattr(imaging, "make_thumbnail", held)
    asking = asyncio.ensure_future(images.file_for(found, 160))
    while not started.is_set():
        await asyncio.sleep(0.01)
    await images.delete(owner, record["id"])  # the blob and its objects go while the thumbnail is made
    go.set()
    with pytest.raises(NotFound):
        await asking
    assert stored(app, "thumbs") == [] and stored(app, "blobs") == [] and temp_files(app) == []
    assert variant_rows(app) == [] and count(app, ImageBlob) == 0


@gen_test
async def test_a_thumbnail_whose_object_a_delete_took_while_the_same_bytes_came_back_is_made_again(
    app, images, owner, monkeypatch
):
    """Between a builder's put and its finish, another host deletes the image (and with it the
    thumbnail just put) and the same bytes are uploaded again: the builder must not mark a thumbnail
    ready that is not in the store (behind nginx nothing would ever notice); it makes it again."""
    db, data = app.services.db, encode(noise((800, 600)), "JPEG", quality=90)
    record = await images.create(owner, data)
    real, raced = queries.finish_variant, []

    def racing(s: Session, sha256: str, *args: Any) -> str:
        if not raced:
            raced.append(sha256)
            assert db.run_sync(queries.unlink_image, owner, record["id"]) == sha256
            assert db.run_sync(queries.drop_blob_if_unused, sha256, images._delete_objects)
            assert images.store.size(sha256, 160) is None  # the delete took the thumbnail just put
            again = asyncio.run_coroutine_threadsafe(images.create(owner, data), loop).result(30)
            replaced.append(again)
        return real(s, sha256, *args)

    loop, replaced = asyncio.get_running_loop(), []
    monkeypatch.setattr(queries, "finish_variant", racing)
    thumb = await images.file_for(await images.find(record["id"]), 160)
    assert raced and replaced
    assert images.store.size(thumb.sha256, 160) == thumb.size
    assert variant_rows(app) == [(thumb.sha256, 160, "ready", thumb.size)]


@gen_test
async def test_a_delete_while_the_store_is_down_succeeds_and_leaves_the_blob_to_the_sweep(
    app, images, owner, monkeypatch
):
    """The image row is gone once the delete commits: the client must hear so (not a 503 whose retry
    is a 404); the objects wait for the housekeeping sweep."""
    record = await images.create(owner, jpeg((400, 300)))

    def down(*args: Any) -> None:
        raise StoreUnavailable()

    monkeypatch.setattr(images.store, "delete", down)
    await images.delete(owner, record["id"])
    with pytest.raises(NotFound):
        await images.find(record["id"])
    assert count(app, ImageBlob) == 1 and images.store.exists(record["sha256"])
    monkeypatch.undo()
    assert images.collect_unused() == 1
    assert count(app, ImageBlob) == 0 and not images.store.exists(record["sha256"])


@gen_test
async def test_a_thumbnail_in_the_store_without_a_row_is_adopted_not_made_again(app, images, owner, builds):
    """A folder from the release before variants had rows (or a builder that died after its put)."""
    record = await images.create(owner, jpeg((400, 300)))
    legacy = b"a thumbnail made before variants had rows"
    put_object(app, record["sha256"], legacy, width=320)
    thumb = await images.file_for(await images.find(record["id"]), 320)
    assert builds == [] and thumb.size == len(legacy) and await read_file(images, thumb) == legacy
    assert variant_rows(app) == [(record["sha256"], 320, "ready", len(legacy))]


@pytest.mark.parametrize("storage", [pytest.param("s3", marks=pytest.mark.s3)], indirect=True)
@gen_test
async def test_a_store_outage_while_making_a_thumbnail_is_unavailable_at_once_and_recovers(
    build_app, settings, tmp_path
):
    """A private SeaweedFS (never the session's) goes down with a thumbnail asked for: the claim is
    given up (no waiting out a lease afterwards), nothing half-made stays, and it works once back."""
    private = SeaweedFS(tmp_path / "weed").start()
    try:
        app = build_app(settings.replace(**private.settings("outage")))
        images, owner = app.services.images, new_user(app, "+8618866668888")
        record = await images.create(owner, jpeg((400, 300)))
        found = await images.find(record["id"])
        private.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await images.file_for(found, 160)
        assert time.monotonic() - started < 5
        assert variant_rows(app) == [] and temp_files(app) == []
        private.start()
        thumb = await images.file_for(found, 160)
        assert open_image(await read_file(images, thumb)).size == (160, 120)
    finally:
        private.stop()


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
    assert blob_refs(app, sha) is None and count(app, Image) == 0 and variant_rows(app) == []
    assert stored(app, "blobs") == [] and stored(app, "thumbs") == []


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
    assert blob_refs(app, theirs["sha256"]) is None and stored(app, "blobs") == []


# -- start-up sweep --------------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@gen_test
async def test_startup_sweep(app, images, owner, caplog):
    store = app.services.store
    local = isinstance(store, LocalImageStore)
    kept = await images.create(owner, jpeg((40, 30)))

    tmp = Path(store.temp_dir())
    stray = tmp / f"up-{dead_pid()}-abcdef"
    stray.write_bytes(b"half an upload")
    in_flight = tmp / f"up-{os.getpid()}-inflight"  # a live writer's fresh file: stays
    in_flight.write_bytes(b"still arriving")

    def blob(seed: int) -> str:
        sha = hashlib.sha256(str(seed).encode()).hexdigest()
        put_object(app, sha, b"bytes nobody points at")
        return sha

    # Objects without a blob row: this deployment cannot prove it wrote them, so they stay.
    unclaimed = [blob(1), blob(2)]
    orphan_sha = hashlib.sha256(b"4").hexdigest()  # a thumbnail whose blob is long gone
    put_object(app, orphan_sha, b"a thumbnail finished after its image was deleted", width=320)

    unused_sha = blob(3)  # a row no image uses (a crash before the upload's commit)
    now = app.services.clock.now()
    app.services.db.run_sync(lambda s: s.add(ImageBlob(sha256=unused_sha, created_at=now)))

    swept = images.sweep()

    assert not stray.exists() and in_flight.exists()
    assert all(store.exists(sha) for sha in unclaimed)
    assert not store.exists(unused_sha) and blob_refs(app, unused_sha) is None
    assert store.exists(kept["sha256"]) and blob_refs(app, kept["sha256"]) == 1
    assert await deliverable(images, kept)
    if local:  # a folder is listed: its unclaimed files are counted, its orphan thumbnails go
        assert "2 files in the media store" in caplog.text and not store.exists(orphan_sha, 320)
        assert swept == {"temp_files": 1, "unused_blobs": 1, "unclaimed_files": 2, "orphan_thumbnails": 1}
    else:  # a shared remote store is never listed on start: nothing counted, nothing else touched
        assert store.exists(orphan_sha, 320)
        assert swept == {"temp_files": 1, "unused_blobs": 1, "unclaimed_files": 0, "orphan_thumbnails": 0}


@gen_test
async def test_an_upload_between_its_claim_and_its_store_survives_another_hosts_sweep(
    app, images, owner, build_app, settings
):
    """Host A has claimed the blob (committed: no image uses it yet) when host B's housekeeping runs:
    B drops the unused row; A's store makes the row again and puts the file under its lock."""
    other = build_app(settings).services
    swept: list[int] = []
    real_store = images._store

    async def store_after_a_sweep(*args: Any) -> dict[str, Any]:
        swept.append(await other.offloader.db(other.images.collect_unused))
        return await real_store(*args)

    images._store = store_after_a_sweep  # type: ignore[method-assign]
    record = await images.create(owner, jpeg((60, 40)))
    assert swept == [1]  # the claimed row was taken: the race happened
    assert blob_refs(app, record["sha256"]) == 1 and app.services.store.exists(record["sha256"])
    assert await deliverable(images, record) and other.images.collect_unused() == 0


@gen_test
async def test_sweep_waits_for_an_upload_holding_the_blob_lock(app, images, owner):
    """A blob no image uses yet, whose upload has not committed, is not swept from under it."""
    store, db = app.services.store, app.services.db
    data = jpeg((30, 20))
    first = await images.create(owner, data)
    sha = first["sha256"]
    db.run_sync(lambda s: s.execute(delete(Image)))  # gone without the API: the blob row stays, unused
    assert store.exists(sha) and blob_refs(app, sha) == 0
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
    assert store.exists(sha) and blob_refs(app, sha) == 1


# -- the store belongs to one deployment; blobs go with their last image, by any path -------------


def other_database(tmp_path: Path, offloader) -> Database:
    engine = make_test_engine(f"sqlite:///{tmp_path / 'other.sqlite3'}")
    migrate.upgrade(engine)
    return Database(engine, offloader)


@gen_test
async def test_a_store_bound_to_another_database_refuses_and_its_files_stay(app, images, owner, tmp_path):
    image = await images.create(owner, jpeg())
    images.bind()
    other = other_database(tmp_path, app.services.offloader)
    try:
        with pytest.raises(StoreMismatch, match="belongs to deployment"):
            Images(other, app.services.store, app.services.images.rules).sweep()
    finally:
        other.dispose()
    assert app.services.store.exists(image["sha256"]) and await deliverable(images, image)


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
    if isinstance(store, LocalImageStore):
        assert (media(app) / "DEPLOYMENT").read_text().strip() == deployment_id
    assert app.services.db.run_sync(lambda s: s.get(Deployment, 1)).store_bound_at is not None


@gen_test
async def test_the_sweeps_keep_a_file_they_cannot_prove_this_deployment_wrote(app, images):
    foreign = hashlib.sha256(b"another deployment's").hexdigest()
    put_object(app, foreign, b"bytes this database has no row for")
    listed = app.services.store.listed_at_start
    assert images.sweep()["unclaimed_files"] == (1 if listed else 0)
    counts = await housekeeping.run(app.services.db, images, app.services.clock.now())
    assert counts["unused_blobs"] == 0
    assert app.services.store.exists(foreign)


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
    assert stored(app, "blobs") == [object_name(shared_sha)]
    assert stored(app, "thumbs") == [] and variant_rows(app) == []
    assert await deliverable(images, theirs) and await deliverable(images, theirs, 160)
    assert not await deliverable(images, mine[1])
