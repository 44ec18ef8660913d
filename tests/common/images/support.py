"""What the image tests share: images made with Pillow right here (ordinary, animated, hostile), and
helpers to upload them over HTTP and look at the disk and the database afterwards.
"""

from __future__ import annotations

import io
import json
import random
import re
import secrets
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import func, select

from demo.models import Image, ImageBlob, User

# -- images, made here -----------------------------------------------------------------------------
OTHER_PHONE = "18866669999"
KIB = 1024


# -- images, made here -----------------------------------------------------------------------------


def encode(im: PILImage.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


def gradient(size: tuple[int, int]) -> PILImage.Image:
    """Smooth, cheap, and not a flat colour (so resizing and re-encoding have something to do)."""
    base = PILImage.linear_gradient("L").resize(size)
    return PILImage.merge("RGB", (base, base.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT), base.rotate(90)))


def noise(size: tuple[int, int], seed: int = 1) -> PILImage.Image:
    return PILImage.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def jpeg(size: tuple[int, int] = (64, 48), **options: Any) -> bytes:
    return encode(gradient(size), "JPEG", quality=90, **options)


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(gradient(size), "PNG")


def open_image(data: bytes) -> PILImage.Image:
    im = PILImage.open(io.BytesIO(data))
    im.load()
    return im


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header claims ``width`` x ``height``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def gif_with_screen(width: int, height: int) -> bytes:
    """A 1x1 GIF frame on a ``width`` x ``height`` logical screen."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00"
        + b"\x02\x02\x44\x01\x00"
        + b";"
    )


def webp_canvas(width: int, height: int) -> bytes:
    """A WebP whose extended header claims a ``width`` x ``height`` canvas, and nothing else."""
    vp8x = (
        b"VP8X"
        + struct.pack("<I", 10)
        + b"\x00" * 4
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
    )
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def gif_with_frames(n: int) -> bytes:
    frames = [PILImage.new("P", (1, 1), i % 2) for i in range(n)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 255, 255])
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)


# -- HTTP helpers ----------------------------------------------------------------------------------


def multipart(
    data: bytes, *, filename: bytes | str = "x.jpg", part_type: str = "image/jpeg", field: str = "image"
) -> tuple[bytes, str]:
    """A multipart/form-data body built by hand, so tests control every byte of the file name."""
    boundary = "----demo-" + secrets.token_hex(12)
    name = filename.encode() if isinstance(filename, str) else filename
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="'.encode()
        + name
        + f'"\r\nContent-Type: {part_type}\r\n\r\n'.encode()
    )
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def upload(
    api,
    token: str | None,
    data: bytes,
    *,
    filename: bytes | str = "x.jpg",
    content_type: str | None = None,
    raw: bool = False,
    headers: dict[str, str] | None = None,
):
    headers = dict(headers or {})
    if raw:
        body = data
        headers["Content-Type"] = content_type or "image/jpeg"
    else:
        part_type = content_type or "image/jpeg"
        body, headers["Content-Type"] = multipart(data, filename=filename, part_type=part_type)
    return await api.post("/images", body=body, token=token, headers=headers)


async def uploaded(api, token: str, data: bytes, **kw: Any) -> dict[str, Any]:
    """Upload, insist on 201, return the image object."""
    response = await upload(api, token, data, **kw)
    assert response.code == 201, response.body
    return response.json["image"]


def assert_error(response, status: int, code: str, field: str | None = None) -> None:
    assert response.code == status, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.error == code
    if field is not None:
        assert response.json["error"]["field"] == field


def json_error(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


def path_of(url: str) -> str:
    return re.sub(r"^https?://[^/]+", "", url)


async def fetch(api, url: str, **kw: Any):
    return await api.get(path_of(url), **kw)


async def second_user(api, outbox) -> str:
    response = await api.register(outbox, phone=OTHER_PHONE)
    assert response.code == 201, response.body
    return response.json["token"]


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# -- disk and database -----------------------------------------------------------------------------


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def media(app) -> Path:
    return Path(app.services.store.root)


def count(app, model) -> int:
    return app.services.db.run_sync(lambda s: s.scalar(select(func.count()).select_from(model)))


def row_id(app, user) -> int:
    """The user's internal key (the API shows only the public id)."""
    return app.services.db.run_sync(lambda s: s.scalar(select(User.id).where(User.phone == user.phone)))


def blob_refs(app, sha256: str) -> int | None:
    """How many images use the blob; None when it has no row."""

    def refs(s) -> int | None:
        if s.get(ImageBlob, sha256) is None:
            return None
        return s.scalar(select(func.count()).select_from(Image).where(Image.sha256 == sha256))

    return app.services.db.run_sync(refs)


def stored(app, under: str) -> list[str]:
    """The names of the objects under ``under`` ("blobs", "thumbs") in the app's store, either backend
    (as ``storage.object_name`` spells them)."""
    return sorted(app.services.store.names(under))


def temp_files(app) -> list[Path]:
    """This host's temp files of the app's store (uploads in progress, thumbnails being made)."""
    return files(Path(app.services.store.temp_dir()))


def put_object(app, sha256: str, data: bytes, width: int | None = None) -> None:
    """Put ``data`` in the app's store as blob ``sha256`` (or its ``width`` thumbnail), behind the rules' back."""
    store = app.services.store
    fd, path = store.temp_file()
    with open(fd, "wb") as f:
        f.write(data)
    store.put(sha256, path, content_type="image/jpeg", width=width)


def assert_nothing_stored(app) -> None:
    assert temp_files(app) == []
    assert stored(app, "blobs") == []
    assert stored(app, "thumbs") == []
    assert count(app, Image) == 0 and count(app, ImageBlob) == 0


def assert_no_temp_files(app) -> None:
    assert temp_files(app) == []


MIB = 1024 * 1024


# -- animations, made here -------------------------------------------------------------------------


def animation(fmt: str, frames: int, size: tuple[int, int]) -> bytes:
    """``frames`` frames that differ from the one before by one pixel: a tiny file (the writer stores
    only the change), every frame a full ``size`` picture once decoded."""
    base = PILImage.new("P", size, 0)
    base.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * 759)
    pictures = []
    for n in range(frames):
        picture = base.copy()
        picture.putpixel((n % size[0], n // size[0] % size[1]), 1 + n % 2)
        pictures.append(picture if fmt == "GIF" else picture.convert("RGB"))
    return encode(pictures[0], fmt, save_all=True, append_images=pictures[1:], duration=40, loop=0)


MIME = {"GIF": "image/gif", "PNG": "image/png", "WEBP": "image/webp"}


def gif_of(canvas: tuple[int, int], frames: list[tuple[int, int]]) -> bytes:
    """A GIF with a ``canvas``-sized screen and frames of the given sizes, each placed at (0, 0),
    whether it fits the screen or not (Pillow's writer would not write one that does not)."""
    blocks = {size: _gif_frame_blocks(size, n % 2) for n, size in enumerate(set(frames))}
    palette = bytes([0xF7, 0, 0]) + bytes(range(256)) * 3  # a global palette of 256 colours
    return b"GIF89a" + struct.pack("<HH", *canvas) + palette + b"".join(blocks[size] for size in frames) + b";"


def _gif_frame_blocks(size: tuple[int, int], colour: int) -> bytes:
    """One frame's descriptor and image data, cut out of Pillow's single-frame GIF (no extensions)."""
    picture = PILImage.new("P", size, colour)
    picture.putpalette(list(range(256)) * 3)
    data = encode(picture, "GIF")
    start = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 128 else 0)
    assert data[start : start + 1] == b"," and not data[start + 9] & 128  # a descriptor, no frame palette
    return data[start:-1]


# -- the store, on either backend (the folder or the S3 bucket) ------------------------------------


def stored_thumbnails(app, sha256: str) -> list[int]:
    """The widths of the blob's thumbnails that are in the store."""
    from demo.common.images.rules import THUMBNAIL_WIDTHS

    return [width for width in THUMBNAIL_WIDTHS if app.services.store.exists(sha256, width)]


def stored_objects(settings) -> list[str]:
    """Every object name under the store's root but its deployment id: blobs and thumbnails alike, read
    past the app (the folder walked, or the bucket prefix listed with a client of our own), so a stray
    object the app does not know of shows too."""
    import obstore
    from obstore.store import S3Store

    from demo.common.images.storage import IDENTITY

    if not settings.storage:
        root = Path(settings.media_root)
        found = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        return sorted(name for name in found if name != IDENTITY and not name.startswith("tmp/"))
    bucket, _, prefix = settings.storage.removeprefix("s3://").partition("/")
    config = {"endpoint": settings.s3_endpoint, "region": settings.s3_region or "us-east-1"}
    client = S3Store(bucket, prefix=prefix or None, config=config, client_options={"allow_http": True})
    return sorted(meta["path"] for page in obstore.list(client) for meta in page if meta["path"] != IDENTITY)


def storage_env(storage: dict[str, Any]) -> dict[str, str]:
    """The ``storage`` fixture's settings as a server process's DEMO_* environment."""
    return {f"DEMO_{name.upper()}": str(value) for name, value in storage.items()}
