"""The streamed upload of one image, as a handler sees it: ``UploadStream`` wires a request to an
``UploadReceiver`` (images/receiver.py). Both upload handlers (the API's /images and the H5 page's
/h5/images) derive from ``UploadHandler``, which holds one and delegates to it: ``start`` from
``prepare`` (after the credential check, before a byte of the body), ``data_received``, ``abandon``
from ``on_finish``/``on_connection_close``; their ``post`` calls ``finish`` (the 201 with the image
object). Errors are the contract's JSON, like the 201.
"""

from __future__ import annotations

import sys
from typing import Any

from tornado.web import stream_request_body

from demo.common.images import imaging
from demo.common.images.receiver import UploadReceiver
from demo.common.images.rules import THUMBNAIL_WIDTHS
from demo.common.web.api import ApiHandler
from demo.common.web.base import BaseHandler


def image_json(handler: BaseHandler, record: dict[str, Any]) -> dict[str, Any]:
    """The contract's image object: the record with the absolute URLs of the image and its thumbnails."""
    path = f"/images/{record['id']}.{imaging.EXTENSIONS[record['format']]}"
    return {
        **record,
        "url": handler.absolute_url(path),
        "thumbnails": {str(w): handler.absolute_url(f"{path}?w={w}") for w in THUMBNAIL_WIDTHS},
    }


class UploadStream:
    """One request's upload: the body goes to an ``UploadReceiver`` chunk by chunk, so memory does not
    grow with the upload. The handler must be a ``@stream_request_body`` ``ApiHandler``."""

    def __init__(self, handler: ApiHandler) -> None:
        self.handler = handler
        self.receiver: UploadReceiver | None = None

    async def start(self) -> None:
        """From ``prepare``, once the credential is checked: refusals (415, 413, 422, quota) come before
        the body is read. Only a POST has an upload."""
        handler = self.handler
        if handler.request.method != "POST":
            return
        assert handler.principal is not None  # POST requires a session
        headers = handler.request.headers
        self.receiver = UploadReceiver(handler.images, handler.services.offloader)
        await self.receiver.start(
            handler.principal.user_id, headers.get("Content-Type", ""), headers.get("Content-Length")
        )
        # The receiver counts the body and answers 413 past its limit (then the connection closes).
        # Tornado's own max_body_size would refuse a chunk by its declared size before a byte of it
        # arrives, with a bare 400: leave the limit to the receiver.
        handler.request.connection.set_max_body_size(sys.maxsize)  # type: ignore[union-attr]

    async def data_received(self, chunk: bytes) -> None:
        if self.receiver is None or not self.receiver.receiving:
            return
        handler = self.handler
        handler.services.metrics.upload_bytes.inc(len(chunk))
        try:
            await self.receiver.feed(chunk)
        except Exception:  # noqa: BLE001
            # An exception escaping data_received would only drop the connection: answer here
            # instead; Tornado then stops reading the body and closes after the response.
            handler.log_exception(*sys.exc_info())  # quiet for domain errors, logged for anything else
            handler.send_error(500, exc_info=sys.exc_info())  # status comes from the error (413, 422, ...)

    async def finish(self) -> None:
        """Finish the upload and answer 201 with the image object (unless a chunk was refused: then
        data_received has answered already, and Tornado calls the method anyway)."""
        handler = self.handler
        if handler._finished or self.receiver is None or not self.receiver.receiving:
            return
        body = image_json(handler, await self.receiver.finish())
        handler.set_header("Location", body["url"])
        handler.write_json({"image": body}, status=201)

    def abandon(self) -> None:
        """The request is over (answered, or the client went away): the receiver lets the body go."""
        if self.receiver is not None:
            self.receiver.abandon()


@stream_request_body
class UploadHandler(ApiHandler):
    """An ``ApiHandler`` whose request body streams into an ``UploadStream`` (``self.upload``)."""

    def initialize(self) -> None:
        super().initialize()
        self.upload = UploadStream(self)

    async def prepare(self) -> None:
        pending = super().prepare()  # the credential is checked before a byte of the body is read
        if pending is not None:
            await pending
        await self.upload.start()

    async def data_received(self, chunk: bytes) -> None:
        await self.upload.data_received(chunk)

    def on_finish(self) -> None:
        self.upload.abandon()
        super().on_finish()

    def on_connection_close(self) -> None:
        self.upload.abandon()
        super().on_connection_close()  # fails the body future, so the handler's _execute ends too
