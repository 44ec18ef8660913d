"""Where image bytes live. Rules see only ``ImageStore``; the backend comes from the ``storage`` setting.

A store holds objects, never hands out paths: blobs named by the SHA-256 of their bytes (identical
images are stored once) and their variants (thumbnails, by width), under the same names in every
backend, so a folder copied into a bucket is the same store:

    blobs/ab/cd/<sha256>           the image as stored
    thumbs/ab/cd/<sha256>-w<width> a thumbnail
    DEPLOYMENT                     the id of the one deployment (database) the store belongs to

Objects appear whole or not at all (a local rename, an S3 PUT) and are never changed: a put of a
name that exists keeps what is there (``If-None-Match: *`` on S3). The store is bound to one
deployment (images.bind_store): a second database pointed at the same store is refused.

Every method blocks (disk or network): call them off the event loop (``Offloader.io``). A store that
cannot be reached raises ``StoreUnavailable`` (a 503 for the client); an object that is not there,
``FileNotFoundError``.
"""

from __future__ import annotations

import abc
import datetime as dt
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from demo.common.errors import Unavailable

if TYPE_CHECKING:
    from demo.conf.settings import Settings

IDENTITY = "DEPLOYMENT"  # at the store's root: the id of the deployment the store belongs to
_TEMP_PREFIX = "up-"  # temp files carry the writer's pid (tmp/up-<pid>-<random>), which sweep_temp reads
STRAY_AGE = 3600  # seconds: a live writer's younger temp files are in use; older ones are clutter


class StoreUnavailable(Unavailable):
    """The store did not answer (down, unreachable, timed out, refused our credentials)."""


class StoreError(Exception):
    """The ``storage`` setting names a store that cannot work (bad URL, no bucket, no credentials)."""


@dataclass(frozen=True)
class ObjectHead:
    """What the store tells of an object without sending its bytes."""

    size: int
    etag: str | None  # as the store sends it (quotes and all); None where the store has none (a folder)


@dataclass(frozen=True)
class ListedObject:
    """One object of a listing: its name (as ``object_name`` spells it) and when it was written, by the
    store's clock (naive UTC, as the database holds times)."""

    name: str
    modified: dt.datetime


def object_name(sha256: str, width: int | None = None) -> str:
    """The name of a blob (``width`` None) or of one of its thumbnails, relative to the store's root."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("not a sha256 hex digest")
    if width is None:
        return f"blobs/{sha256[:2]}/{sha256[2:4]}/{sha256}"
    return f"thumbs/{sha256[:2]}/{sha256[2:4]}/{sha256}-w{int(width)}"


def parse_object_name(name: str) -> tuple[str, int | None] | None:
    """(sha256, width) of a blob's (width None) or a thumbnail's name; None for any other name."""
    folder, _, rest = name.partition("/")
    base = rest.rpartition("/")[2]
    width: int | None = None
    if folder == "thumbs":
        base, _, digits = base.partition("-w")
        if not digits.isascii() or not digits.isdigit():
            return None
        width = int(digits)
    elif folder != "blobs":
        return None
    try:
        return (base, width) if object_name(base, width) == name else None  # the one spelling, nothing else
    except ValueError:  # not a sha256
        return None


def naive_utc(moment: dt.datetime) -> dt.datetime:
    """An aware time as the database and the app's clock hold it: naive UTC."""
    return moment.astimezone(dt.UTC).replace(tzinfo=None) if moment.tzinfo else moment


class ImageStore(abc.ABC):
    """A content-addressed object store with derived variants (thumbnails).

    Uploads in progress and thumbnails being made live in a local temp folder (``temp_file``) until
    ``put`` moves them in; that folder is this host's own, even when the objects are shared.
    """

    # Whether the start-up sweep lists every blob to count those without a row: cheap in a folder;
    # against a shared remote store every start of every host would page through the whole bucket.
    listed_at_start = False
    # Whether put() holds the whole file in memory while it sends it (an S3 PUT is one request with
    # a known length): the rules then count it in the upload memory budget.
    put_in_memory = False
    # Whether the objects are across a network (calls may hang up to a timeout), not on a local disk.
    remote = False

    def __init__(self, temp_root: str) -> None:
        self._temp = Path(temp_root)
        self._temp.mkdir(parents=True, exist_ok=True)

    # -- the deployment ------------------------------------------------------------------------

    @abc.abstractmethod
    def identity(self) -> str | None:
        """The id of the deployment this store belongs to; None while it belongs to none."""

    @abc.abstractmethod
    def claim_identity(self, identity: str) -> str:
        """Write ``identity`` durably unless the store carries one already (atomic: of two claimers,
        one wins); returns the store's identity."""

    @abc.abstractmethod
    def identity_written(self) -> dt.datetime | None:
        """When the store's identity was written (the store's clock, naive UTC); None without one. An
        object written later was written by this deployment: no other database may use the store."""

    # -- objects -------------------------------------------------------------------------------

    @abc.abstractmethod
    def put(self, sha256: str, src: str, *, content_type: str, width: int | None = None) -> None:
        """Move the finished local file ``src`` in as the blob (or its ``width`` variant), durably; an
        object already there is kept as is. ``src`` is gone afterwards, whatever happened."""

    @abc.abstractmethod
    def size(self, sha256: str, width: int | None = None) -> int | None:
        """The object's size in bytes; None if it is not there."""

    def exists(self, sha256: str, width: int | None = None) -> bool:
        return self.size(sha256, width) is not None

    def head(self, sha256: str, width: int | None = None) -> ObjectHead | None:
        """The object's size and ETag (one request, no bytes); None if it is not there."""
        size = self.size(sha256, width)
        return None if size is None else ObjectHead(size, None)

    @abc.abstractmethod
    def read(self, sha256: str, width: int | None = None, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive; None: to the end) of the object, in memory: for small
        objects and single chunks."""

    @abc.abstractmethod
    def chunks(self, sha256: str, width: int | None, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive) in pieces of about ``chunk_size``; each ``next()``
        blocks, so pull them one at a time off the loop."""

    @abc.abstractmethod
    def open(self, sha256: str, width: int | None = None) -> BinaryIO:
        """The object as a readable, seekable file (for Pillow), positioned at 0; the caller closes it.
        A remote object is downloaded into a temp file first."""

    @abc.abstractmethod
    def delete(self, sha256: str, widths: Iterable[int]) -> None:
        """Remove the blob and its variants of these ``widths`` (absent ones are fine)."""

    @abc.abstractmethod
    def delete_variant(self, sha256: str, width: int) -> None:
        """Remove one variant, and not its blob (absent is fine)."""

    # Seconds a redirect_url stays valid; 0 when the store has no such URLs (the app sends the bytes).
    url_ttl = 0.0

    def redirect_url(self, sha256: str, width: int | None = None) -> str | None:
        """A URL, valid ``url_ttl`` seconds, the proxy may fetch the object from (X-Accel-Redirect);
        None when the store has none. May fetch credentials (an instance role): not on the loop."""
        return None

    # -- sweeps --------------------------------------------------------------------------------

    @abc.abstractmethod
    def blobs(self) -> Iterator[str]:
        """The sha256 of every stored blob (a full listing: for the start-up sweep and tools)."""

    @abc.abstractmethod
    def names(self, under: str) -> Iterator[str]:
        """The name of every object under the folder ``under`` (``blobs``, ``thumbs``), as
        ``object_name`` spells them (a full listing: for tools and tests)."""

    @abc.abstractmethod
    def listing(self, after: str | None, limit: int) -> list[ListedObject]:
        """Up to ``limit`` objects (any name, in name order) named after ``after`` (from the first when
        None), with their times: one step of a pass over the whole store that may stop anywhere."""

    def sweep_variants(self, known: set[str]) -> int:
        """Remove variants whose blob is gone and not in ``known``; how many. Only a store whose
        variants can outlive their blob needs it (see LocalImageStore)."""
        return 0

    # -- the local temp folder -----------------------------------------------------------------

    def temp_dir(self) -> str:
        """This host's folder for uploads in progress and thumbnails being made."""
        return str(self._temp)

    def temp_file(self) -> tuple[int, str]:
        """A new temp file in ``temp_dir`` (an open descriptor and its path), named so that
        ``sweep_temp`` leaves it alone while this process lives."""
        return tempfile.mkstemp(dir=self._temp, prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=".tmp")

    def sweep_temp(self) -> int:
        """Remove temp files left by processes that are gone (or older than STRAY_AGE); how many."""
        removed = 0
        for path in self._temp.iterdir():
            pid = _writer_pid(path.name)
            try:
                if pid is not None and _alive(pid) and time.time() - path.stat().st_mtime < STRAY_AGE:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue  # its writer moved it in or removed it meanwhile
            removed += 1
        return removed


def make_store(settings: Settings) -> ImageStore:
    """The store the ``storage`` setting names: empty (or ``local``) for the folder ``media_root``,
    ``s3://bucket/prefix`` for an S3-compatible store. StoreError when the setting cannot work."""
    storage = settings.storage
    if storage in ("", "local"):
        from demo.common.images.local_store import LocalImageStore

        return LocalImageStore(settings.media_root)
    if storage.startswith("s3://"):
        from demo.common.images.s3_store import S3ImageStore

        return S3ImageStore.from_url(
            storage,
            temp_root=os.path.join(settings.media_root, "tmp"),
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            virtual_hosted=settings.s3_virtual_hosted,
            connect_timeout=settings.s3_connect_timeout,
            timeout=settings.s3_timeout,
            presign_ttl=settings.s3_url_ttl,
        )
    raise StoreError(f"storage must be empty (the folder media_root) or s3://bucket/prefix, not {storage!r}")


def _writer_pid(name: str) -> int | None:
    parts = name.split("-")
    return int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
