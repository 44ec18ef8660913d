"""A user's copy of their data (GET /users/me/export, python -m demo.admin users export): a zip of every
original image (``images/<id>.<ext>``) and ``profile.json`` (the account, its live sessions as
GET /users/me/sessions lists them, and each image's metadata), written last so that it can say which
image the store had lost.

The zip is built as it is sent, in bounded memory whatever the images weigh: ``zipfile`` writes into
a pipe that is emptied every ``CHUNK`` bytes, each image is read from the store (a folder or S3) in
pieces of ``CHUNK``, and the pieces are pulled one at a time off the loop (``Exports.stream``), each
only once the previous one went out. The zip is unseekable while written, so each entry's CRC and
sizes follow its data (a data descriptor); images are stored as they are (already compressed),
profile.json deflated.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import zipfile
from collections.abc import AsyncGenerator, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from demo.common.accounts import queries
from demo.common.accounts.principal import Principal
from demo.common.errors import Unauthorized
from demo.common.images.imaging import EXTENSIONS
from demo.common.images.storage import ImageStore
from demo.common.infra.clock import Clock, isoformat
from demo.common.infra.db import Database, Row
from demo.common.infra.ratelimit import Window

# Exports per user per hour through the API: each one reads every image the user has from the store,
# so a client looping on it would load the store (and the uplink) for nothing. The operator's is not limited.
EXPORTS_PER_HOUR = 3
CHUNK = 256 * 1024  # bytes read from the store, and sent, at a time


@dataclass(frozen=True)
class Export:
    """One export to write: what it holds, read at ``at``."""

    data: queries.ExportData
    at: dt.datetime
    current_session: int | None = None  # the session asking (its entry is ``current``), None: the operator

    @property
    def filename(self) -> str:
        return f"demo-export-{self.at:%Y%m%d-%H%M%S}.zip"


def export_limit(user_id: int) -> Window:
    return Window(f"export:user:{user_id}", EXPORTS_PER_HOUR, 3600)


def image_name(image: Row) -> str:
    return f"images/{image.id}.{EXTENSIONS.get(image.format, image.format)}"


def profile(export: Export, missing: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """profile.json's content; ``missing``: the ids of images the store had lost (no file in the zip)."""
    user = export.data.user
    return {
        "exported_at": isoformat(export.at),
        "user": {
            "id": user.public_id,
            "phone": user.phone,
            "created_at": isoformat(user.created_at),
            "last_login_at": isoformat(user.last_login_at),
            "h5_visit_count": int(user.h5_visit_count or 0),
            "h5_last_visit_at": isoformat(user.h5_last_visit_at),
            "deletion_final_at": isoformat(user.deletion_due_at),
        },
        "sessions": [
            {
                "id": row.public_id,
                "created_at": isoformat(row.created_at),
                "last_used_at": isoformat(row.last_used_at),
                "user_agent": row.user_agent,
                "ip": row.ip,
                "current": row.id == export.current_session,
            }
            for row in export.data.sessions
        ],
        "images": [
            {
                "id": image.id,
                "width": image.width,
                "height": image.height,
                "format": image.format,
                "bytes": int(image.bytes),
                "sha256": image.sha256,
                "created_at": isoformat(image.created_at),
                "file": None if image.id in missing else image_name(image),
            }
            for image in export.data.images
        ],
    }


class _Pipe:
    """A write-only, unseekable file for ``zipfile``: what it writes waits here until taken."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))  # zipfile may hand a view of a buffer it reuses
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: ``take`` hands the bytes on."""

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        self.size = 0
        return data


def _zip_time(when: dt.datetime) -> tuple[int, int, int, int, int, int]:
    return (max(when.year, 1980), when.month, when.day, when.hour, when.minute, when.second)


def zip_pieces(export: Export, store: ImageStore, chunk: int = CHUNK) -> Generator[bytes, None, None]:
    """The zip of ``export``, in pieces of about ``chunk`` bytes; each ``next()`` blocks on the store,
    so pull them one at a time off the loop. StoreUnavailable may come at any piece."""
    pipe = _Pipe()
    missing: set[str] = set()
    with zipfile.ZipFile(pipe, "w") as archive:  # type: ignore[call-overload]
        for image in export.data.images:
            size = int(image.bytes)
            source = store.chunks(image.sha256, None, 0, size, chunk)
            with contextlib.ExitStack() as closing:
                if (close := getattr(source, "close", None)) is not None:
                    closing.callback(close)  # a generator's file or S3 stream
                try:
                    first = next(source, b"")  # a lost object fails here, before its entry is begun
                except FileNotFoundError:
                    missing.add(image.id)
                    continue
                info = zipfile.ZipInfo(image_name(image), date_time=_zip_time(image.created_at))
                info.compress_type = zipfile.ZIP_STORED
                info.file_size = size  # decides zip64 up front (an entry over 4 GiB)
                with archive.open(info, "w") as entry:
                    for piece in _chain(first, source):
                        entry.write(piece)
                        if pipe.size >= chunk:
                            yield pipe.take()
        info = zipfile.ZipInfo("profile.json", date_time=_zip_time(export.at))
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, json.dumps(profile(export, missing), ensure_ascii=False, indent=2) + "\n")
    yield pipe.take()  # the rest, and the central directory


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


class Exports:
    """Exports of users' data from the database and the image store."""

    def __init__(self, db: Database, store: ImageStore, clock: Clock | None = None) -> None:
        self.db = db
        self.store = store
        self.clock = clock or Clock()

    async def prepare(self, principal: Principal) -> Export:
        """The caller's export, counted in their hourly limit before anything is read (RateLimited past
        it: nothing was done); Unauthorized when the account went since the token was checked."""
        now = self.clock.now()
        data = await self.db.run(queries.export_data, principal.user_id, export_limit(principal.user_id), now)
        if data is None:
            raise Unauthorized()
        return Export(data, now, principal.session_id)

    async def stream(self, export: Export) -> AsyncGenerator[bytes, None]:
        """``zip_pieces`` pulled off the loop, one piece at a time."""
        io = self.db.offloader.io
        pieces = zip_pieces(export, self.store)
        try:
            while (piece := await io(next, pieces, None)) is not None:
                if piece:
                    yield piece
        finally:
            await io(pieces.close)  # closes the store's stream, on the thread that may block
