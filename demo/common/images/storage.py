"""Where image bytes live. Handlers and rules see only ``ImageStore``; the backend comes from config.

Blobs are addressed by the SHA-256 of their bytes, so identical images are stored once. Every write
goes to a temp file, is fsynced, then renamed into place: a reader never sees half a file.

A store carries the id of the one deployment (database) it belongs to, written once and never
changed (see images.bind_store): a second database pointed at the same folder is refused.
"""

from __future__ import annotations

import abc
import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from demo.common.infra.locks import file_lock

_TEMP_PREFIX = "up-"  # temp files carry the writer's pid (tmp/up-<pid>-<random>), which sweep_temp reads
IDENTITY_FILE = "DEPLOYMENT"  # at the store's root: the id of the deployment the store belongs to
STRAY_AGE = 3600  # seconds: a live writer's younger temp files are in use; older lock files are clutter


class ImageStore(abc.ABC):
    """A content-addressed blob store with derived variants (thumbnails)."""

    @abc.abstractmethod
    def identity(self) -> str | None:
        """The id of the deployment this store belongs to; None while it belongs to none."""

    @abc.abstractmethod
    def claim_identity(self, identity: str) -> str:
        """Write ``identity`` durably unless the store carries one already (atomic: of two claimers,
        one wins); returns the store's identity."""

    @abc.abstractmethod
    def temp_dir(self) -> str:
        """A local folder for uploads in progress (same filesystem as the blobs, so renames are atomic)."""

    @abc.abstractmethod
    def temp_file(self) -> tuple[int, str]:
        """A new temp file in ``temp_dir`` (an open descriptor and its path), named so that
        ``sweep_temp`` leaves it alone while this process lives."""

    @abc.abstractmethod
    def put(self, sha256: str, src: str) -> None:
        """Move the finished file ``src`` into place as blob ``sha256``, durably (kept as is if already
        there). ``src`` need not be fsynced yet: that is done here, only when it is kept."""

    @abc.abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove the blob and all of its variants (absent is fine)."""

    @abc.abstractmethod
    def local_path(self, sha256: str, width: int | None = None) -> str:
        """A filesystem path, for Pillow and for the proxy's X-Accel-Redirect."""

    @abc.abstractmethod
    def make_variant(self, sha256: str, width: int, build: Callable[[str, str], None]) -> str:
        """Path of the ``width`` variant, calling ``build(src, dst)`` once if it does not exist yet."""

    @abc.abstractmethod
    def blobs(self) -> Iterator[str]:
        """The sha256 of every stored blob, for the start-up sweep."""

    @abc.abstractmethod
    def sweep_temp(self) -> int:
        """Remove temp files left by processes that are gone; returns how many."""

    @abc.abstractmethod
    def sweep_variants(self, known: set[str]) -> int:
        """Remove variants whose blob file is gone and not in ``known`` (a thumbnail finished after its
        image was deleted); a variant of a known blob whose file is missing stays."""


class LocalImageStore(ImageStore):
    """Blobs under ``root/blobs/ab/cd/<sha256>``, variants under ``root/thumbs/ab/cd/<sha256>-w<width>``."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        for sub in ("blobs", "thumbs", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.root)

    def identity(self) -> str | None:
        try:
            return (self.root / IDENTITY_FILE).read_text().strip() or None
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
                os.link(temp, self.root / IDENTITY_FILE)  # unlike a rename, never replaces one that is there
                _fsync(self.root, os.O_RDONLY)
            except FileExistsError:
                pass
        finally:
            os.unlink(temp)
        return self.identity() or ""

    def temp_dir(self) -> str:
        return str(self.root / "tmp")

    def temp_file(self) -> tuple[int, str]:
        return tempfile.mkstemp(dir=self.temp_dir(), prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=".tmp")

    def local_path(self, sha256: str, width: int | None = None) -> str:
        _check_sha(sha256)
        if width is None:
            return str(self.root / "blobs" / sha256[:2] / sha256[2:4] / sha256)
        return str(self.root / "thumbs" / sha256[:2] / sha256[2:4] / f"{sha256}-w{int(width)}")

    def put(self, sha256: str, src: str) -> None:
        dst = Path(self.local_path(sha256))
        if dst.exists():
            os.unlink(src)
            return
        _fsync(src, os.O_RDWR)  # the bytes are on disk before the name points at them
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        _fsync(dst.parent, os.O_RDONLY)  # the rename itself must survive a crash

    def exists(self, sha256: str) -> bool:
        return os.path.exists(self.local_path(sha256))

    def delete(self, sha256: str) -> None:
        paths = [Path(self.local_path(sha256))]
        thumbs = Path(self.local_path(sha256, 1)).parent
        if thumbs.exists():
            paths += list(thumbs.glob(f"{sha256}-w*"))
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def make_variant(self, sha256: str, width: int, build: Callable[[str, str], None]) -> str:
        dst = Path(self.local_path(sha256, width))
        if dst.exists():
            return str(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        # One builder at a time per variant, across threads and processes; the rest wait, then reuse.
        with file_lock(self.root / "locks" / f"{sha256}-w{int(width)}.lock"):
            if not dst.exists():
                build(self.local_path(sha256), str(dst))
        return str(dst)

    def blobs(self) -> Iterator[str]:
        for path in (self.root / "blobs").glob("??/??/*"):
            if len(path.name) == 64:
                yield path.name

    def sweep_temp(self) -> int:
        removed = 0
        for path in (self.root / "tmp").iterdir():
            pid = _writer_pid(path.name)
            if pid is not None and _alive(pid) and time.time() - path.stat().st_mtime < STRAY_AGE:
                continue
            path.unlink(missing_ok=True)
            removed += 1
        for path in (self.root / "locks").iterdir():  # lock files are reusable; old ones are clutter
            if time.time() - path.stat().st_mtime > STRAY_AGE:
                path.unlink(missing_ok=True)
        return removed

    def sweep_variants(self, known: set[str]) -> int:
        removed = 0
        for path in (self.root / "thumbs").glob("??/??/*-w*"):
            sha256 = path.name.split("-w")[0]
            if len(sha256) == 64 and sha256 not in known and not self.exists(sha256):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def make_store(spec: str) -> ImageStore:
    """``media_root`` is a folder today; a ``s3://`` (or similar) scheme would pick another backend here."""
    return LocalImageStore(spec)


def _fsync(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_sha(sha256: str) -> None:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("not a sha256 hex digest")


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
