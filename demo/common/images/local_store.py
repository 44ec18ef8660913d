"""The embedded default: objects as files under one folder (``media_root``), on one host.

Every write goes to a temp file in ``root/tmp`` (same filesystem), is fsynced, then renamed into
place (a reader never sees half a file), and the folder is fsynced (the rename survives a crash).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from demo.common.images.storage import IDENTITY, STRAY_AGE, ImageStore, ListedObject, object_name


class LocalImageStore(ImageStore):
    listed_at_start = True

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        super().__init__(str(self.root / "tmp"))
        for sub in ("blobs", "thumbs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.root)

    def _path(self, sha256: str, width: int | None = None) -> Path:
        return self.root / object_name(sha256, width)

    # -- the deployment ------------------------------------------------------------------------

    def identity(self) -> str | None:
        try:
            return (self.root / IDENTITY).read_text().strip() or None
        except FileNotFoundError:
            return None

    def claim_identity(self, identity: str) -> str:
        fd, temp = self.temp_file()
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o644)  # not a secret: backups and operators may read it
                f.write(f"{identity}\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temp, self.root / IDENTITY)  # unlike a rename, never replaces one that is there
                _fsync(self.root, os.O_RDONLY)
            except FileExistsError:
                pass
        finally:
            os.unlink(temp)
        return self.identity() or ""

    def identity_written(self) -> dt.datetime | None:
        try:
            return _modified((self.root / IDENTITY).stat().st_mtime)
        except FileNotFoundError:
            return None

    # -- objects -------------------------------------------------------------------------------

    def put(self, sha256: str, src: str, *, content_type: str, width: int | None = None) -> None:
        dst = self._path(sha256, width)
        try:
            if dst.exists():
                return
            _fsync(src, os.O_RDWR)  # the bytes are on disk before the name points at them
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            _fsync(dst.parent, os.O_RDONLY)  # the rename itself must survive a crash
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(src)

    def size(self, sha256: str, width: int | None = None) -> int | None:
        try:
            return self._path(sha256, width).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, sha256: str, width: int | None = None, start: int = 0, end: int | None = None) -> bytes:
        with open(self._path(sha256, width), "rb") as f:
            f.seek(start)
            return f.read() if end is None else f.read(max(0, end - start))

    def chunks(self, sha256: str, width: int | None, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        with open(self._path(sha256, width), "rb") as f:
            offset = start
            while offset < end:
                chunk = os.pread(f.fileno(), min(chunk_size, end - offset), offset)
                if not chunk:
                    return
                offset += len(chunk)
                yield chunk

    def open(self, sha256: str, width: int | None = None) -> BinaryIO:
        return open(self._path(sha256, width), "rb")

    def delete(self, sha256: str, widths: Iterable[int]) -> None:
        for path in [self._path(sha256), *(self._path(sha256, w) for w in widths)]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def delete_variant(self, sha256: str, width: int) -> None:
        self._path(sha256, width).unlink(missing_ok=True)

    # -- sweeps --------------------------------------------------------------------------------

    def blobs(self) -> Iterator[str]:
        for path in (self.root / "blobs").glob("??/??/*"):
            if len(path.name) == 64:
                yield path.name

    def names(self, under: str) -> Iterator[str]:
        folder = self.root / under
        for path in folder.rglob("*"):
            if path.is_file():
                yield path.relative_to(self.root).as_posix()

    def listing(self, after: str | None, limit: int) -> list[ListedObject]:
        found: list[ListedObject] = []
        for name in self._names_after(after):
            try:
                found.append(ListedObject(name, _modified((self.root / name).stat().st_mtime)))
            except FileNotFoundError:
                continue  # removed since it was listed
            if len(found) >= limit:
                break
        return found

    def _names_after(self, after: str | None) -> Iterator[str]:
        """The objects' names after ``after``, in name order, walking the folders in order and skipping
        every folder whose names all come before ``after`` (a step never rereads what passed)."""

        def walk(folder: Path, prefix: str, depth: int) -> Iterator[str]:
            try:
                entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
            except FileNotFoundError:
                return
            for entry in entries:
                name = prefix + entry.name
                if depth < 3 and entry.is_dir(follow_symlinks=False):
                    inside = name + "/"
                    if after is None or after < inside or after.startswith(inside):
                        yield from walk(Path(entry.path), inside, depth + 1)
                elif depth == 3 and entry.is_file(follow_symlinks=False) and (after is None or name > after):
                    yield name

        for top in ("blobs", "thumbs"):  # in name order: what put() writes, nothing of tmp/ or locks/
            inside = top + "/"
            if after is None or after < inside or after.startswith(inside):
                yield from walk(self.root / top, inside, 1)

    def sweep_temp(self) -> int:
        removed = super().sweep_temp()
        locks = self.root / "locks"  # thumbnail lock files of releases before variants had rows
        if locks.is_dir():
            for path in locks.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - path.stat().st_mtime > STRAY_AGE:
                        path.unlink()
        return removed

    def sweep_variants(self, known: set[str]) -> int:
        """Thumbnails whose blob file is gone and has no row (made by a release before variants had
        rows of their own, or left by a crash between the file and the row); a variant of a known blob
        whose file is missing stays."""
        removed = 0
        for path in (self.root / "thumbs").glob("??/??/*-w*"):
            sha256 = path.name.split("-w")[0]
            if len(sha256) == 64 and sha256 not in known and not self.exists(sha256):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _modified(mtime: float) -> dt.datetime:
    """A file's modification time as the database holds times (naive UTC)."""
    return dt.datetime.fromtimestamp(mtime, dt.UTC).replace(tzinfo=None)


def _fsync(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
