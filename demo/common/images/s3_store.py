"""Objects in any S3-compatible store (AWS S3, MinIO, Ceph RGW, SeaweedFS, Tencent COS, Aliyun OSS...).

Built on obstore (Rust's object_store): it signs in native code (about 10 µs a presigned URL against
botocore's 140), costs a process about 9 MiB where a boto3 client costs about 40, and has the
conditional put (``If-None-Match: *``) that keeps dedupe exact across hosts. Its calls block here,
on the offloader's I/O threads, like the local store's.

Credentials come from the standard ``AWS_*`` environment variables (or the instance's role), never
from the settings file: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import mmap
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, ParamSpec, TypeVar
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, NotFoundError
from obstore.store import S3Store

from demo.common.images.storage import (
    IDENTITY,
    ImageStore,
    ListedObject,
    ObjectHead,
    StoreError,
    StoreUnavailable,
    naive_utc,
    object_name,
)

log = logging.getLogger("demo.images")
P = ParamSpec("P")
T = TypeVar("T")
IMMUTABLE = "public, max-age=31536000, immutable"  # for a public bucket or a CDN in front of it
LIST_PAGE = 1000


def _unavailable_on_error(method: Callable[P, T]) -> Callable[P, T]:
    """obstore's errors as the store's: a missing object is FileNotFoundError, anything else that went
    wrong talking to the store (refused, timed out, 5xx, bad credentials) is StoreUnavailable."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except (FileNotFoundError, NotFoundError):
            raise
        except (BaseError, OSError, RuntimeError) as error:
            log.warning("object store error in %s: %s", method.__name__, str(error).splitlines()[0])
            raise StoreUnavailable() from error

    return wrapper


class S3ImageStore(ImageStore):
    put_in_memory = True  # a non-multipart PUT is sent from one buffer: the file's bytes, read by put()
    remote = True

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        temp_root: str,
        endpoint: str = "",
        region: str = "",
        virtual_hosted: bool = False,
        connect_timeout: float = 2.0,
        timeout: float = 10.0,
        presign_ttl: float = 300.0,
    ) -> None:
        super().__init__(temp_root)
        self.bucket, self.prefix = bucket, prefix
        config: dict[str, object] = {"virtual_hosted_style_request": virtual_hosted}
        if endpoint:
            config["endpoint"] = endpoint
        if region:
            config["region"] = region
        self._store = S3Store(
            bucket,
            prefix=prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options={
                # Plain HTTP only where the endpoint says so (a store on the same network).
                "allow_http": (endpoint or os.environ.get("AWS_ENDPOINT_URL", "")).startswith("http://"),
                "connect_timeout": f"{connect_timeout}s",
                "timeout": f"{timeout}s",
            },
            # One quick retry, then the client gets its 503: a store that is down must not hold every
            # request for obstore's default of 10 retries over up to 3 minutes.
            retry_config={
                "max_retries": 1,
                "backoff": {
                    "init_backoff": dt.timedelta(milliseconds=50),
                    "max_backoff": dt.timedelta(milliseconds=500),
                    "base": 2,
                },
                "retry_timeout": dt.timedelta(seconds=timeout),
            },
        )
        self._presign_ttl = dt.timedelta(seconds=presign_ttl)
        self.url_ttl = presign_ttl

    @classmethod
    def from_url(cls, url: str, *, temp_root: str, **options: Any) -> S3ImageStore:
        """``s3://bucket`` or ``s3://bucket/prefix``; ``options`` as for the constructor."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise StoreError(f"storage must look like s3://bucket/prefix, not {url!r}")
        return cls(parts.netloc, parts.path.strip("/"), temp_root=temp_root, **options)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    # -- the deployment ------------------------------------------------------------------------

    @_unavailable_on_error
    def identity(self) -> str | None:
        try:
            return bytes(obstore.get(self._store, IDENTITY).bytes()).decode().strip() or None
        except (FileNotFoundError, NotFoundError):
            return None

    @_unavailable_on_error
    def claim_identity(self, identity: str) -> str:
        with contextlib.suppress(AlreadyExistsError):  # another claimer won: theirs stands
            obstore.put(self._store, IDENTITY, f"{identity}\n".encode(), mode="create")
        return self.identity() or ""

    @_unavailable_on_error
    def identity_written(self) -> dt.datetime | None:
        try:
            return naive_utc(obstore.head(self._store, IDENTITY)["last_modified"])
        except (FileNotFoundError, NotFoundError):
            return None

    # -- objects -------------------------------------------------------------------------------

    @_unavailable_on_error
    def put(self, sha256: str, src: str, *, content_type: str, width: int | None = None) -> None:
        try:
            with _anonymous_copy(src) as body:
                obstore.put(
                    self._store,
                    object_name(sha256, width),
                    body,
                    mode="create",  # If-None-Match: *, so the bytes there first stay
                    use_multipart=False,  # a conditional put is one PUT (images are far below its 5 GB)
                    attributes={"Content-Type": content_type, "Cache-Control": IMMUTABLE},
                )
        except AlreadyExistsError:
            pass
        finally:
            Path(src).unlink(missing_ok=True)

    @_unavailable_on_error
    def size(self, sha256: str, width: int | None = None) -> int | None:
        try:
            return int(obstore.head(self._store, object_name(sha256, width))["size"])
        except (FileNotFoundError, NotFoundError):
            return None

    @_unavailable_on_error
    def head(self, sha256: str, width: int | None = None) -> ObjectHead | None:
        try:
            meta = obstore.head(self._store, object_name(sha256, width))
        except (FileNotFoundError, NotFoundError):
            return None
        return ObjectHead(int(meta["size"]), meta["e_tag"])

    @_unavailable_on_error
    def read(self, sha256: str, width: int | None = None, start: int = 0, end: int | None = None) -> bytes:
        options = {"range": (start, end)} if end is not None else ({"range": {"offset": start}} if start else {})
        result = obstore.get(self._store, object_name(sha256, width), options=options)  # type: ignore[arg-type]
        return bytes(result.bytes())

    def chunks(self, sha256: str, width: int | None, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        if end <= start:
            return iter(())
        return self._chunks(sha256, width, start, end, chunk_size)

    def _chunks(self, sha256: str, width: int | None, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        stream = self._get_stream(sha256, width, start, end, chunk_size)
        while (chunk := _next(stream)) is not None:
            yield bytes(chunk)

    @_unavailable_on_error
    def _get_stream(self, sha256: str, width: int | None, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        result = obstore.get(self._store, object_name(sha256, width), options={"range": (start, end)})
        return iter(result.stream(min_chunk_size=chunk_size))

    @_unavailable_on_error
    def open(self, sha256: str, width: int | None = None) -> BinaryIO:
        result = obstore.get(self._store, object_name(sha256, width))
        copy = tempfile.TemporaryFile(dir=self.temp_dir())  # noqa: SIM115 (returned open) unnamed: nothing to sweep
        try:
            for chunk in result.stream(min_chunk_size=1 << 20):
                copy.write(chunk)
            copy.seek(0)
        except BaseException:
            copy.close()
            raise
        return copy

    @_unavailable_on_error
    def delete(self, sha256: str, widths: Iterable[int]) -> None:
        names = [object_name(sha256), *(object_name(sha256, w) for w in widths)]
        obstore.delete(self._store, names)  # one DeleteObjects request; absent names are fine

    @_unavailable_on_error
    def delete_variant(self, sha256: str, width: int) -> None:
        obstore.delete(self._store, object_name(sha256, width))  # absent is fine (S3 answers 204)

    @_unavailable_on_error
    def redirect_url(self, sha256: str, width: int | None = None) -> str | None:
        # Signed here, without a request to the store, once the credentials are known (static keys;
        # an instance role's are fetched over HTTP first, and refreshed before they expire).
        return obstore.sign(self._store, "GET", object_name(sha256, width), self._presign_ttl)

    # -- sweeps --------------------------------------------------------------------------------

    def blobs(self) -> Iterator[str]:
        pages = _unavailable_on_error(obstore.list)(self._store, prefix="blobs", chunk_size=LIST_PAGE)
        while (page := _next(pages)) is not None:
            for meta in page:
                name = meta["path"].rsplit("/", 1)[-1]
                if len(name) == 64:
                    yield name

    def listing(self, after: str | None, limit: int) -> list[ListedObject]:
        # ListObjectsV2 with start-after: the bucket is read from ``after`` on, never from the start.
        pages = _unavailable_on_error(obstore.list)(self._store, offset=after, chunk_size=min(limit, LIST_PAGE))
        found: list[ListedObject] = []
        while len(found) < limit and (page := _next(pages)) is not None:
            found += (ListedObject(meta["path"], naive_utc(meta["last_modified"])) for meta in page)
        return sorted(found, key=lambda listed: listed.name)[:limit]

    def names(self, under: str) -> Iterator[str]:
        pages = _unavailable_on_error(obstore.list)(self._store, prefix=under, chunk_size=LIST_PAGE)
        while (page := _next(pages)) is not None:
            for meta in page:
                yield meta["path"]


@contextlib.contextmanager
def _anonymous_copy(src: str) -> Iterator[memoryview]:
    """The file's bytes in memory of their own, given back to the system when the block ends.

    An S3 PUT sends its body from one buffer, which upload_memory counts as the file's size. Given
    the path, obstore reads it into a buffer grown by doubling and touched whole (up to twice the
    file); a bytes object read here is the file's size, but glibc serves a block that large from the
    reading thread's heap once bigger blocks have been freed (Pillow's), and keeps it there after
    the free, a few MiB per database thread that has put a file. An anonymous mapping is exactly the
    file's pages and is unmapped at close; obstore reads it through the buffer protocol, no copy.
    Measured by bench/README.md's memory_s3 (16 concurrent 8 MiB uploads)."""
    size = os.path.getsize(src)
    buffer = mmap.mmap(-1, max(size, 1))  # a mapping cannot be empty
    view = memoryview(buffer)[:size]
    try:
        with open(src, "rb") as file:
            if file.readinto(view) != size:
                raise OSError(f"{src} changed size while read")
        yield view
    finally:
        view.release()
        buffer.close()


@_unavailable_on_error
def _next(items: Iterator[T]) -> T | None:
    """The next item of one of obstore's streams, or None at its end (a stream fails as it goes)."""
    return next(items, None)
