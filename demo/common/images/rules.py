"""Scenario 2 rules: store uploads, list, delete, find, thumbnails; keep rows and blobs consistent.

Consistency, with the blob row (``image_blobs``) as the lock for one content hash and the ``images``
rows as the only record of who uses it (no counter that images going another way could leave wrong):
- store: commit the blob row first (the record that this deployment writes that file), then in one
  transaction lock it, make sure the file is in place, insert the image row, commit. A crash before
  that commit leaves a blob row no image uses, which the sweeps collect.
- delete: remove the image row, commit; then, holding the blob row lock, remove the file and the row
  only if no image row points at the blob (``refs`` is only kept up for the previous release). A
  concurrent upload of the same bytes waits for that lock and then puts the file back, so no
  committed row ever points at a missing file. Images that go any other way (a user deleted, by the
  API or by SQL, cascades to its images) leave a blob row nobody uses: the housekeeping and start-up
  sweeps collect it the same way.
- thumbnails: one row per variant (``image_variants``) decides, across every host, who makes it;
  the others wait for it (see ``Images._variant``). A builder whose image was deleted meanwhile
  removes what it put (``queries.finish_variant``), so no thumbnail outlives its blob.
- The sweeps delete only what this deployment provably wrote: the store must carry this database's
  deployment id (``bind_store``), and the blob must have a row here or its object must have been
  written after the store took that id (no other database can use the store since). An older file
  without a row (bytes of another deployment, a store adopted or copied in) is never deleted (a
  folder's start-up sweep counts and logs them).
- Objects without their row: a put whose answer was lost may land after its upload's blob row was
  cleaned up, and a thumbnail's builder may lose the database after its put. Nothing else lists a
  remote store, so housekeeping walks it a step at a time (``collect_orphans``): such an object older
  than orphan_grace goes under the same protocol as an upload's clean-up (its blob row claimed, then
  dropped under the lock unless an image uses it: an upload of the same bytes racing it puts the file
  back under that lock); a thumbnail of a blob that has its row is adopted instead (given a ready
  row, as a request for it would).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeVar

from demo.common.errors import InvalidField, NotFound, QuotaExceeded, Unavailable
from demo.common.i18n import N_
from demo.common.images import imaging, queries
from demo.common.images.storage import IDENTITY, ImageStore, parse_object_name
from demo.common.infra.caches import Cache
from demo.common.infra.clock import Clock, isoformat
from demo.common.infra.db import Conflict, Database
from demo.common.infra.memory import Budget, trims_after

if TYPE_CHECKING:
    from demo.conf.settings import Settings
    from demo.models import Deployment, Image

log = logging.getLogger("demo.images")
T = TypeVar("T")
THUMBNAIL_WIDTHS = (160, 320, 640, 1280)
# How long a request waits for another process's thumbnail build before it answers 503. A build takes
# well under a second; a claim held longer than variant_lease (half of this, so that every waiter gets
# its turn) has a builder that died or hangs on a store that is, or just was, down: a waiter takes it over.
BUILDER_WAIT = 10.0
CHUNK = 256 * 1024  # bytes per piece when a file is streamed: one read off the loop each


@trims_after  # decoding allocates and frees tens of MB: hand those pages back once it is done
def _process_upload(
    src: str | bytes, work_dir: str, rules: ImageRules, read: Callable[[], None]
) -> imaging.ProcessedImage:
    try:
        return imaging.process_upload(src, work_dir, rules.max_pixels, rules.max_animation_pixels)
    finally:
        read()  # decoded (or refused): the upload's body may go now, on this thread


@trims_after
def _make_thumbnail(store: ImageStore, src: IO[bytes], fmt: str, width: int) -> tuple[str, int]:
    """The thumbnail of the open original ``src``, in a new temp file of the store: (path, size)."""
    fd, path = store.temp_file()
    os.close(fd)
    try:
        imaging.make_thumbnail(src, fmt, width, path)
        return path, os.path.getsize(path)
    except BaseException:
        _remove(path)
        raise


@dataclass(frozen=True, kw_only=True)
class ImageRules:
    """The settings the image rules read (defaults and meaning: demo/conf/settings.py)."""

    max_upload_bytes: int
    max_pixels: int
    quota_count: int
    quota_bytes: int
    # Delivery caches: an id is looked up again after lookup_ttl seconds, so another process's delete
    # shows within that time (plus nginx's 30 s micro-cache in front: 60 s in all); small files' bytes
    # stay in memory (they never change: a blob is named by its hash).
    lookup_ttl: float
    memory_cache_bytes: int
    memory_cache_item: int = 512 * 1024  # not a setting: files above it are never kept in memory
    decode_budget: int  # pixels decoding at once in one process
    max_animation_pixels: int  # all frames of one animation, decoded
    upload_memory: int  # upload bodies (see UploadSpool) and S3 puts held in memory at once
    store_units: int  # units of work calling a remote store at once (half the database threads)
    orphan_grace: float  # seconds an object without its row is left alone (a put may still land)
    orphan_batch: int  # objects listed per step of the pass for objects without their row
    # Not a setting: a thumbnail claimed longer ago than this is taken over. Making one takes a second
    # or two even for the largest image allowed; a builder past this died, or waits on a store call
    # (up to s3_timeout) begun while the store was down, which would hold every asker of that thumbnail
    # after the store is back. Taking over one that is only slow makes the thumbnail twice: the
    # conditional put keeps the first bytes, finishing is idempotent, and a failing builder releases
    # only its own claim.
    variant_lease: float = BUILDER_WAIT / 2

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageRules:
        return cls(
            max_upload_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_image_pixels,
            quota_count=settings.image_quota_count,
            quota_bytes=settings.image_quota_bytes,
            lookup_ttl=settings.image_lookup_ttl,
            memory_cache_bytes=settings.image_memory_cache,
            decode_budget=settings.image_decode_budget,
            max_animation_pixels=settings.max_animation_pixels,
            upload_memory=settings.upload_memory,
            store_units=max(1, settings.db_pool_size // 2),
            orphan_grace=settings.orphan_grace,
            orphan_batch=settings.orphan_sweep_batch,
        )


@dataclass(frozen=True)
class StoredImage:
    """What delivery needs to know about an image id."""

    sha256: str
    format: str
    width: int
    bytes: int
    id: str


@dataclass(frozen=True)
class ImageFile:
    """One object to deliver: an image as stored (``width`` None) or one of its thumbnails, with its
    size from the database (delivery never asks the store for it)."""

    sha256: str
    width: int | None
    size: int
    format: str

    @property
    def thumbnail(self) -> bool:
        return self.width is not None

    @property
    def etag(self) -> str:
        return f'"{self.sha256}-w{self.width}"' if self.thumbnail else f'"{self.sha256}"'


class Images:
    def __init__(self, db: Database, store: ImageStore, rules: ImageRules, clock: Clock | None = None) -> None:
        self.db = db
        self.store = store
        self.rules = rules
        self._quota = queries.Quota(rules.quota_count, rules.quota_bytes)
        self.clock = clock or Clock()
        self._found: Cache[str, StoredImage] = Cache.expiring(max_items=100_000, ttl=rules.lookup_ttl)
        # Thumbnail sizes of ready variants (a ready row never changes until its blob goes), per image
        # id too: when another process removes a blob and the same bytes come back as a new image, the
        # new id must not find the old thumbnail's size here and redirect to an object that is gone.
        self._variants: Cache[tuple[str, int, str], int] = Cache.expiring(max_items=100_000, ttl=rules.lookup_ttl)
        self._urls: Cache[tuple[str, int | None], str] = Cache.expiring(
            max_items=100_000, ttl=max(store.url_ttl / 2, 1.0)
        )
        self._bytes: Cache[tuple[str, int | None], bytes] = Cache.sized(
            rules.memory_cache_bytes, rules.memory_cache_item
        )
        self._building: dict[tuple[str, int], asyncio.Future[int]] = {}  # thumbnails asked for here
        # Per process: pixels being decoded at once, and bytes of upload bodies held in memory.
        self.decoding = Budget(rules.decode_budget)
        self._store_units: AbstractAsyncContextManager[Any] = (
            asyncio.Semaphore(rules.store_units) if store.remote else contextlib.nullcontext()
        )
        self.upload_memory = Budget(rules.upload_memory)
        # Where this process's pass over the store for objects without a row goes on (collect_orphans).
        # Kept in memory: a restart only starts the pass over, and each process walking the store on
        # its own costs one listing per process, which the batch bounds; nothing to keep in step.
        self._orphans_after: str | None = None
        self._bound_at: dt.datetime | None = None  # when the store took this deployment's id

    # -- upload --------------------------------------------------------------------------------

    async def check_room(self, user_id: int) -> None:
        """Before reading an upload: refuse at once when the count quota is already used up."""
        usage = await self.db.run(queries.usage, user_id)
        if usage.count >= self.rules.quota_count:
            raise QuotaExceeded()

    async def create(
        self, user_id: int, upload: str | bytes, read: Callable[[], None] = lambda: None
    ) -> dict[str, Any]:
        """Check, re-encode and store an uploaded file (its bytes, or the path of the complete file,
        which stays the caller's to remove); returns the image record. ``read`` is called (on a worker
        thread) as soon as the decode is done with the upload, so its caller can let the body go before
        the image is stored. Bytes uploaded before are not decoded again while their blob exists."""
        offloader = self.db.offloader
        source, cost = await offloader.io(_measure, upload, self.rules)
        known = await self.db.run(queries.known_upload, source, user_id)
        if known is not None:
            image = imaging.ProcessedImage(None, known.sha256, known.format, known.width, known.height, known.bytes)
            try:
                return await self._store(user_id, image, source, self.clock.now())
            except _BlobGone:
                pass  # deleted since it was looked up: decode after all
        processed = await self._process(upload, cost, read)
        try:
            now = self.clock.now()
            # Committed before the file lands: a crash after that leaves a row the sweeps can collect.
            await self.db.run(queries.claim_blob, processed.sha256, now)
            return await self._store(user_id, processed, source, now)
        except BaseException:
            await offloader.io(_remove, processed.path)  # put() removes it, but it may not have run
            await self._drop_claim(processed.sha256)
            raise

    def _delete_objects(self, sha256: str) -> None:
        self.store.delete(sha256, THUMBNAIL_WIDTHS)

    async def _drop_claim(self, sha256: str) -> None:
        """After a failed store or a delete: the blob row (and its objects) go unless an image uses
        them; a failure here is logged, and the housekeeping sweep collects the blob later."""
        try:
            if await self._run_with_store(queries.drop_blob_if_unused, sha256, self._delete_objects):
                self._forget_blob(sha256)
        except Exception:
            log.warning("could not drop the unused blob %s now; the sweeps will", sha256, exc_info=True)

    async def _process(self, src: str | bytes, cost: int, read: Callable[[], None]) -> imaging.ProcessedImage:
        # Decoding holds 3-4 bytes per pixel (an animation: see imaging.measure_upload): the budget
        # keeps concurrent decodes from holding more than decode_budget pixels at once, so memory stays
        # flat however many arrive together.
        async with self.decoding.reserve(cost):
            return await self.db.offloader.cpu(_process_upload, src, self.store.temp_dir(), self.rules, read)

    async def _store(
        self, user_id: int, image: imaging.ProcessedImage, source: str, now: dt.datetime
    ) -> dict[str, Any]:
        """Store ``image``: a new file (``path``), or a blob already stored (no ``path``: _BlobGone if it
        is not there any more, checked under its row lock as put() does)."""
        new = queries.NewImage(
            user_id,
            image.sha256,
            image.format,
            image.width,
            image.height,
            image.bytes,
            source,
            decoded=image.path is not None,
        )

        placed = False

        def place() -> None:  # under the blob row lock: see the module docstring
            nonlocal placed
            if image.path is not None and not placed:
                self.store.put(image.sha256, image.path, content_type=imaging.MIME_TYPES[image.format])
                # put() took the file: a re-run of the unit (a deadlock after this) checks the object.
                placed = True
            elif not self.store.exists(image.sha256):
                if placed:  # removed between the two runs by a sweep of the then unused blob: the
                    raise Unavailable()  # file is gone with it; the client sends the upload again
                raise _BlobGone()  # rolls back the reference just added

        async with self._putting(image.bytes if image.path is not None else 0):
            values = await self._run_with_store(queries.store_image, new, self._quota, now, place)
        return {**values, "created_at": isoformat(now)}

    async def _run_with_store(self, unit: Callable[..., T], *args: Any) -> T:
        """A unit of work that calls the store while it holds a blob row lock. A remote store that
        hangs holds that database thread (and the lock) up to s3_timeout: at most half the database
        threads may wait on it at once, so the rest keep serving logins and pages meanwhile."""
        async with self._store_units:
            return await self.db.run(unit, *args)

    def _putting(self, size: int) -> AbstractAsyncContextManager[None]:
        """Room in the upload memory budget for a put of ``size`` bytes, where the store holds a put's
        bytes in memory: concurrent S3 puts cannot add up past the budget."""
        if not (size and self.store.put_in_memory):
            return contextlib.nullcontext()  # never queued: a request may still hold its body's share
        return self.upload_memory.reserve(size)

    # -- reading -------------------------------------------------------------------------------

    async def list(self, user_id: int, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """Own images, newest first; ``cursor`` continues where the last page ended."""
        before = decode_cursor(cursor) if cursor else None
        rows = await self.db.run(queries.page, user_id, limit + 1, before)
        more = len(rows) > limit
        rows = rows[:limit]
        return [record(r) for r in rows], (encode_cursor(rows[-1].pk) if more else None)

    async def find(self, image_id: str) -> StoredImage:
        if not looks_like_image_id(image_id):
            raise NotFound()
        found = self._found.get(image_id)
        if found is None:
            row = await self.db.run(queries.find, image_id)
            if row is None:
                raise NotFound()
            found = StoredImage(row.sha256, row.format, row.width, int(row.bytes), image_id)
            self._found.put(image_id, found)
        return found

    async def file_for(self, image: StoredImage, width: int | None) -> ImageFile:
        """The object to serve: the image as stored, or its thumbnail (made once across all hosts,
        never upscaled). NotFound if the store lost the image; StoreUnavailable if it is down."""
        if width is None or width >= image.width:
            return ImageFile(image.sha256, None, image.bytes, image.format)
        if width not in THUMBNAIL_WIDTHS:
            raise InvalidField(
                N_("w must be one of {widths}."), field="w", params={"widths": ", ".join(map(str, THUMBNAIL_WIDTHS))}
            )
        key = (image.sha256, width)
        size = self._variants.get((*key, image.id))
        if size is None:
            # One claim per variant in this process: concurrent requests wait for it (across
            # processes and hosts, the variant's row does the same).
            building = self._building.get(key)
            if building is None:
                building = self._building[key] = asyncio.ensure_future(self._variant(image, width))
                building.add_done_callback(lambda _: self._building.pop(key, None))
            size = await asyncio.shield(building)  # a client going away does not cancel the others' build
            self._variants.put((*key, image.id), size)
        return ImageFile(image.sha256, width, size, image.format)

    async def _variant(self, image: StoredImage, width: int) -> int:
        """The size of the ``width`` thumbnail: made here if this process wins its row's claim, else
        waited for (polling with a backoff) until it is ready or its builder's lease runs out (Unavailable
        after BUILDER_WAIT: the client retries)."""
        pause, give_up_at = 0.02, time.monotonic() + BUILDER_WAIT
        while True:
            now = self.clock.now()
            stale_before = now - dt.timedelta(seconds=self.rules.variant_lease)
            try:
                claim = await self.db.run(queries.claim_variant, image.sha256, width, now, stale_before)
            except Conflict:  # another host claimed it at the same moment (or the blob just went)
                continue
            if claim.state == "ready":
                assert claim.bytes is not None
                return claim.bytes
            if claim.state == "gone":
                raise NotFound()  # deleted since it was looked up
            if claim.state == "mine":
                assert claim.claimed_at is not None
                size = await self._build(image, width, claim.claimed_at)
                if size is not None:
                    return size
                continue  # what was made was lost to a delete meanwhile: claim and make it again
            if time.monotonic() > give_up_at:
                raise Unavailable()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def _build(self, image: StoredImage, width: int, claimed_at: dt.datetime) -> int | None:
        """Make the thumbnail this process claimed, put it in the store and mark its row ready (or
        adopt one already there: a folder from before variants had rows, or a builder that died
        between its put and its row); on failure, give the claim up for the next asker."""
        offloader, sha256 = self.db.offloader, image.sha256
        try:
            size = await offloader.io(self.store.size, sha256, width)
            if size is None:
                await self._make(image, width)
                # Asked again, not taken from the file made: a conditional put keeps the bytes
                # that were there first (another builder's, or another release's encoder).
                size = await offloader.io(self.store.size, sha256, width)
                if size is None:
                    raise NotFound()  # deleted (with its image) as soon as it was put

            def remove() -> None:  # only the thumbnail: the same bytes uploaded again may be landing
                self.store.delete_variant(sha256, width)

            def present() -> bool:
                return self.store.exists(sha256, width)

            now = self.clock.now()
            finished = await self._run_with_store(queries.finish_variant, sha256, width, size, now, remove, present)
            if finished == "gone":
                raise NotFound()  # its image was deleted meanwhile: what was put is gone again
            return size if finished == "ready" else None
        except BaseException:
            with contextlib.suppress(Exception):  # the database may be what failed: the lease then ends it
                await self.db.run(queries.release_variant, sha256, width, claimed_at)
            raise

    async def _make(self, image: StoredImage, width: int) -> None:
        """Make the thumbnail (within the decode budget) from the original and put it in the store."""
        offloader = self.db.offloader
        try:
            src = await offloader.io(self.store.open, image.sha256)
        except FileNotFoundError:
            await self._require_whole_store(image.sha256, None)
            raise _missing(image.sha256) from None
        try:
            cost = await offloader.io(imaging.thumbnail_cost, src, image.format, width)
            async with self.decoding.reserve(cost):
                path, _ = await offloader.cpu(_make_thumbnail, self.store, src, image.format, width)
        finally:
            await offloader.io(src.close)  # a remote original's temp copy goes with it
        # put() removes the temp file whatever happens
        size = await offloader.io(os.path.getsize, path) if self.store.put_in_memory else 0
        async with self._putting(size):
            await offloader.io(
                self.store.put, image.sha256, path, content_type=imaging.MIME_TYPES[image.format], width=width
            )

    async def contents(self, file: ImageFile) -> bytes | None:
        """The whole file, from memory after the first read (it never changes: a blob is named by its
        hash), when it is at most ``memory_cache_item`` bytes; None for a larger one (stream it)."""
        if file.size > self.rules.memory_cache_item:
            return None
        key = (file.sha256, file.width)
        data = self._bytes.get(key)
        if data is None:
            try:
                data = await self.db.offloader.io(self.store.read, file.sha256, file.width)
            except FileNotFoundError:
                raise await self._lost(file) from None
            self._bytes.put(key, data)
        return data

    async def chunks(self, file: ImageFile, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes ``start`` to ``end`` (exclusive) of the file in pieces of about CHUNK, each read off
        the loop. NotFound or StoreUnavailable may come at any piece (before the first: nothing sent)."""
        io = self.db.offloader.io
        pieces = await io(self.store.chunks, file.sha256, file.width, start, end, CHUNK)
        try:
            while True:
                try:
                    piece = await io(next, pieces, None)
                except FileNotFoundError:
                    raise await self._lost(file) from None
                if piece is None:
                    return
                yield piece
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                await io(close)  # a generator's file or stream, on the thread that may block

    async def redirect_url(self, file: ImageFile) -> str | None:
        """Where the proxy may fetch the file itself (a presigned URL), or None (a local folder). A
        URL is reused for half its life: nginx fetches at once, and most requests then cost no
        signature and no thread hop."""
        if not self.store.url_ttl:
            return None
        key = (file.sha256, file.width)
        url = self._urls.get(key)
        if url is None:
            url = await self.db.offloader.io(self.store.redirect_url, file.sha256, file.width)
            if url is None:
                return None
            self._urls.put(key, url)
        return url

    async def _require_whole_store(self, sha256: str, width: int | None) -> None:
        """Unavailable unless the store is whole: it shows its deployment's identity, and its listing
        agrees that the object it could not read is not there. A store that is starting (SeaweedFS
        before its volumes are back) answers "no such object" for objects it holds: that is a 503 to
        retry, not a 404 that tells the app the image is gone, nor a thumbnail row dropped."""
        io = self.db.offloader.io
        try:
            identity, size = await io(self.store.identity), await io(self.store.size, sha256, width)
        except Exception:  # noqa: BLE001 - any failure to ask: the store is not whole right now
            log.warning("the image store could not be asked about a missing object: answered 503")
            raise Unavailable() from None
        if size is not None:  # listed, yet not read: not whole
            log.warning("the image store lists %s but could not read it: answered 503", sha256)
            raise Unavailable()
        if identity is not None:
            return
        deployment = await self.db.run(queries.deployment, self.clock.now())
        if deployment.store_bound_at is not None:  # bound, yet its identity is not found: not whole
            log.warning("the image store does not show its identity: a missing object is answered 503")
            raise Unavailable()

    async def _lost(self, file: ImageFile) -> NotFound:
        """A row points at an object the store has lost (and the store is whole: see
        _require_whole_store). A thumbnail's row goes, so that the next request makes it again; an
        original is an operator's problem."""
        await self._require_whole_store(file.sha256, file.width)
        if file.width is not None:
            self._variants.pop_where(lambda key: key[:2] == (file.sha256, file.width))
            with contextlib.suppress(Exception):
                await self.db.run(queries.forget_variant, file.sha256, file.width)
        return _missing(file.sha256 if file.width is None else f"{file.sha256} (w{file.width})")

    # -- deleting ------------------------------------------------------------------------------

    async def delete(self, user_id: int, image_id: str) -> None:
        """Delete an own image (NotFound for anyone else's); the blob goes with its last image."""
        if not looks_like_image_id(image_id):
            raise NotFound()
        sha256 = await self.db.run(queries.unlink_image, user_id, image_id)
        if sha256 is None:
            raise NotFound()
        self._found.pop(image_id)  # gone at once here; other processes notice within lookup_ttl
        await self._drop_claim(sha256)  # the image is deleted: a store that is down now leaves the blob to the sweeps

    def _forget_blob(self, sha256: str) -> None:
        """Drop this process's cached bytes and thumbnail sizes of a removed blob."""
        self._bytes.pop_where(lambda key: key[0] == sha256)
        self._urls.pop_where(lambda key: key[0] == sha256)
        self._variants.pop_where(lambda key: key[0] == sha256)

    # -- sweeps --------------------------------------------------------------------------------

    def bind(self) -> str:
        """Bind the store to this database, or check that it is (StoreMismatch otherwise)."""
        return bind_store(self.db, self.store, self.clock.now())

    def collect_unused(self) -> int:
        """Remove every blob (file, thumbnails, row) of this deployment that no image uses; how many.

        Safe while other processes serve: each candidate is checked again under its blob row lock,
        the lock an upload of the same bytes holds from before its file lands until it commits.
        """
        self.bind()  # never delete from a store that belongs to another database
        unused = self.db.run_sync(queries.unused_blobs)
        dropped = [sha for sha in unused if self.db.run_sync(queries.drop_blob_if_unused, sha, self._delete_objects)]
        for sha256 in dropped:
            self._forget_blob(sha256)
        return len(dropped)

    def collect_orphans(self) -> dict[str, int]:
        """One step of this process's pass over the store (housekeeping: see the module docstring): list
        the next ``orphan_batch`` objects; remove those without a row that are older than orphan_grace
        and were written since the store took this deployment's id; give a thumbnail of a blob that has
        its row, but no row of its own, its ready row. How many objects went and were adopted.

        Safe while other processes serve: every removal happens under the blob row lock, after the
        check that no image uses the blob, as for ``collect_unused``.
        """
        self.bind()  # never delete from a store that belongs to another database
        if self._bound_at is None:
            self._bound_at = self.store.identity_written()
        listed = self.store.listing(self._orphans_after, self.rules.orphan_batch)
        # At the end of the store (a short step), the next step starts the pass over.
        self._orphans_after = listed[-1].name if len(listed) >= self.rules.orphan_batch else None
        now = self.clock.now()
        old_before = now - dt.timedelta(seconds=self.rules.orphan_grace)
        bound_at = self._bound_at or now  # (never None once bound: the identity was just read)
        found: dict[str, list[int | None]] = {}  # old enough, and provably this deployment's
        for item in listed:
            parsed = parse_object_name(item.name)
            if parsed is not None and bound_at <= item.modified <= old_before:
                found.setdefault(parsed[0], []).append(parsed[1])
        with_row = self.db.run_sync(queries.blob_rows, sorted(found))
        removed = adopted = 0
        for sha256 in sorted(found.keys() - with_row):
            # Widths another release made (not THUMBNAIL_WIDTHS) go too, under the same lock.
            widths = {w for w in found[sha256] if w is not None} | set(THUMBNAIL_WIDTHS)

            def remove(sha256: str, widths: set[int] = widths) -> None:
                self.store.delete(sha256, sorted(widths))

            self.db.run_sync(queries.claim_blob, sha256, now)  # an upload of these bytes now waits on it
            if self.db.run_sync(queries.drop_blob_if_unused, sha256, remove):
                removed += len(found[sha256])
                self._forget_blob(sha256)
        thumbs = [(sha256, w) for sha256 in sorted(with_row) for w in found[sha256] if w in THUMBNAIL_WIDTHS]
        rowed = self.db.run_sync(queries.variant_keys, sorted({sha256 for sha256, _ in thumbs}))
        for sha256, width in thumbs:
            if (sha256, width) not in rowed:

                def measure(sha256: str = sha256, width: int = width) -> int | None:
                    return self.store.size(sha256, width)

                adopted += self.db.run_sync(queries.adopt_variant, sha256, width, now, measure)
        if removed or adopted:
            log.info("objects without their row in %s: %d removed, %d thumbnails adopted", self.store, removed, adopted)
        return {"orphan_objects": removed, "adopted_thumbnails": adopted}

    def sweep(self) -> dict[str, int]:
        """At start-up: remove stray temp files, unused blobs and (in a folder) orphan thumbnails;
        count (and keep) the files this deployment has no row for. A remote store is not listed
        (see ImageStore.listed_at_start): its unclaimed and orphan counts are 0."""
        unused = self.collect_unused()  # binds first: nothing is removed from another deployment's store
        temp = self.store.sweep_temp()
        if not self.store.listed_at_start:
            return {"temp_files": temp, "unused_blobs": unused, "unclaimed_files": 0, "orphan_thumbnails": 0}
        known = self.db.run_sync(queries.blob_hashes)
        unclaimed = sum(1 for sha256 in self.store.blobs() if sha256 not in known)
        if unclaimed:
            log.warning(
                "%d files in the media store %s have no blob row in this database: kept, as this "
                "deployment cannot prove it wrote them",
                unclaimed,
                self.store,
            )
        return {
            "temp_files": temp,
            "unused_blobs": unused,
            "unclaimed_files": unclaimed,
            "orphan_thumbnails": self.store.sweep_variants(known),
        }


class StoreMismatch(Exception):
    """The media store and the database belong to different deployments."""


def bind_store(db: Database, store: ImageStore, now: dt.datetime) -> str:
    """The deployment id shared by the database and the store; written on first use, checked after.

    The database's id is created first (one row), then claimed by an unbound store, then the row is
    marked bound. An existing store without an id and a database without one (an upgrade) are
    adopted as they are. A crash between the steps is finished on the next start; a store bound to
    another database, or a bound database with a store that carries no id, raise StoreMismatch.
    """
    row = _deployment(db, now)
    found = store.identity()
    if found is None and row.store_bound_at is None:
        found = store.claim_identity(row.deployment_id)
    if found is None:
        raise StoreMismatch(
            f"the media store {store} carries no deployment id, but this database's images are in the store "
            f"of deployment {row.deployment_id}: point media_root at that store (if its files were moved "
            f"here, copy its {IDENTITY} file too)"
        )
    if found != row.deployment_id:
        raise StoreMismatch(
            f"the media store {store} belongs to deployment {found}, not to this database's "
            f"({row.deployment_id}): give each database a media_root of its own, or point database_url "
            f"at the database of that store"
        )
    if row.store_bound_at is None:
        db.run_sync(queries.mark_store_bound, now)
    return row.deployment_id


def _deployment(db: Database, now: dt.datetime) -> Deployment:
    """The database's one deployment row, created with a fresh random id if there is none yet."""
    try:
        return db.run_sync(queries.deployment, now)
    except Conflict:  # another process created it at the same moment: use theirs
        return db.run_sync(queries.deployment, now)


def record(row: Image) -> dict[str, Any]:
    return {
        "id": row.id,
        "width": row.width,
        "height": row.height,
        "format": row.format,
        "bytes": row.bytes,
        "sha256": row.sha256,
        "created_at": isoformat(row.created_at),
    }


_IMAGE_ID = re.compile(r"[A-Za-z0-9_-]{16,32}")


def looks_like_image_id(value: str) -> bool:
    return _IMAGE_ID.fullmatch(value) is not None


_CURSOR = re.compile(r"[A-Za-z0-9_-]{4,40}")
_PK = re.compile(r"[1-9][0-9]{0,18}")


def encode_cursor(pk: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{pk}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The pk of a cursor exactly as ``encode_cursor`` spells it; anything else is refused (base64
    decoding alone skips characters outside its alphabet)."""
    if _CURSOR.fullmatch(cursor) and len(cursor) % 4 != 1:  # 4n+1 characters cannot be base64
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii", "replace")
        version, _, pk = raw.partition(":")
        if version == "v1" and _PK.fullmatch(pk) and encode_cursor(int(pk)) == cursor:
            return int(pk)
    raise InvalidField(N_("cursor is not one this server gave out."), field="cursor")


def _missing(what: str) -> NotFound:
    """A row points at an object the store has lost: the client gets a 404; the operator, an error."""
    log.error("image object missing from the store: %s", what)
    return NotFound()


def _measure(src: str | bytes, rules: ImageRules) -> tuple[str, int]:
    """The upload's hash, and the decode budget it needs (InvalidImage if over a limit: refused before
    waiting for the budget)."""
    source = hashlib.sha256(src).hexdigest() if isinstance(src, bytes) else imaging.file_sha256(src)
    return source, imaging.measure_upload(src, rules.max_pixels, rules.max_animation_pixels)


class _BlobGone(Exception):
    """A known upload's blob was deleted since it was looked up."""


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
