"""One upload from its request head to its image record: the one owner of the body on its way in.

A handler holds an ``UploadReceiver`` and tells it what happens to the request: ``start`` with the
declared type and length (refusals come before a byte of the body is read), ``feed`` each chunk,
``finish`` once the body is complete, ``abandon`` when the request ends otherwise (the client went
away, an answer was sent). The body is kept in an ``UploadSpool`` (memory or a temp file) that the
receiver discards exactly once, whichever of these ends the upload. No Tornado here.
"""

from __future__ import annotations

from typing import Any

from demo.common.images.rules import Images
from demo.common.images.uploads import UploadSink, UploadSpool
from demo.common.infra.offload import Offloader


class UploadReceiver:
    def __init__(self, images: Images, offloader: Offloader) -> None:
        self._images = images
        self._io = offloader.io
        self._sink: UploadSink | None = None
        self._spool: UploadSpool | None = None
        self._user_id = 0
        self._writing = False  # a write to the spool is on the I/O pool
        self._abandoned = False  # the request is over: a write under way, or start, discards at its end
        self._finishing = False  # finish owns the spool now: it discards, nobody else
        self._discarded = False

    @property
    def receiving(self) -> bool:
        """Started and still taking chunks (not refused, finished nor abandoned)."""
        return self._spool is not None and not self._discarded and not self._finishing

    @property
    def discarded(self) -> bool:
        return self._discarded

    async def start(self, user_id: int, content_type: str, content_length: str | None) -> None:
        """Before the body: UnsupportedMediaType / InvalidField for a body this cannot take,
        TooLarge for a declared length over the limit, QuotaExceeded when no image fits any more."""
        sink = UploadSink(content_type, self._images.rules.max_upload_bytes)
        sink.declared_length_ok(content_length)
        await self._images.check_room(user_id)
        declared = int(content_length) if content_length and content_length.isdigit() else None
        self._spool = UploadSpool(self._images.store.temp_file, self._images.upload_memory, declared)
        self._sink, self._user_id = sink, user_id
        if self._abandoned:  # the request ended while check_room ran: nobody will call abandon again
            self._discarded = True
            self._spool.discard()  # nothing written yet: memory given back, no file to unlink

    async def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the body (written to disk off the loop once enough has gathered).
        TooLarge past a limit, InvalidField for a malformed body: the upload is then over (discarded)."""
        if not self.receiving:
            return
        assert self._sink is not None and self._spool is not None  # set by start
        try:
            data = self._sink.feed(chunk)
            ready = self._spool.add(data) if data else None
            if ready:
                self._writing = True
                try:
                    await self._io(self._spool.write, ready)
                finally:
                    self._writing = False
        except BaseException:
            await self.discard()
            raise
        if self._abandoned:
            await self.discard()

    async def finish(self) -> dict[str, Any]:
        """The body is complete: check it, and store the image (``Images.create``); its record. The
        spool is discarded once this ends, however it ends."""
        assert self._sink is not None and self._spool is not None, "finish before start"
        self._finishing = True
        try:
            self._sink.finish()
            src = await self._io(self._spool.finish, self._spool.take())
            return await self._images.create(self._user_id, src, self._read)
        finally:
            await self.discard()  # unless _read did already

    def _read(self) -> None:
        """``Images.create`` has decoded the body (on its worker thread): it goes now, memory given back
        before the image is stored. Only while ``finish`` runs, so nothing else discards meanwhile."""
        assert self._spool is not None and self._finishing
        if not self._discarded:
            self._discarded = True
            self._spool.discard()

    def abandon(self) -> None:
        """The request is over without ``finish`` (or after it): let the body go, unless ``finish``
        holds it (it discards when done) or a write is under way (its end discards); before ``start`` has
        made the spool, ``start`` discards it once made. Runs on the loop: a close and unlink of this
        process's own temp file, or memory given back."""
        if self._discarded or self._finishing:
            return
        if self._spool is None or self._writing:
            self._abandoned = True
            return
        self._discarded = True
        self._spool.discard()

    async def discard(self) -> None:
        """Let the body go now (off the loop); the first call does it, later ones do nothing."""
        if self._spool is None or self._discarded:
            return
        self._discarded = True
        await self._io(self._spool.discard)
