"""Turn a streamed request body into the bytes of one uploaded file, chunk by chunk.

Two shapes: ``multipart/form-data`` with the file in field ``image`` (parsed with python-multipart's
streaming parser), or the raw image bytes with an ``image/*`` Content-Type. Memory stays flat: each
``feed`` returns only the file bytes found in that chunk, for the caller to write to disk.
Client file names are never used for anything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from demo.common.errors import InvalidField, TooLarge, UnsupportedMediaType
from demo.common.i18n import N_
from demo.common.infra.memory import Budget

FIELD = "image"
MULTIPART_SLACK = 16 * 1024  # boundaries and part headers on top of the file itself


class UploadSink:
    def __init__(self, content_type: str, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.file_bytes = 0
        self.body_bytes = 0
        self.multipart: _ImagePart | None = None  # raw body: the bytes are the file; what they are is checked later
        self.body_limit = max_bytes
        raw_mime, params = parse_options_header(content_type or "")
        mime = raw_mime.decode("latin-1").lower()
        if mime == "multipart/form-data":
            boundary = params.get(b"boundary")
            if not boundary:
                raise InvalidField(N_("multipart body without a boundary."), field=FIELD)
            self.multipart = _ImagePart(boundary)
            self.body_limit = max_bytes + MULTIPART_SLACK
        elif not mime.startswith("image/"):
            raise UnsupportedMediaType(N_("Send multipart/form-data (field 'image') or the raw image bytes."))

    def declared_length_ok(self, content_length: str | None) -> None:
        """Refuse up front when Content-Length already says too much."""
        if content_length and content_length.isdigit() and int(content_length) > self.body_limit:
            raise TooLarge(N_("Uploads are limited to {limit} bytes."), params={"limit": self.max_bytes})

    def feed(self, chunk: bytes) -> bytes:
        """The file bytes contained in ``chunk``; TooLarge as soon as a limit is passed."""
        self.body_bytes += len(chunk)
        if self.body_bytes > self.body_limit:
            raise TooLarge(N_("Uploads are limited to {limit} bytes."), params={"limit": self.max_bytes})
        data = chunk if self.multipart is None else self.multipart.feed(chunk)
        self.file_bytes += len(data)
        if self.file_bytes > self.max_bytes:
            raise TooLarge(N_("Uploads are limited to {limit} bytes."), params={"limit": self.max_bytes})
        return data

    def finish(self) -> None:
        """The body is complete: it must have carried a file."""
        if self.multipart is not None:
            self.multipart.finish()


class _ImagePart:
    """Callbacks for python-multipart that keep the data of the first part named ``image``."""

    def __init__(self, boundary: bytes) -> None:
        self._out: list[bytes] = []
        self._header_field = b""
        self._header_value = b""
        self._disposition = b""
        self._in_image = False
        self.found = False
        self.ended = False
        with _malformed_multipart():  # python-multipart refuses a boundary over 256 bytes right here
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._part_begin,
                    "on_header_field": lambda d, s, e: self._append("_header_field", d[s:e]),
                    "on_header_value": lambda d, s, e: self._append("_header_value", d[s:e]),
                    "on_header_end": self._header_end,
                    "on_headers_finished": self._headers_finished,
                    "on_part_data": self._part_data,
                    "on_part_end": self._part_end,
                    "on_end": self._end,
                },
            )

    def feed(self, chunk: bytes) -> bytes:
        with _malformed_multipart():
            self._parser.write(chunk)
        data, self._out = b"".join(self._out), []
        return data

    def finish(self) -> None:
        with _malformed_multipart():
            self._parser.finalize()
        if not self.found:
            raise InvalidField(N_("Put the file in the multipart field 'image'."), field=FIELD)
        if not self.ended:
            raise InvalidField(N_("The multipart body ended early."), field=FIELD)

    # -- parser callbacks --
    def _append(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)
        if len(getattr(self, attr)) > 4096:
            raise ValueError("part header too long")

    def _part_begin(self) -> None:
        self._disposition = b""

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        self._in_image = params.get(b"name") == FIELD.encode() and not self.found
        if self._in_image:
            self.found = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_image:
            self._out.append(data[start:end])

    def _part_end(self) -> None:
        self._in_image = False

    def _end(self) -> None:
        self.ended = True


@contextlib.contextmanager
def _malformed_multipart() -> Iterator[None]:
    """python-multipart's own errors (and our callbacks' ValueError) for a malformed body: a 422."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - the parser's exception classes are not a stable API
        raise InvalidField(
            N_("Malformed multipart body: {reason}."), field=FIELD, params={"reason": error.__class__.__name__}
        ) from None


SPOOL_WRITE_BYTES = 256 * 1024
IN_MEMORY_MAX = 4 * 1024 * 1024  # a body declared at most this long may stay in memory


class UploadSpool:
    """The uploaded file on its way to the image processing: in memory, or in a temp file.

    A body whose Content-Length fits ``IN_MEMORY_MAX`` and what is left of the process's upload
    memory budget stays in memory: no temp file to write, read back and remove. Any other body
    (larger, chunked, or arriving when the memory is taken) goes to disk, so memory stays flat however
    large the uploads. Disk writes gather network chunks and write ``SPOOL_WRITE_BYTES`` at a time:
    each write is a hand-off to the I/O pool. The methods that touch the disk (``write``, ``finish``,
    ``discard``) block: callers run them on the I/O pool. The file is created (by ``new_temp_file``,
    which gives an open descriptor and its path) on the first write.
    """

    def __init__(
        self,
        new_temp_file: Callable[[], tuple[int, str]],
        memory: Budget | None = None,
        declared_length: int | None = None,
    ) -> None:
        self._new_temp_file = new_temp_file
        self.path: str | None = None
        self._file: BinaryIO | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._memory = memory
        self._held = 0
        if memory is not None and declared_length is not None and declared_length <= IN_MEMORY_MAX:
            self._held = declared_length if memory.try_take(declared_length) else 0
        self.in_memory = self._held > 0

    def add(self, data: bytes) -> list[bytes] | None:
        """Keep ``data``; once enough is gathered for the disk, the chunks to ``write`` now (else None)."""
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self.in_memory and self._pending_bytes > self._held:  # more than declared: never in memory
            self._give_back()
        return self.take() if not self.in_memory and self._pending_bytes >= SPOOL_WRITE_BYTES else None

    def take(self) -> list[bytes]:
        """The chunks gathered and not yet written (to pass to ``finish``)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        return pending

    def write(self, chunks: list[bytes]) -> None:
        if self._file is None:
            fd, self.path = self._new_temp_file()
            self._file = os.fdopen(fd, "wb", buffering=0)
        self._file.write(b"".join(chunks))

    def finish(self, chunks: list[bytes]) -> str | bytes:
        """The whole file: its bytes when in memory, else the path of the closed temp file (written
        to the end with the last ``chunks``; an empty file for an empty upload)."""
        if self.in_memory:
            return b"".join(chunks)
        self.write(chunks)
        assert self._file is not None and self.path is not None  # made by write
        self._file.close()
        return self.path

    def discard(self) -> None:
        """Close and remove the temp file and give back the memory, whatever state it is in (idempotent)."""
        self._pending = []
        self._give_back()
        if self._file is not None:
            self._file.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _give_back(self) -> None:
        held, self._held, self.in_memory = self._held, 0, False
        if held and self._memory is not None:
            self._memory.give_back(held)
