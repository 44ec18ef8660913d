"""The receiver (images/receiver.py), without HTTP: it owns an upload from the request head to the
image record. Whatever ends an upload, its spool is discarded exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from demo.common.errors import InvalidField, InvalidImage, QuotaExceeded, TooLarge, UnsupportedMediaType
from demo.common.images import queries
from demo.common.images.receiver import UploadReceiver
from demo.common.images.rules import Images
from demo.common.images.uploads import IN_MEMORY_MAX, MULTIPART_SLACK, SPOOL_WRITE_BYTES, UploadSpool
from demo.common.infra.db import SqlCursor, sql_unit
from demo.models import User

from .support import files, jpeg, media, multipart, png

gen_test = pytest.mark.gen_test(timeout=60)


@pytest.fixture
def images(app) -> Images:
    return app.services.images


@pytest.fixture
def owner(app) -> int:
    def add(s) -> int:
        user = User(phone="+8618866668888", password_hash="-", created_at=app.services.clock.now())
        s.add(user)
        s.flush()
        return user.id

    return app.services.db.run_sync(add)


@pytest.fixture
def discards(monkeypatch) -> list[UploadSpool]:
    """Every spool discarded, once per discard."""
    seen: list[UploadSpool] = []
    real = UploadSpool.discard

    def counting(spool: UploadSpool) -> None:
        seen.append(spool)
        real(spool)

    monkeypatch.setattr(UploadSpool, "discard", counting)
    return seen


def receiver(app) -> UploadReceiver:
    return UploadReceiver(app.services.images, app.services.offloader)


def temp_files(app) -> list[Path]:
    return files(media(app) / "tmp")


async def feed_all(upload: UploadReceiver, body: bytes, size: int = 64 * 1024) -> None:
    for start in range(0, len(body), size):
        await upload.feed(body[start : start + size])


# -- the receiver ------------------------------------------------------------------------------------


@gen_test
async def test_a_small_declared_body_stays_in_memory_and_is_stored(app, images, owner, discards):
    data = jpeg((120, 90))
    upload = receiver(app)
    await upload.start(owner, "image/jpeg", str(len(data)))
    assert images.upload_memory.in_use == len(data)
    await feed_all(upload, data)
    assert temp_files(app) == []
    record = await upload.finish()
    assert (record["format"], record["width"]) == ("jpeg", 120)
    assert images.upload_memory.in_use == 0 and len(discards) == 1 and upload.discarded
    upload.abandon()  # the request's end, after the answer: nothing more to do
    assert len(discards) == 1


@gen_test
async def test_a_chunked_or_large_body_goes_to_a_temp_file_that_is_gone_afterwards(
    app, images, owner, discards, monkeypatch
):
    data = png((30, 30)) + bytes(3 * SPOOL_WRITE_BYTES)  # trailing bytes after IEND: cut by re-encoding
    writes: list[int] = []
    real_write = UploadSpool.write
    monkeypatch.setattr(
        UploadSpool, "write", lambda spool, chunks: (writes.append(sum(map(len, chunks))), real_write(spool, chunks))[1]
    )
    upload = receiver(app)
    await upload.start(owner, "image/png", None)  # chunked: no declared length
    await feed_all(upload, data)
    assert len(temp_files(app)) == 1 and images.upload_memory.in_use == 0
    assert writes and all(size >= SPOOL_WRITE_BYTES for size in writes)  # gathered, not one write per chunk
    record = await upload.finish()
    assert record["format"] == "png" and sum(writes) == len(data)
    assert temp_files(app) == [] and len(discards) == 1


@gen_test
async def test_a_body_longer_than_declared_leaves_memory_for_the_disk(app, images, owner, discards):
    data = jpeg((64, 48))
    upload = receiver(app)
    await upload.start(owner, "image/jpeg", "100")
    assert images.upload_memory.in_use == 100
    await feed_all(upload, data)  # more than the 100 bytes declared
    assert images.upload_memory.in_use == 0
    assert (await upload.finish())["format"] == "jpeg" and len(discards) == 1


@pytest.mark.settings(max_upload_bytes=64 * 1024)
@gen_test
async def test_a_body_past_the_limit_is_refused_and_discarded_at_once(app, images, owner, discards):
    upload = receiver(app)
    await upload.start(owner, "image/jpeg", None)
    with pytest.raises(TooLarge):
        await feed_all(upload, b"\xff\xd8\xff" + bytes(SPOOL_WRITE_BYTES), size=16 * 1024)
    assert len(discards) == 1 and upload.discarded and not upload.receiving
    await upload.feed(b"more")  # the rest of the body is ignored
    upload.abandon()
    assert len(discards) == 1 and temp_files(app) == [] and images.upload_memory.in_use == 0


@pytest.mark.settings(max_upload_bytes=64 * 1024)
@pytest.mark.parametrize(
    "content_type, length, error",
    [
        ("text/html", "10", UnsupportedMediaType),
        ("multipart/form-data", "10", InvalidField),  # no boundary
        ("image/jpeg", str(64 * 1024 + 1), TooLarge),
        ("multipart/form-data; boundary=x", str(64 * 1024 + MULTIPART_SLACK + 1), TooLarge),
    ],
)
@gen_test
async def test_start_refuses_before_the_body_and_holds_nothing(
    app, images, owner, discards, content_type, length, error
):
    upload = receiver(app)
    with pytest.raises(error):
        await upload.start(owner, content_type, length)
    assert not upload.receiving and images.upload_memory.in_use == 0
    upload.abandon()
    assert discards == []


@pytest.mark.settings(image_quota_count=1)
@gen_test
async def test_start_refuses_a_user_without_room(app, images, owner):
    await images.create(owner, jpeg())
    with pytest.raises(QuotaExceeded):
        await receiver(app).start(owner, "image/jpeg", "1000")
    assert images.upload_memory.in_use == 0


@gen_test
async def test_a_client_gone_mid_body_discards_the_upload_at_once(app, images, owner, discards):
    upload = receiver(app)
    await upload.start(owner, "image/jpeg", str(IN_MEMORY_MAX + 1))  # too long for memory: disk
    await feed_all(upload, jpeg()[:500] + bytes(SPOOL_WRITE_BYTES))
    assert len(temp_files(app)) == 1
    upload.abandon()
    upload.abandon()
    assert temp_files(app) == [] and len(discards) == 1


@gen_test
async def test_a_client_gone_during_a_write_discards_when_the_write_ends(app, images, owner, discards, monkeypatch):
    started, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    real_write = UploadSpool.write

    def slow_write(spool: UploadSpool, chunks: list[bytes]) -> None:
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        real_write(spool, chunks)

    monkeypatch.setattr(UploadSpool, "write", slow_write)
    upload = receiver(app)
    await upload.start(owner, "image/jpeg", None)
    feeding = asyncio.ensure_future(upload.feed(bytes(SPOOL_WRITE_BYTES)))
    await started.wait()
    upload.abandon()  # the write holds the file: not now...
    assert discards == []
    release.set()
    await feeding  # ...but as soon as it ends
    assert len(discards) == 1 and temp_files(app) == []


@gen_test
async def test_a_client_gone_while_the_image_is_processed_does_not_pull_the_file_away(
    app, images, owner, discards, monkeypatch
):
    entered, release = asyncio.Event(), asyncio.Event()
    create = Images.create

    async def slow_create(self: Images, user_id: int, src: Any, read: Any) -> dict[str, Any]:
        entered.set()
        await release.wait()
        assert Path(src).exists()  # still there for the processing
        return await create(self, user_id, src, read)

    monkeypatch.setattr(Images, "create", slow_create)
    upload = receiver(app)
    await upload.start(owner, "image/png", None)
    await feed_all(upload, png((40, 30)) + bytes(SPOOL_WRITE_BYTES))
    finishing = asyncio.ensure_future(upload.finish())
    await entered.wait()
    upload.abandon()  # finish owns the spool now
    assert discards == [] and len(temp_files(app)) == 1
    release.set()
    assert (await finishing)["format"] == "png"
    assert len(discards) == 1 and temp_files(app) == []


@pytest.mark.parametrize("body", [b"\xff\xd8\xff" + bytes(100), b""], ids=["not-an-image", "empty"])
@gen_test
async def test_a_body_that_is_no_image_is_refused_and_discarded(app, images, owner, discards, body):
    upload = receiver(app)
    await upload.start(owner, "image/jpeg", str(len(body)))
    await feed_all(upload, body)
    with pytest.raises(InvalidImage):
        await upload.finish()
    assert len(discards) == 1 and temp_files(app) == [] and images.upload_memory.in_use == 0


@gen_test
async def test_a_multipart_body_carries_the_file_in_the_image_field(app, owner, discards):
    body, content_type = multipart(jpeg((50, 40)))
    upload = receiver(app)
    await upload.start(owner, content_type, str(len(body)))
    await feed_all(upload, body, size=7)
    assert (await upload.finish())["width"] == 50 and len(discards) == 1


@gen_test
async def test_a_multipart_body_without_the_image_field_is_refused_at_its_end(app, owner, discards):
    body, content_type = multipart(jpeg(), field="file")
    upload = receiver(app)
    await upload.start(owner, content_type, str(len(body)))
    await feed_all(upload, body)
    with pytest.raises(InvalidField, match="'image'"):
        await upload.finish()
    assert len(discards) == 1


@gen_test
async def test_the_body_goes_once_decoded_before_the_image_is_stored(app, images, owner, discards, monkeypatch):
    """Memory and temp file are given back as soon as the decode is done with them, not after the store."""
    seen: list[tuple[int, int]] = []
    store_image = queries.store_image

    @sql_unit
    def watching(c: SqlCursor, *args: Any) -> dict[str, Any]:
        seen.append((images.upload_memory.in_use, len(discards)))
        return store_image(c, *args)

    monkeypatch.setattr(queries, "store_image", watching)
    data = jpeg((100, 80))
    upload = receiver(app)
    await upload.start(owner, "image/jpeg", str(len(data)))
    await feed_all(upload, data)
    await upload.finish()
    assert seen == [(0, 1)] and len(discards) == 1


@gen_test
async def test_a_client_gone_while_start_checks_room_gives_the_spool_back(app, images, owner, discards, monkeypatch):
    """Closed while ``start`` awaits ``check_room``: no spool yet for ``abandon``, and Tornado calls no
    on_finish after that; the spool ``start`` then makes is given back at once (its memory share too)."""
    entered, release = asyncio.Event(), asyncio.Event()
    check_room = Images.check_room

    async def slow_check_room(self: Images, user_id: int) -> None:
        entered.set()
        await release.wait()
        await check_room(self, user_id)

    monkeypatch.setattr(Images, "check_room", slow_check_room)
    upload = receiver(app)
    starting = asyncio.ensure_future(upload.start(owner, "image/jpeg", "1000"))  # small: memory
    await entered.wait()
    upload.abandon()  # nothing to let go yet
    release.set()
    await starting
    assert not upload.receiving and upload.discarded
    assert images.upload_memory.in_use == 0 and len(discards) == 1
    upload.abandon()
    await upload.discard()
    assert len(discards) == 1
    await upload.feed(jpeg())  # ignored: the upload is over
    assert images.upload_memory.in_use == 0 and temp_files(app) == []
