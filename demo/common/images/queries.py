"""The SQL of images: named units of work for ``Database.run`` (see images/rules.py for the why).

The upload's units and the id lookup of delivery run on the fast path (``@sql_unit``, hand-written
``Sql``): they run on every upload and every delivery cache miss. The list, delete and the sweeps use
the ORM (public API). The blob row (``image_blobs``) is the lock for one content hash; the steps that
touch the file under that lock take it as a callable (``place``, ``remove``), so no unit does I/O of
its own.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import delete, exists, select, update
from sqlalchemy.orm import Session

from demo.common.errors import QuotaExceeded
from demo.common.infra import ratelimit
from demo.common.infra.db import Row, Sql, SqlCursor, calls_store, idempotent, long_work, sql_unit
from demo.models import Deployment, Image, ImageBlob, ImageVariant

# -- statements --------------------------------------------------------------------------------------

USAGE = Sql(
    "SELECT COUNT(pk) AS image_count, COALESCE(SUM(bytes), 0) AS used_bytes FROM images WHERE owner_id = :user_id"
)
# Locks the blob row and counts one more use (and makes the row again if a sweep took it since the claim).
ADD_BLOB_REF = Sql(
    sqlite="INSERT INTO image_blobs (sha256, refs, created_at) VALUES (:sha256, 1, :now)"
    " ON CONFLICT (sha256) DO UPDATE SET refs = image_blobs.refs + 1",
    mysql="INSERT INTO image_blobs (sha256, refs, created_at) VALUES (:sha256, 1, :now)"
    " ON DUPLICATE KEY UPDATE refs = refs + 1",
)
# The blob row unless it is there (locked until commit, either way: on MariaDB the no-op update takes
# the row lock; on SQLite the write transaction holds the database's one write lock anyway).
CLAIM_BLOB = Sql(
    sqlite="INSERT INTO image_blobs (sha256, refs, created_at) VALUES (:sha256, 0, :now)"
    " ON CONFLICT (sha256) DO NOTHING",
    mysql="INSERT INTO image_blobs (sha256, refs, created_at) VALUES (:sha256, 0, :now)"
    " ON DUPLICATE KEY UPDATE sha256 = VALUES(sha256)",
)
# A known upload: the blob these exact bytes were made into before, and what their decode found. Only
# the uploader's own blob: a shortcut taken (faster) for another user's bytes would tell anyone what
# others have uploaded.
KNOWN_UPLOAD = Sql(
    "SELECT image_blobs.sha256, image_blobs.format, image_blobs.width, image_blobs.height,"
    " image_blobs.bytes FROM image_blobs WHERE image_blobs.source_sha256 = :source"
    " AND image_blobs.format IS NOT NULL AND EXISTS (SELECT 1 FROM images"
    " WHERE images.owner_id = :user_id AND images.sha256 = image_blobs.sha256) LIMIT 1"
)
REMEMBER_UPLOAD = Sql(
    "UPDATE image_blobs SET source_sha256 = :source, format = :format, width = :width,"
    " height = :height, bytes = :bytes WHERE sha256 = :sha256"
)
NEW_IMAGE = Sql(
    "INSERT INTO images (id, owner_id, sha256, format, width, height, bytes, created_at)"
    " VALUES (:id, :owner_id, :sha256, :format, :width, :height, :bytes, :now)"
)
FIND = Sql("SELECT sha256, format, width, bytes FROM images WHERE id = :id")
# A thumbnail's row, locked until commit on MariaDB (SQLite: the write transaction holds the lock).
_VARIANT = "SELECT state, claimed_at, bytes FROM image_variants WHERE sha256 = :sha256 AND width = :width"
VARIANT = Sql(sqlite=_VARIANT, mysql=f"{_VARIANT} FOR UPDATE", datetimes=("claimed_at",))
BLOB_EXISTS = Sql("SELECT sha256 FROM image_blobs WHERE sha256 = :sha256")
NEW_VARIANT = Sql(
    "INSERT INTO image_variants (sha256, width, state, claimed_at, bytes)"
    " VALUES (:sha256, :width, 'building', :now, NULL)"
)
TAKE_OVER_VARIANT = Sql(
    "UPDATE image_variants SET claimed_at = :now WHERE sha256 = :sha256 AND width = :width AND state = 'building'"
)

# An account's purge (accounts.queries.purge_user): its images go, and their blobs' legacy counts (read
# by the previous release only) go down by as many; the blobs themselves are the sweeps' to collect.
RELEASE_REFS = Sql(
    "UPDATE image_blobs SET refs = refs - (SELECT COUNT(images.pk) FROM images"
    " WHERE images.owner_id = :user_id AND images.sha256 = image_blobs.sha256)"
    " WHERE sha256 IN (SELECT images.sha256 FROM images WHERE images.owner_id = :user_id)"
)
DELETE_OWNED = Sql("DELETE FROM images WHERE owner_id = :user_id")


# -- what the rules hand over -------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    count: int
    used: int  # bytes


@dataclass(frozen=True)
class Quota:
    count: int
    bytes: int


@dataclass(frozen=True)
class NewImage:
    """An image row to insert, for blob ``sha256`` (whose file ``place`` puts in place, or checks)."""

    owner_id: int
    sha256: str
    format: str
    width: int
    height: int
    bytes: int
    source: str  # the sha256 of the uploaded bytes
    decoded: bool  # a fresh decode (remember what it found), not a known upload's blob


@dataclass(frozen=True)
class VariantClaim:
    """What ``claim_variant`` found: ``ready`` (made, ``bytes`` long), ``mine`` (the caller makes it
    now), ``building`` (another builder has it since ``claimed_at``), ``gone`` (the blob has no row)."""

    state: Literal["ready", "mine", "building", "gone"]
    bytes: int | None = None
    claimed_at: dt.datetime | None = None


# -- upload (fast path) ------------------------------------------------------------------------------


@sql_unit
@idempotent
def usage(c: SqlCursor, user_id: int) -> Usage:
    return _usage(c, user_id)


@sql_unit
@idempotent
def known_upload(c: SqlCursor, source: str, user_id: int) -> Row | None:
    """(sha256, format, width, height, bytes) of the user's own blob made from these bytes, or None."""
    return c.first(KNOWN_UPLOAD, {"source": source, "user_id": user_id})


@sql_unit
@idempotent  # a repeated claim finds the row and changes nothing
def claim_blob(c: SqlCursor, sha256: str, now: dt.datetime) -> None:
    c.execute(CLAIM_BLOB, {"sha256": sha256, "now": now})


def upload_lock(user_id: int) -> ratelimit.Window:
    """The counter row that one user's uploads take in turn (never a limit: it only serialises them)."""
    return ratelimit.Window(f"upload-lock:{user_id}", limit=2**31 - 1, seconds=86400)


@sql_unit
@calls_store
def store_image(
    c: SqlCursor, image: NewImage, quota: Quota, now: dt.datetime, place: Callable[[], None]
) -> dict[str, Any]:
    """Insert the image under the owner's quota, holding the blob row lock while ``place`` puts (or
    checks) its file; the new row's fields (without ``created_at``: ``now``). QuotaExceeded (or what
    ``place`` raises) rolls back (an object put meanwhile goes with the upload's claim: rules.py)."""
    c.execute(ADD_BLOB_REF, {"sha256": image.sha256, "now": now})
    place()  # under the blob row lock: see images/rules.py
    # Then serialise this user's uploads, so two concurrent ones cannot both squeeze under the quota:
    # count one in a per-user row, after the put, so that a user's second upload never waits on the
    # first one's put (longer than a statement may wait: db_io_timeout). A write, not a SELECT ... FOR
    # UPDATE: on Galera a row lock holds only on the node that takes it, while two writes of one row
    # through two nodes fail certification and the unit runs again, now seeing the other upload.
    ratelimit.reserve(c, ratelimit.window_params([upload_lock(image.owner_id)], now), 1)
    used = _usage(c, image.owner_id)
    if used.count + 1 > quota.count or used.used + image.bytes > quota.bytes:
        raise QuotaExceeded()
    if image.decoded:
        c.execute(
            REMEMBER_UPLOAD,
            {
                "sha256": image.sha256,
                "source": image.source,
                "format": image.format,
                "width": image.width,
                "height": image.height,
                "bytes": image.bytes,
            },
        )
    values = {
        "id": new_image_id(),
        "width": image.width,
        "height": image.height,
        "format": image.format,
        "bytes": image.bytes,
        "sha256": image.sha256,
    }
    c.execute(NEW_IMAGE, {**values, "owner_id": image.owner_id, "now": now})
    return values


def _usage(c: SqlCursor, user_id: int) -> Usage:
    row = c.first(USAGE, {"user_id": user_id})
    assert row is not None  # an aggregate always has its row
    return Usage(int(row.image_count), int(row.used_bytes))  # MariaDB's SUM is a DECIMAL


def new_image_id() -> str:
    return secrets.token_urlsafe(16)  # 128 bits, 22 URL-safe characters


# -- reading -------------------------------------------------------------------------------------------


@sql_unit
@idempotent
def find(c: SqlCursor, image_id: str) -> Row | None:
    """(sha256, format, width, bytes) of an image id, or None."""
    return c.first(FIND, {"id": image_id})


@sql_unit
def claim_variant(c: SqlCursor, sha256: str, width: int, now: dt.datetime, stale_before: dt.datetime) -> VariantClaim:
    """Who makes the ``width`` thumbnail of ``sha256``: the caller if nobody claimed it, or if its
    builder claimed it before ``stale_before`` (taken over: that builder is presumed dead). Two
    first claimers at once: one of them fails with a conflict (the primary key) and asks again."""
    key = {"sha256": sha256, "width": width, "now": now}
    row = c.first(VARIANT, key)
    if row is None:
        if c.first(BLOB_EXISTS, key) is None:
            return VariantClaim("gone")
        c.execute(NEW_VARIANT, key)  # a blob deleted meanwhile fails the foreign key: a conflict too
        return VariantClaim("mine", claimed_at=now)
    if row.state == "ready":
        return VariantClaim("ready", bytes=int(row.bytes))
    if row.claimed_at < stale_before:
        c.execute(TAKE_OVER_VARIANT, key)
        return VariantClaim("mine", claimed_at=now)
    return VariantClaim("building", claimed_at=row.claimed_at)


@calls_store
def finish_variant(
    s: Session,
    sha256: str,
    width: int,
    size: int,
    now: dt.datetime,
    remove: Callable[[], None],
    present: Callable[[], bool],
) -> str:
    """Under the blob row lock: mark the thumbnail ready with its ``size`` ("ready"). "gone" (after
    ``remove``, which deletes the object just put) if the blob has no row any more: its image was
    deleted while the thumbnail was being made, and the delete did not see the object, which came
    after. "lost" if the claim's row went too (the blob was deleted and the same bytes uploaded again
    meanwhile: that delete may have taken the object just put), and ``present`` finds no object: the
    caller claims again and makes it anew."""
    locked = s.scalar(select(ImageBlob.sha256).where(ImageBlob.sha256 == sha256).with_for_update())
    if locked is None:
        remove()
        return "gone"
    row = s.get(ImageVariant, (sha256, width), with_for_update=True)
    if row is None:
        if not present():
            return "lost"
        s.add(ImageVariant(sha256=sha256, width=width, state="ready", claimed_at=now, bytes=size))
    elif row.state != "ready":
        row.state, row.bytes = "ready", size
    return "ready"


@idempotent  # deletes only the claim taken at claimed_at, once
def release_variant(s: Session, sha256: str, width: int, claimed_at: dt.datetime) -> None:
    """Give up the claim taken at ``claimed_at`` (the build failed): the next asker builds at once
    instead of waiting out the lease. A claim taken over by another builder since is left alone."""
    s.execute(
        delete(ImageVariant).where(
            ImageVariant.sha256 == sha256,
            ImageVariant.width == width,
            ImageVariant.state == "building",
            ImageVariant.claimed_at == claimed_at,
        )
    )


@idempotent  # a delete: done twice, the row is still gone
def forget_variant(s: Session, sha256: str, width: int) -> None:
    """The store lost a thumbnail its row calls ready: drop the row, so the next asker makes it again."""
    s.execute(delete(ImageVariant).where(ImageVariant.sha256 == sha256, ImageVariant.width == width))


@idempotent
def page(s: Session, user_id: int, limit: int, before: int | None) -> list[Image]:
    """At most ``limit`` of the user's images, newest first, older than pk ``before`` if given."""
    query = select(Image).where(Image.owner_id == user_id)
    if before is not None:
        query = query.where(Image.pk < before)
    return list(s.scalars(query.order_by(Image.pk.desc()).limit(limit)))


# -- deleting and sweeping -----------------------------------------------------------------------------


def unlink_image(s: Session, user_id: int, image_id: str) -> str | None:
    """Delete the user's image; the sha256 of its blob, or None if the user has no such image."""
    row = s.scalars(select(Image).where(Image.id == image_id, Image.owner_id == user_id)).first()
    if row is None:
        return None
    s.delete(row)
    s.execute(update(ImageBlob).where(ImageBlob.sha256 == row.sha256).values(refs=ImageBlob.refs - 1))
    return row.sha256


def release_all(c: SqlCursor, user_id: int) -> int:
    """Delete every image of ``user_id`` (inside the caller's unit: an account's purge, which holds the
    user's row); how many. Their blob rows stay: ``Images.collect_unused`` (housekeeping, start-up)
    drops each one no image uses any more, with its objects in whichever store, under the blob's lock,
    as it does after any delete that happened without the API. A blob another image still uses stays."""
    c.execute(RELEASE_REFS, {"user_id": user_id})
    return c.execute(DELETE_OWNED, {"user_id": user_id})


@calls_store
def drop_blob_if_unused(s: Session, sha256: str, remove: Callable[[str], None]) -> bool:
    """Under the blob row lock: if no image uses the blob, ``remove`` its files and delete the row."""
    locked = s.scalar(select(ImageBlob.sha256).where(ImageBlob.sha256 == sha256).with_for_update())
    # Read after the lock (READ COMMITTED on MySQL): an upload that held it has committed its image.
    if locked is None or s.scalar(select(Image.pk).where(Image.sha256 == sha256).limit(1)) is not None:
        return False
    remove(sha256)  # while holding the lock: an upload of these bytes waits, then puts the file back
    s.execute(delete(ImageBlob).where(ImageBlob.sha256 == sha256))
    return True


@idempotent
@long_work
def unused_blobs(s: Session) -> list[str]:
    """The sha256 of every blob row no image uses."""
    return list(s.scalars(select(ImageBlob.sha256).where(~exists().where(Image.sha256 == ImageBlob.sha256))))


@idempotent
@long_work
def blobs_missing(s: Session, present: Callable[[str], bool]) -> list[str]:
    """The sha256 of every blob an image uses that ``present`` says is missing (streamed: a big table
    is never held whole)."""
    used = s.scalars(select(Image.sha256).distinct().execution_options(yield_per=1000))
    return [sha256 for sha256 in used if not present(sha256)]


@idempotent
@long_work
def blob_hashes(s: Session) -> set[str]:
    return set(s.scalars(select(ImageBlob.sha256)))


# -- the deployment the store belongs to ----------------------------------------------------------------


@idempotent  # a re-run finds the row the first run made
def deployment(s: Session, now: dt.datetime) -> Deployment:
    """The database's one deployment row, created with a fresh random id if there is none yet (a
    concurrent creator makes this unit fail with a conflict: read it again then)."""
    row = s.get(Deployment, 1)
    if row is None:
        row = Deployment(id=1, deployment_id=secrets.token_hex(16), created_at=now)
        s.add(row)
    return row


@idempotent  # sets the same time again
def mark_store_bound(s: Session, now: dt.datetime) -> None:
    s.execute(update(Deployment).where(Deployment.id == 1).values(store_bound_at=now))


# -- statistics and the blob sweep of the operator (python -m demo.admin images) ------------------------
_UNUSED = "NOT EXISTS (SELECT 1 FROM images WHERE images.sha256 = image_blobs.sha256)"
STATS = Sql(
    "SELECT (SELECT COUNT(pk) FROM images) AS images, (SELECT COALESCE(SUM(bytes), 0) FROM images) AS image_bytes,"
    " (SELECT COUNT(sha256) FROM image_blobs) AS blobs,"
    " (SELECT COALESCE(SUM(bytes), 0) FROM image_blobs) AS blob_bytes,"
    f" (SELECT COUNT(sha256) FROM image_blobs WHERE {_UNUSED}) AS orphan_blobs,"
    f" (SELECT COALESCE(SUM(bytes), 0) FROM image_blobs WHERE {_UNUSED}) AS orphan_bytes,"
    " (SELECT COUNT(sha256) FROM image_variants WHERE state = 'ready') AS thumbnails,"
    " (SELECT COALESCE(SUM(bytes), 0) FROM image_variants WHERE state = 'ready') AS thumbnail_bytes"
)
UNUSED_BLOBS = Sql(f"SELECT sha256, bytes FROM image_blobs WHERE {_UNUSED} ORDER BY sha256")


@sql_unit
def stats(c: SqlCursor) -> Row:
    """Images (uploads) and their bytes, blobs (stored originals: one per content) and theirs, orphan
    blobs (no image uses them: the sweep removes them) and theirs, ready thumbnails and theirs. A blob
    stored before sizes were kept counts 0 bytes."""
    row = c.first(STATS)
    assert row is not None  # a SELECT of aggregates has one row
    return row


@sql_unit
def unused_blob_sizes(c: SqlCursor) -> list[Row]:
    """The sha256 and size (NULL: not kept) of every blob no image uses, as ``unused_blobs`` finds them."""
    return c.all(UNUSED_BLOBS)


# -- objects without their row (Images.collect_orphans) ---------------------------------------------------


@idempotent
def blob_rows(s: Session, hashes: list[str]) -> set[str]:
    """Which of ``hashes`` have a blob row (one listing step's worth: a few thousand at most)."""
    return set(s.scalars(select(ImageBlob.sha256).where(ImageBlob.sha256.in_(hashes)))) if hashes else set()


@idempotent
def variant_keys(s: Session, hashes: list[str]) -> set[tuple[str, int]]:
    """(sha256, width) of every variant row, whatever its state, of the blobs ``hashes``."""
    if not hashes:
        return set()
    rows = s.execute(select(ImageVariant.sha256, ImageVariant.width).where(ImageVariant.sha256.in_(hashes)))
    return {(sha256, width) for sha256, width in rows}


@calls_store
def adopt_variant(s: Session, sha256: str, width: int, now: dt.datetime, measure: Callable[[], int | None]) -> bool:
    """Under the blob row lock: a thumbnail in the store that has no row (its builder lost the database
    after its put) gets a ready one with the size ``measure`` finds, as ``Images._build`` adopts one on
    demand; False, changing nothing, if the blob has no row (its objects are garbage then), the variant
    has a row (a builder holds it), or the object is gone."""
    locked = s.scalar(select(ImageBlob.sha256).where(ImageBlob.sha256 == sha256).with_for_update())
    if locked is None or s.get(ImageVariant, (sha256, width), with_for_update=True) is not None:
        return False
    size = measure()
    if size is None:
        return False
    s.add(ImageVariant(sha256=sha256, width=width, state="ready", claimed_at=now, bytes=size))
    return True
