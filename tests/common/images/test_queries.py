"""images/queries.py: each named unit run through Database.run on SQLite and MariaDB, without the rules."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import pytest
from sqlalchemy import select

from demo.common.errors import QuotaExceeded
from demo.common.images import queries
from demo.models import Deployment, Image, ImageBlob, User

from .support import blob_refs, count

gen_test = pytest.mark.gen_test(timeout=60)
NOW = dt.datetime(2026, 11, 29, 12, 0, 0, 123456)
QUOTA = queries.Quota(count=3, bytes=1000)


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


@pytest.fixture
def db(app) -> Any:
    return app.services.db


def new_user(db: Any, phone: str) -> int:
    def add(s) -> int:
        user = User(phone=phone, password_hash="-", created_at=NOW)
        s.add(user)
        s.flush()
        return user.id

    return db.run_sync(add)


@pytest.fixture
def owner(db) -> int:
    return new_user(db, "+8618866668888")


def new_image(
    owner: int, n: int, size: int = 100, *, decoded: bool = True, source: str | None = None
) -> queries.NewImage:
    return queries.NewImage(owner, sha(n), "png", 10 + n, 20, size, source or sha(1000 + n), decoded=decoded)


async def store(
    db: Any, image: queries.NewImage, placed: list[str] | None = None, quota: queries.Quota = QUOTA
) -> dict[str, Any]:
    def place() -> None:
        if placed is not None:
            placed.append(image.sha256)

    await db.run(queries.claim_blob, image.sha256, NOW)
    return await db.run(queries.store_image, image, quota, NOW, place)


@gen_test
async def test_store_image_inserts_the_row_and_remembers_a_decoded_upload(app, db, owner):
    placed: list[str] = []
    values = await store(db, new_image(owner, 1), placed)
    assert placed == [sha(1)] and values["sha256"] == sha(1) and len(values["id"]) == 22
    row = db.run_sync(lambda s: s.scalars(select(Image).where(Image.id == values["id"])).one())
    assert (row.owner_id, row.format, row.width, row.height, row.bytes) == (owner, "png", 11, 20, 100)
    assert row.created_at == NOW  # microseconds and all, on both databases
    blob = db.run_sync(lambda s: s.get(ImageBlob, sha(1)))
    assert (blob.refs, blob.source_sha256, blob.format, blob.width, blob.bytes) == (1, sha(1001), "png", 11, 100)
    found = await db.run(queries.find, values["id"])
    assert (found.sha256, found.format, found.width) == (sha(1), "png", 11)
    assert await db.run(queries.find, "nothing-like-it") is None


@gen_test
async def test_usage_counts_images_and_bytes_as_integers(db, owner):
    empty = await db.run(queries.usage, owner)
    assert empty == queries.Usage(0, 0)
    await store(db, new_image(owner, 1, 300))
    await store(db, new_image(owner, 2, 200))
    used = await db.run(queries.usage, owner)
    assert used == queries.Usage(2, 500) and type(used.used) is int  # MariaDB's SUM is a DECIMAL


@gen_test
async def test_store_image_refuses_past_either_quota_and_rolls_back(app, db, owner):
    await store(db, new_image(owner, 1, 900))
    with pytest.raises(QuotaExceeded):
        await store(db, new_image(owner, 2, 101))  # 1001 bytes
    for n in (3, 4):
        await store(db, new_image(owner, n, 1))
    with pytest.raises(QuotaExceeded):
        await store(db, new_image(owner, 5, 1))  # a fourth image
    assert count(app, Image) == 3 and blob_refs(app, sha(2)) == 0  # claimed, never used


@gen_test
async def test_a_failing_place_rolls_the_image_back(app, db, owner):
    await db.run(queries.claim_blob, sha(1), NOW)

    def place() -> None:
        raise FileNotFoundError("the blob went")

    with pytest.raises(FileNotFoundError):
        await db.run(queries.store_image, new_image(owner, 1), QUOTA, NOW, place)
    assert count(app, Image) == 0
    assert db.run_sync(lambda s: s.get(ImageBlob, sha(1))).refs == 0  # the use was not counted


@gen_test
async def test_claim_blob_is_idempotent(app, db):
    for _ in range(2):
        await db.run(queries.claim_blob, sha(1), NOW)
    assert count(app, ImageBlob) == 1 and db.run_sync(lambda s: s.get(ImageBlob, sha(1))).refs == 0


@gen_test
async def test_a_known_upload_is_found_only_for_its_own_uploader(db, owner):
    other = new_user(db, "+8618866669999")
    await store(db, new_image(owner, 1, source=sha(500)))
    known = await db.run(queries.known_upload, sha(500), owner)
    assert (known.sha256, known.format, known.width, known.height, known.bytes) == (sha(1), "png", 11, 20, 100)
    assert await db.run(queries.known_upload, sha(500), other) is None
    assert await db.run(queries.known_upload, sha(501), owner) is None
    # A blob stored again without a decode keeps what its first decode found.
    await store(db, new_image(owner, 1, decoded=False, source=sha(502)))
    assert (await db.run(queries.known_upload, sha(500), owner)).sha256 == sha(1)


@gen_test
async def test_page_unlink_and_drop_a_blob_with_its_last_image(app, db, owner):
    ids = [(await store(db, new_image(owner, n % 2)))["id"] for n in range(3)]  # blobs 0, 1, 0
    newest = await db.run(queries.page, owner, 2, None)
    assert [r.id for r in newest] == ids[::-1][:2]
    older = await db.run(queries.page, owner, 10, newest[-1].pk)
    assert [r.id for r in older] == ids[:1]
    other = new_user(db, "+8618866669999")
    assert await db.run(queries.unlink_image, other, ids[0]) is None  # not theirs
    assert await db.run(queries.unlink_image, owner, ids[0]) == sha(0)
    removed: list[str] = []
    assert not await db.run(queries.drop_blob_if_unused, sha(0), removed.append)  # ids[2] still uses it
    assert await db.run(queries.unlink_image, owner, ids[2]) == sha(0)
    assert await db.run(queries.drop_blob_if_unused, sha(0), removed.append)
    assert removed == [sha(0)] and blob_refs(app, sha(0)) is None
    assert not await db.run(queries.drop_blob_if_unused, sha(0), removed.append)  # no row any more


@gen_test
async def test_unused_blobs_and_blob_hashes(db, owner):
    await store(db, new_image(owner, 1))
    await db.run(queries.claim_blob, sha(2), NOW)  # a claim whose upload never committed
    assert await db.run(queries.unused_blobs) == [sha(2)]
    assert await db.run(queries.blob_hashes) == {sha(1), sha(2)}


@gen_test
async def test_the_deployment_row_is_made_once_and_marked_bound(app, db):
    first = await db.run(queries.deployment, NOW)
    again = await db.run(queries.deployment, NOW)
    assert first.deployment_id == again.deployment_id and len(first.deployment_id) == 32
    assert again.store_bound_at is None
    await db.run(queries.mark_store_bound, NOW)
    assert db.run_sync(lambda s: s.get(Deployment, 1)).store_bound_at == NOW
    assert count(app, Deployment) == 1
