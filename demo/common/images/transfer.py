"""Copying a media folder (the local store's layout) into another image store, verified: the logic
behind ``python -m demo.admin copy-media``, without a command line.

Every object is checked on both sides: a blob's source bytes must hash to its name (a corrupt one is
reported and left out), and what the destination holds afterwards must be the folder's bytes: by its
ETag where the store's ETag is the MD5 of the bytes (an S3 single PUT: one HEAD, no bytes move), else
read back and hashed, streaming (a folder, where reading is cheap; a multipart or encrypted object).
An object the destination already holds is verified the same way and skipped, so a rerun after a kill
carries on where the last one stopped, downloading nothing (``verify_existing`` reads it back all the
same); the store's conditional put never replaces what is there.

The folder's deployment id is claimed in the destination only by the final run (``final``: the one
after the old servers stopped, so that nothing new can come into the folder), and last, after every
object checked out. Until then the server refuses to start on the new store (it carries no id): a
first run made while the old servers still serve, and still take uploads, cannot be served as it
stands. Before it claims, the final run deletes the destination's blobs and thumbnails that the folder
no longer has (images deleted since the first run), unless the destination is claimed by this
deployment already: then it is live, and its servers may have stored what the folder never had.
A destination that belongs to another deployment is refused before anything is copied.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from demo.common.images.imaging import MIME_TYPES, sniff_format
from demo.common.images.local_store import LocalImageStore
from demo.common.images.storage import IDENTITY, ImageStore, ObjectHead, object_name

CHUNK = 1 << 20  # bytes read, hashed and written at a time: memory stays flat in the file's size
_BLOB = re.compile(r"[0-9a-f]{64}")
_MD5 = re.compile(r"[0-9a-f]{32}")
_THUMB = re.compile(r"(?P<sha256>[0-9a-f]{64})-w(?P<width>[1-9][0-9]{0,5})")


class SourceError(Exception):
    """The folder cannot be copied: missing, not a media folder, or bound to no deployment."""


class DeploymentMismatch(Exception):
    """The destination store belongs to another deployment than the folder."""


@dataclass(frozen=True)
class MediaObject:
    """One file of the folder: a blob (``width`` None) or a thumbnail."""

    sha256: str
    width: int | None
    path: Path
    size: int

    @property
    def name(self) -> str:
        return object_name(self.sha256, self.width)


class Result(enum.Enum):
    COPIED = "copied"
    SKIPPED = "skipped"  # already in the destination, and verified
    CORRUPT = "corrupt"  # the folder's bytes do not hash to the blob's name: not copied
    DIFFERS = "differs"  # the destination holds other bytes under that name: it keeps them
    UNREADABLE = "unreadable"  # the folder's file cannot be read (permissions, a disk error): not copied


@dataclass(frozen=True)
class Outcome:
    obj: MediaObject
    result: Result
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.result in (Result.CORRUPT, Result.DIFFERS, Result.UNREADABLE)


@dataclass
class Summary:
    copied: int = 0
    skipped: int = 0
    corrupt: int = 0
    differs: int = 0
    unreadable: int = 0
    missing: int = 0  # blobs the database's images use that the folder lacks (the final run checks)
    bytes_copied: int = 0
    claimed: str | None = None  # the deployment id the destination carries at the end, once claimed
    final: bool = False  # the run may claim the id (the old servers are stopped)
    deleted: int = 0  # objects of the destination the folder no longer has, deleted by the final run
    live: bool = False  # the final run found the store claimed by this deployment already: nothing deleted
    problems: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.corrupt + self.differs + self.unreadable + self.missing

    def add(self, outcome: Outcome) -> None:
        if outcome.result is Result.COPIED:
            self.copied += 1
            self.bytes_copied += outcome.obj.size
        elif outcome.result is Result.SKIPPED:
            self.skipped += 1
        else:
            if outcome.result is Result.CORRUPT:
                self.corrupt += 1
            elif outcome.result is Result.UNREADABLE:
                self.unreadable += 1
            else:
                self.differs += 1
            self.problems.append(f"{outcome.result.value}: {outcome.obj.name}: {outcome.detail}")

    def line(self) -> str:
        if self.claimed:
            end = f"deployment {self.claimed} claimed"
        elif not self.final and self.failed == 0:
            end = "not claimed: rerun with --final once the servers are stopped"
        else:
            end = "deployment id not claimed"
        unreadable = f", unreadable {self.unreadable}" if self.unreadable else ""
        unreadable += f", missing {self.missing}" if self.missing else ""
        if self.live:
            cleaned = "; nothing deleted: the store was claimed already, it is live"
        else:
            cleaned = f", deleted {self.deleted} not in the folder" if self.claimed else ""
        return (
            f"copied {self.copied}, skipped {self.skipped}, corrupt {self.corrupt}, differing {self.differs}"
            f"{unreadable}, {self.bytes_copied} bytes copied{cleaned}; {end}"
        )


@dataclass(frozen=True)
class Source:
    """A media folder as the local store writes it: ``blobs/``, ``thumbs/`` and ``DEPLOYMENT``."""

    root: Path
    identity: str
    count: int  # files to copy
    size: int  # their bytes

    @classmethod
    def open(cls, folder: str | Path) -> Source:
        """The folder checked, its deployment id read and its files counted (one walk; ``objects``
        walks again, so that a folder of millions of files is never held in memory)."""
        root = Path(folder)
        if not root.is_dir():
            raise SourceError(f"{root}: no such folder")
        if not (root / "blobs").is_dir():
            raise SourceError(f"{root}: not a media folder (it has no blobs/ folder)")
        try:
            identity = (root / IDENTITY).read_text().strip()
        except FileNotFoundError:
            identity = ""
        except OSError as error:
            raise SourceError(f"{root / IDENTITY}: {error.strerror or error}") from None
        if not identity:
            # Without it the destination could be claimed by any database: the server writes it on its
            # first start on the folder (an upgrade adopts the folder), so start it once first.
            raise SourceError(
                f"{root}: carries no deployment id ({IDENTITY}); start the server on it once to bind it to its database"
            )
        count = size = 0
        for obj in _scan(root):
            count += 1
            size += obj.size
        return cls(root, identity, count, size)

    def objects(self) -> Iterator[MediaObject]:
        """Every blob and thumbnail, blobs first (a thumbnail is worth nothing without its blob)."""
        return _scan(self.root)


def _scan(root: Path) -> Iterator[MediaObject]:
    for kind in ("blobs", "thumbs"):
        for path in sorted((root / kind).glob("??/??/*")):
            obj = _media_object(root, path)
            if obj is not None:
                yield obj


def _media_object(root: Path, path: Path) -> MediaObject | None:
    """The object ``path`` holds, or None for a file that is not one (wrong name or folder)."""
    if match := _BLOB.fullmatch(path.name):
        sha256, width = match.group(0), None
    elif match := _THUMB.fullmatch(path.name):
        sha256, width = match.group("sha256"), int(match.group("width"))
    else:
        return None
    if path.relative_to(root).as_posix() != object_name(sha256, width):
        return None  # in another object's folder: not a name the store would ever read
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return MediaObject(sha256, width, path, stat.st_size) if path.is_file() else None


def copy_object(store: ImageStore, obj: MediaObject, *, verify_existing: bool = False) -> Outcome:
    """Copy one object unless the destination holds it, and verify what the destination holds then.
    ``verify_existing`` reads back an object that was there even when its ETag vouches for it.
    Blocks (disk and network); StoreUnavailable when the store stops answering."""
    found = store.head(obj.sha256, obj.width)
    if found is not None:
        try:
            digests = _stage(obj.path, None)
        except FileNotFoundError:
            return Outcome(obj, Result.CORRUPT, f"{obj.path} went away while it was read")
        except _Unreadable as error:
            return Outcome(obj, Result.UNREADABLE, str(error))
        # A source blob that does not hash to its name has no MD5 worth comparing: the store's bytes
        # are then read back and judged by the name alone (a good copy there is all that matters).
        read_back = verify_existing or (obj.width is None and digests.sha256 != obj.sha256)
        verdict = _verify(store, obj, found, digests.md5, read_back=read_back)
        return Outcome(obj, Result.SKIPPED) if verdict is None else Outcome(obj, Result.DIFFERS, verdict)
    fd, temp = store.temp_file()  # put() moves a file in and removes it: the folder's own stays
    try:
        with os.fdopen(fd, "wb") as out:
            digests = _stage(obj.path, out)
        if obj.width is None and digests.sha256 != obj.sha256:
            return Outcome(obj, Result.CORRUPT, f"its bytes in {obj.path} hash to {digests.sha256}")
        content_type = MIME_TYPES.get(sniff_format(digests.head) or "", "application/octet-stream")
        store.put(obj.sha256, temp, content_type=content_type, width=obj.width)
    except FileNotFoundError:
        return Outcome(obj, Result.CORRUPT, f"{obj.path} went away while it was copied")
    except _Unreadable as error:
        return Outcome(obj, Result.UNREADABLE, str(error))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    # A HEAD, not put()'s answer: it tells what the store holds under the name even when another
    # writer's put came first (ours then kept theirs), and its ETag spares reading the bytes back.
    verdict = _verify(store, obj, store.head(obj.sha256, obj.width), digests.md5, read_back=False)
    return Outcome(obj, Result.COPIED) if verdict is None else Outcome(obj, Result.DIFFERS, verdict)


@dataclass(frozen=True)
class _Digests:
    sha256: str
    md5: str  # what a single PUT's ETag is (S3, MinIO, SeaweedFS)
    head: bytes  # the first bytes, to tell the format


def _stage(path: Path, out: IO[bytes] | None) -> _Digests:
    """Read ``path`` (into the open file ``out``, if any) and hash it as it goes, in pieces."""
    sha256, md5, head = hashlib.sha256(), hashlib.md5(usedforsecurity=False), b""
    for block in _blocks(path):
        sha256.update(block)
        md5.update(block)
        head = head or block[:16]
        if out is not None:
            out.write(block)  # an error writing the temp copy is the destination's: it is not caught here
    return _Digests(sha256.hexdigest(), md5.hexdigest(), head)


class _Unreadable(Exception):
    """A file of the folder could not be read (its message says which, and why)."""


def _blocks(path: Path) -> Iterator[bytes]:
    """The file's bytes in pieces; FileNotFoundError when it went away, _Unreadable for any other
    error of the folder's disk (permissions, EIO), so that one bad file is one line, not a traceback."""
    try:
        with open(path, "rb") as src:
            while block := src.read(CHUNK):
                yield block
    except FileNotFoundError:
        raise
    except OSError as error:
        raise _Unreadable(f"{path}: {error.strerror or error}") from error


def _plain_md5(etag: str | None) -> str | None:
    """The MD5 an ETag is, or None when it is none: a folder has no ETag, a multipart upload's ends in
    "-<parts>". (An SSE-KMS or SSE-C ETag looks like one but is not: see _verify.)"""
    value = (etag or "").strip('"').lower()
    return value if _MD5.fullmatch(value) else None


def _verify(store: ImageStore, obj: MediaObject, found: ObjectHead | None, md5: str, *, read_back: bool) -> str | None:
    """None when the destination's object is the folder's one, else what is wrong with it.

    Its size first, then its ETag where it is the MD5 of its bytes (a HEAD: no bytes move). When it is
    not (a folder, a multipart upload), when it does not match (an encrypted object's ETag is no MD5,
    so a mismatch alone proves nothing), or when ``read_back``: the bytes are read back in pieces,
    and a blob must hash to its name, a thumbnail (whose name is not a hash) to the folder's MD5."""
    if found is None:
        return "not in the store after its put"
    if found.size != obj.size:
        return f"the store holds {found.size} bytes under this name, the folder {obj.size}; delete the object and rerun"
    if not read_back and _plain_md5(found.etag) == md5:
        return None
    sha256, stored_md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    try:
        for chunk in store.chunks(obj.sha256, obj.width, 0, found.size, CHUNK):
            sha256.update(chunk)
            stored_md5.update(chunk)
    except FileNotFoundError:
        return "went from the store while it was read back"
    if obj.width is None and sha256.hexdigest() != obj.sha256:
        return f"the store's bytes hash to {sha256.hexdigest()}; delete the object and rerun"
    if obj.width is not None and stored_md5.hexdigest() != md5:
        found_md5 = stored_md5.hexdigest()
        return f"the store's bytes differ from the folder's (MD5 {found_md5}, not {md5}); delete the object and rerun"
    return None


def copy_media(
    source: Source,
    store: ImageStore,
    *,
    jobs: int = 4,
    final: bool = False,
    verify_existing: bool = False,
    done: Callable[[Outcome], None] | None = None,
    missing_blobs: Callable[[Callable[[str], bool]], list[str]] | None = None,
) -> Summary:
    """Copy every object of ``source`` into ``store`` on ``jobs`` threads, then, on the ``final`` run
    and if all of them verified, claim the folder's deployment id in the store. ``done`` is called (on
    this thread) after each object; ``verify_existing`` reads back the objects that were there.
    ``missing_blobs`` (the final run, with the database): given "is this blob in the folder?", the
    blobs the database's images use that are not; any of them stops the claim.
    DeploymentMismatch before anything is copied when the store belongs to another deployment;
    StoreUnavailable (what is copied stays, a rerun continues) when the store stops answering.
    """
    check_destination(source, store)
    summary = Summary(final=final)
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="copy-media")
    pending: set[Future[Outcome]] = set()

    def collect(futures: set[Future[Outcome]]) -> None:
        error: BaseException | None = None
        for future in futures:
            try:
                outcome = future.result()
            except BaseException as raised:  # noqa: BLE001 - re-raised below, once the others are counted
                error = error or raised
                continue
            summary.add(outcome)
            if done is not None:
                done(outcome)
        if error is not None:
            raise error  # a worker's StoreUnavailable: stop here

    try:
        for obj in source.objects():
            if len(pending) >= 2 * jobs:  # a short queue: the listing is never held whole
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                collect(finished)
            pending.add(pool.submit(copy_object, store, obj, verify_existing=verify_existing))
        finished, pending = wait(pending)
        collect(finished)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error: the puts under way finish, no new ones
    if final and summary.failed == 0 and missing_blobs is not None:
        # Every copied blob was verified: one the folder has is in the store. One it lacks would be an
        # image the copy loses for good once the store goes live.
        for sha256 in missing_blobs(lambda sha256: (source.root / object_name(sha256)).is_file()):
            summary.missing += 1
            summary.problems.append(f"missing: {object_name(sha256)}: images in the database use it")
    if final and summary.failed == 0:
        # Images deleted since the first run must not come back with the store. A store claimed by
        # this deployment already is live: its servers may have stored what the folder never had.
        summary.live = store.identity() == source.identity
        if not summary.live:
            summary.deleted = delete_stale(source, store)
        summary.claimed = store.claim_identity(source.identity)
        if summary.claimed != source.identity:  # another claimer came first
            raise DeploymentMismatch(_mismatch(store, summary.claimed, source))
    return summary


def delete_stale(source: Source, store: ImageStore) -> int:
    """Delete the blobs and thumbnails of ``store`` that ``source`` does not have; how many. Names that
    are no object's (and everything outside blobs/ and thumbs/, DEPLOYMENT first) are left alone."""
    stale: list[tuple[str, int | None]] = []  # gathered first: a listing is not changed as it is paged
    for under in ("blobs", "thumbs"):
        for name in store.names(under):
            key = _object_key(name)
            if key is not None and not (source.root / name).is_file():
                stale.append(key)
    for sha256, width in stale:
        if width is None:
            store.delete(sha256, ())
        else:
            store.delete_variant(sha256, width)
    return len(stale)


def _object_key(name: str) -> tuple[str, int | None] | None:
    """(sha256, width) of the object ``name`` is, or None when no object has that name."""
    base = name.rsplit("/", 1)[-1]
    if match := _BLOB.fullmatch(base):
        key: tuple[str, int | None] = (match.group(0), None)
    elif match := _THUMB.fullmatch(base):
        key = (match.group("sha256"), int(match.group("width")))
    else:
        return None
    return key if object_name(*key) == name else None


def check_destination(source: Source, store: ImageStore) -> None:
    """SourceError when ``store`` is the folder itself, DeploymentMismatch when it belongs to another
    deployment, StoreUnavailable when it does not answer: what can be told before copying anything."""
    if isinstance(store, LocalImageStore) and store.root.resolve() == source.root.resolve():
        raise SourceError(f"{source.root} is the destination itself: set storage (or media_root) to another store")
    found = store.identity()
    if found is not None and found != source.identity:
        raise DeploymentMismatch(_mismatch(store, found, source))


def _mismatch(store: ImageStore, found: str, source: Source) -> str:
    return (
        f"the store {store} belongs to deployment {found}, not to the folder's ({source.identity}): "
        "copy into a store (or prefix) of its own"
    )
