"""Images handlers: a streamed upload, the list, delete, and byte delivery (ETag, 304, Range)."""

from __future__ import annotations

import contextlib
import logging
import re
from urllib.parse import urlsplit

from tornado.iostream import StreamClosedError

from demo.common.errors import InvalidField, NotFound, RangeNotSatisfiable
from demo.common.i18n import N_
from demo.common.images import imaging
from demo.common.images.rules import THUMBNAIL_WIDTHS, ImageFile
from demo.common.web.api import ApiHandler
from demo.common.web.auth import public, requires_session
from demo.common.web.httpserver import STORE_LOCATION
from demo.common.web.uploads import UploadHandler, image_json

log = logging.getLogger("demo.images")
IMMUTABLE = "public, max-age=31536000, immutable"
DECIMAL = re.compile(r"[0-9]{1,9}")  # ASCII digits only (str.isdigit also takes "²" and "٣")
WIDTH_SPELLINGS = {str(width): width for width in THUMBNAIL_WIDTHS}


class ImageCollectionHandler(UploadHandler):
    """/images: the streamed upload (bearer; an ``UploadStream`` takes the body) and the list of own images."""

    @requires_session
    async def post(self) -> None:
        """Upload one image (multipart field ``image`` or raw bytes)."""
        await self.upload.finish()

    @requires_session
    async def get(self) -> None:
        """List own images, newest first, with cursor pagination."""
        # Never stripped: a value is checked exactly as it came (strip would make "\x01" an empty cursor).
        limit = self.get_query_argument("limit", "20", strip=False)
        if not DECIMAL.fullmatch(limit) or not 1 <= int(limit) <= 100:
            raise InvalidField(N_("limit must be an integer from 1 to 100."), field="limit")
        cursor = self.get_query_argument("cursor", None, strip=False) or None
        records, next_cursor = await self.images.list(self.principal.user_id, int(limit), cursor)
        self.write_json({"images": [image_json(self, r) for r in records], "next_cursor": next_cursor})


class ImageItemHandler(ApiHandler):
    @requires_session
    async def delete(self, image_id: str) -> None:
        """Delete an own image."""
        await self.images.delete(self.principal.user_id, image_id)
        self.set_status(204)
        self.finish()


class ImageFileHandler(ApiHandler):
    """The image bytes: immutable, strong ETag, 304 and single-range 206. Behind nginx with an object
    store, an internal redirect to the store (nginx fetches and caches the bytes); else read off the
    loop and sent from here."""

    @public
    async def get(self, image_id: str, ext: str) -> None:
        """Image (or thumbnail) bytes."""
        await self._serve(image_id, ext, body=True)

    @public
    async def head(self, image_id: str, ext: str) -> None:
        """Headers of the image."""
        await self._serve(image_id, ext, body=False)

    async def _serve(self, image_id: str, ext: str, *, body: bool) -> None:
        width = self._width()
        image = await self.images.find(image_id)
        if imaging.EXTENSIONS[image.format] != ext:
            raise NotFound()
        file = await self.images.file_for(image, width)
        self.set_header("Content-Type", imaging.MIME_TYPES[image.format])
        self.set_header("Cache-Control", IMMUTABLE)
        self.set_header("ETag", file.etag)
        self.set_header("Content-Security-Policy", "sandbox")
        self.set_header("Accept-Ranges", "bytes")
        if _none_match(self.request.headers.get("If-None-Match"), file.etag):
            self.set_status(304)
            self.finish()
            return
        if body and await self._redirect_to_store(file):
            self.finish()
            return
        size = file.size
        start, end = 0, size
        requested = parse_range(self.request.headers.get("Range"), size)
        if isinstance(requested, str):  # "unsatisfiable"
            raise RangeNotSatisfiable(size)
        if requested is not None:
            start, end = requested
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.set_header("Content-Length", str(end - start))
        if body:
            data = await self.images.contents(file)  # small files: from memory after the first read
            if data is not None:
                self.write(data[start:end])
            else:
                await self._stream(file, start, end)
        self.finish()

    async def _redirect_to_store(self, file: ImageFile) -> bool:
        """Hand the body to nginx (X-Accel-Redirect into its internal location that proxies to the
        store, with a presigned URL) when nginx said where that location is and the store signs URLs.
        The header reaches a handler only from a trusted proxy (httpserver strips it otherwise)."""
        location = self.request.headers.get(STORE_LOCATION)
        if not location:
            return False
        url = await self.images.redirect_url(file)
        if url is None:
            return False
        parts = urlsplit(url)
        target = location + parts.path.lstrip("/") + (f"?{parts.query}" if parts.query else "")
        self.set_header("X-Accel-Redirect", target)
        return True

    def _width(self) -> int | None:
        raw = self.get_query_argument("w", None, strip=False)
        if raw is None:
            return None
        # Exactly as the links spell them: nginx's cache keys on the raw argument, so "0160" would
        # be a second key for the same thumbnail, each one a miss that reaches the app.
        if raw not in WIDTH_SPELLINGS:
            raise InvalidField(
                N_("w must be one of {widths}."), field="w", params={"widths": ", ".join(WIDTH_SPELLINGS)}
            )
        return WIDTH_SPELLINGS[raw]

    async def _stream(self, file: ImageFile, start: int, end: int) -> None:
        """A large file in pieces read off the loop; a slow client holds one piece, not the file. A
        store failing before the first piece is the error map's answer (nothing was sent yet); after
        it, the headers are gone and only closing the connection tells the client the body is cut."""
        sent = False
        async with contextlib.aclosing(self.images.chunks(file, start, end)) as pieces:
            try:
                async for piece in pieces:
                    self.write(piece)
                    await self.flush()  # back-pressure
                    sent = True
            except Exception as error:
                if not sent or isinstance(error, StreamClosedError):  # nothing sent yet; the client left
                    raise
                log.warning("image %s cut after its headers went: %r", file.etag, error)
                self.request.connection.close()  # type: ignore[union-attr]

    def compute_etag(self) -> None:
        return None


def _none_match(header: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` matches the image (RFC 9110 13.1.2, weak comparison): one of its
    tags, or ``*``, which any existing representation matches. For GET and HEAD a match is a 304."""
    if not header:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range as (start, end_exclusive); None to send everything; "unsatisfiable"."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None  # absent, another unit, or several ranges: a full 200 is a valid answer
    first, _, last = header[6:].strip().partition("-")
    try:
        if first == "":
            length = int(last)
            if length <= 0:
                return "unsatisfiable"
            return max(0, size - length), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, min(end, size)
