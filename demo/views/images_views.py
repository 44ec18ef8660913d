"""Images handlers: a streamed upload, the list, delete, and byte delivery (ETag, 304, Range)."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

from tornado.web import stream_request_body

from demo.common.errors import InvalidField, NotFound, RangeNotSatisfiable
from demo.common.images import imaging
from demo.common.images.receiver import UploadReceiver
from demo.common.images.rules import THUMBNAIL_WIDTHS, Images
from demo.common.web.api import ApiHandler
from demo.common.web.auth import public, requires_session

log = logging.getLogger("demo.images")
CHUNK = 256 * 1024
IMMUTABLE = "public, max-age=31536000, immutable"
DECIMAL = re.compile(r"[0-9]{1,9}")  # ASCII digits only (str.isdigit also takes "²" and "٣")
WIDTH_SPELLINGS = {str(width): width for width in THUMBNAIL_WIDTHS}


class ImageApiHandler(ApiHandler):
    @property
    def images(self) -> Images:
        images: Images = self.services.images
        return images

    def image_json(self, record: dict[str, Any]) -> dict[str, Any]:
        path = f"/images/{record['id']}.{imaging.EXTENSIONS[record['format']]}"
        return {
            **record,
            "url": self.absolute_url(path),
            "thumbnails": {str(w): self.absolute_url(f"{path}?w={w}") for w in THUMBNAIL_WIDTHS},
        }


@stream_request_body
class UploadHandler(ImageApiHandler):
    """The streamed upload of one image (POST): the body goes to an ``UploadReceiver`` chunk by chunk,
    so memory does not grow with the upload. Subclasses declare ``post`` (who may upload) and call
    ``receive``; errors are the contract's JSON, like the 201."""

    upload: UploadReceiver | None = None

    async def prepare(self) -> None:
        pending = super().prepare()  # the credential is checked before a byte of the body is read
        if pending is not None:
            await pending
        if self.request.method != "POST":
            return
        assert self.principal is not None  # POST requires a session
        headers = self.request.headers
        self.upload = UploadReceiver(self.images, self.services.offloader)
        await self.upload.start(self.principal.user_id, headers.get("Content-Type", ""), headers.get("Content-Length"))
        # The receiver counts the body and answers 413 past its limit (then the connection closes).
        # Tornado's own max_body_size would refuse a chunk by its declared size before a byte of it
        # arrives, with a bare 400: leave the limit to the receiver.
        self.request.connection.set_max_body_size(sys.maxsize)  # type: ignore[union-attr]

    async def data_received(self, chunk: bytes) -> None:
        if self.upload is None or not self.upload.receiving:
            return
        self.services.metrics.upload_bytes.inc(len(chunk))
        try:
            await self.upload.feed(chunk)
        except Exception:  # noqa: BLE001
            # An exception escaping data_received would only drop the connection: answer here
            # instead; Tornado then stops reading the body and closes after the response.
            self.log_exception(*sys.exc_info())  # quiet for domain errors, logged for anything else
            self.send_error(500, exc_info=sys.exc_info())  # status comes from the error (413, 422, ...)

    async def receive(self) -> None:
        """Finish the upload and answer 201 with the image object (unless a chunk was refused: then
        data_received has answered already, and Tornado calls the method anyway)."""
        if self._finished or self.upload is None or not self.upload.receiving:
            return
        body = self.image_json(await self.upload.finish())
        self.set_header("Location", body["url"])
        self.write_json({"image": body}, status=201)

    def on_finish(self) -> None:
        if self.upload is not None:
            self.upload.abandon()
        super().on_finish()

    def on_connection_close(self) -> None:
        if self.upload is not None:
            self.upload.abandon()
        super().on_connection_close()  # fails the body future, so the handler's _execute ends too


class ImageCollectionHandler(UploadHandler):
    """/images: upload (bearer) and the list of own images."""

    @requires_session
    async def post(self) -> None:
        """Upload one image (multipart field ``image`` or raw bytes)."""
        await self.receive()

    @requires_session
    async def get(self) -> None:
        """List own images, newest first, with cursor pagination."""
        # Never stripped: a value is checked exactly as it came (strip would make "\x01" an empty cursor).
        limit = self.get_query_argument("limit", "20", strip=False)
        if not DECIMAL.fullmatch(limit) or not 1 <= int(limit) <= 100:
            raise InvalidField("limit must be an integer from 1 to 100.", field="limit")
        cursor = self.get_query_argument("cursor", None, strip=False) or None
        records, next_cursor = await self.images.list(self.principal.user_id, int(limit), cursor)
        self.write_json({"images": [self.image_json(r) for r in records], "next_cursor": next_cursor})


class ImageItemHandler(ImageApiHandler):
    @requires_session
    async def delete(self, image_id: str) -> None:
        """Delete an own image."""
        await self.images.delete(self.principal.user_id, image_id)
        self.set_status(204)
        self.finish()


class ImageFileHandler(ImageApiHandler):
    """The image bytes: immutable, strong ETag, 304 and single-range 206; read off the loop."""

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
        path = await self.images.file_for(image, width)
        thumb = width is not None and width < image.width
        etag = f'"{image.sha256}-w{width}"' if thumb else f'"{image.sha256}"'
        self.set_header("Content-Type", imaging.MIME_TYPES[image.format])
        self.set_header("Cache-Control", IMMUTABLE)
        self.set_header("ETag", etag)
        self.set_header("Content-Security-Policy", "sandbox")
        self.set_header("Accept-Ranges", "bytes")
        if _none_match(self.request.headers.get("If-None-Match"), etag):
            self.set_status(304)
            self.finish()
            return
        size, data = await self.images.contents(path)  # small files: from memory, no thread hop
        start, end = 0, size
        requested = parse_range(self.request.headers.get("Range"), size)
        if isinstance(requested, str):  # "unsatisfiable"
            raise RangeNotSatisfiable(size)
        if requested is not None:
            start, end = requested
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.set_header("Content-Length", str(end - start))
        if body and data is not None:
            self.write(data[start:end])
        elif body:
            await self._stream_file(path, start, end)
        self.finish()

    def _width(self) -> int | None:
        raw = self.get_query_argument("w", None, strip=False)
        if raw is None:
            return None
        # Exactly as the links spell them: nginx's cache keys on the raw argument, so "0160" would
        # be a second key for the same thumbnail, each one a miss that reaches the app.
        if raw not in WIDTH_SPELLINGS:
            raise InvalidField(f"w must be one of {', '.join(WIDTH_SPELLINGS)}.", field="w")
        return WIDTH_SPELLINGS[raw]

    async def _stream_file(self, path: str, start: int, end: int) -> None:
        """A large file in chunks read on the I/O pool (nginx's micro-cache takes this off the hot path)."""
        io = self.services.offloader.io
        handle = await io(open, path, "rb")
        try:
            remaining = end - start
            offset = start
            while remaining > 0:
                chunk = await io(os.pread, handle.fileno(), min(CHUNK, remaining), offset)
                offset += len(chunk)
                if not chunk:
                    break
                remaining -= len(chunk)
                self.write(chunk)
                await self.flush()  # back-pressure: a slow client holds one chunk, not the file
        finally:
            await io(handle.close)

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
