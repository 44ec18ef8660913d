"""Images and memory: animation bombs, the decode budget for uploads and thumbnails, one build per
thumbnail, no second decode of the same upload; and ICC profiles (kept only when real and small).

Memory is measured for real: a server process's peak resident memory (Pillow's C memory included).
"""
from __future__ import annotations

import asyncio
import io
import random
import struct
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage, ImageCms

from demo.common.images import imaging
from demo.common.errors import InvalidImage
from servers import call, free_port, memory, register, reset_peak_memory, start, stop, wait_for
from test_images import (blob_refs, encode, fetch, files, gradient, media, open_image, second_user, upload,
                         uploaded)

gen_test = pytest.mark.gen_test(timeout=120)
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
    return (b"GIF89a" + struct.pack("<HH", *canvas) + palette
            + b"".join(blocks[size] for size in frames) + b";")


def _gif_frame_blocks(size: tuple[int, int], colour: int) -> bytes:
    """One frame's descriptor and image data, cut out of Pillow's single-frame GIF (no extensions)."""
    picture = PILImage.new("P", size, colour)
    picture.putpalette(list(range(256)) * 3)
    data = encode(picture, "GIF")
    start = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 128 else 0)
    assert data[start:start + 1] == b"," and not data[start + 9] & 128  # a descriptor, no frame palette
    return data[start:-1]


# -- animation bombs: a real server's memory -------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """A real server process (one process, SQLite) and a user's token: (port, pid, token)."""
    port = free_port()
    env = {"DEMO_COOKIE_SECRET": "p" * 48, "DEMO_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
           "DEMO_MEDIA_ROOT": str(tmp_path / "media"), "DEMO_SMS_BACKEND": f"file:{tmp_path / 'outbox.jsonl'}",
           "DEMO_SMS_TEST_NUMBERS": "+8618800000001:123456"}
    proc = start(tmp_path, f"--port={port}", "--processes=1", "--log_dir=", env=env)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
        yield port, proc.pid, register(port, "+8618800000001", "123456")
    finally:
        stop(proc)


def peak_growth(pid: int, work) -> int:
    """How far above its resident memory before ``work()`` the process's peak went meanwhile."""
    before = memory(pid, "VmRSS")
    reset_peak_memory(pid)
    work()
    return memory(pid, "VmHWM") - before


def post_image(port: int, token: str, data: bytes, fmt: str) -> tuple[int, Any]:
    return call(port, "POST", "/images", body=data, token=token, headers={"Content-Type": MIME[fmt]}, timeout=60)


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_a_tiny_animation_of_a_thousand_big_frames_is_422_and_the_server_stays_small(server, fmt):
    port, pid, token = server
    bomb = animation(fmt, 1000, (400, 400))  # 160 M pixels decoded, inside the frame and still-image caps
    assert len(bomb) < 80 * 1024

    def twice() -> None:  # the same bytes again cost nothing more either
        for _ in range(2):
            status, body = post_image(port, token, bomb, fmt)
            assert status == 422 and body["error"]["code"] == "invalid_image", body

    grown = peak_growth(pid, twice)
    assert grown < 32 * MIB, f"peak memory grew by {grown / MIB:.0f} MiB"


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


def test_a_frame_that_grows_the_image_is_refused_while_decoding_too(tmp_path):
    """Say a stored file from before the check at upload: its thumbnail is refused, not decoded."""
    src = tmp_path / "grows.gif"
    src.write_bytes(gif_of((10, 10), [(10, 10), (2000, 2000)]))
    with pytest.raises(InvalidImage):
        imaging.make_thumbnail(str(src), "gif", 160, str(tmp_path / "thumb.gif"))


def test_frames_past_the_cap_are_not_counted_one_by_one():
    """400k frames of 1x1 in 6 MB: walking them all holds the GIL for most of a second."""
    many = gif_of((1, 1), [(1, 1)] * 400_000)
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="too many frames"):
        imaging.measure_upload(many, 40_000_000, 16_000_000)
    assert time.perf_counter() - started < 0.1


def test_animations_at_the_cap_uploaded_at_once_and_their_thumbnails_stay_within_the_decode_budget(server):
    """Four different animations of 480x270x120 (15.6 M pixels each, just under the cap), then their
    thumbnails, all at once: the decode budget (16 M pixels, 64 MB) covers what decoding holds."""
    port, pid, token = server
    bodies = [animation("GIF", 120, (480, 270 - n)) for n in range(4)]
    ids: list[str] = []

    def uploads_then_thumbnails() -> None:
        with ThreadPoolExecutor(4) as pool:
            for status, body in pool.map(lambda data: post_image(port, token, data, "GIF"), bodies):
                assert status == 201, body
                ids.append(body["image"]["id"])
            for status, body in pool.map(lambda i: call(port, "GET", f"/images/{i}.gif?w=160"), ids):
                assert status == 200 and open_image(body).n_frames > 1

    grown = peak_growth(pid, uploads_then_thumbnails)
    assert grown < 100 * MIB, f"peak memory grew by {grown / MIB:.0f} MiB"


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
        assert not thumbnail.done() and files(media(app) / "thumbs") == []
    response = await thumbnail
    assert response.code == 200 and open_image(response.body).n_frames > 1


@gen_test
async def test_concurrent_requests_for_a_new_thumbnail_make_it_once_in_one_build(api, user, app, monkeypatch):
    image = await uploaded(api, user.token, animation("GIF", 30, (400, 300)), content_type="image/gif")
    store, builds = app.services.store, []
    make_variant = store.make_variant

    def counting(*args: Any) -> str:
        builds.append(args)  # every call takes a worker thread (and would wait there on the lock file)
        return make_variant(*args)

    monkeypatch.setattr(store, "make_variant", counting)
    responses = await asyncio.gather(*(fetch(api, image["thumbnails"]["320"]) for _ in range(8)))
    assert [r.code for r in responses] == [200] * 8 and len({r.body for r in responses}) == 1
    assert len(builds) == 1


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
        assert {k: image[k] for k in ("sha256", "format", "width", "height", "bytes")} == \
               {k: first[k] for k in ("sha256", "format", "width", "height", "bytes")}
        assert (await fetch(api, image["url"])).code == 200

    # The blob's file gone (whatever the reason): the upload is decoded again and the file is back.
    blob = Path(app.services.store.local_path(first["sha256"]))
    blob.unlink()
    image = await uploaded(api, user.token, data, content_type="image/gif")
    assert len(decoded) == 2 and image["sha256"] == first["sha256"] and blob.exists()
    assert blob_refs(app, first["sha256"]) == 5


@gen_test
async def test_another_users_bytes_are_decoded_so_timing_cannot_tell_they_were_uploaded(api, user, outbox,
                                                                                         monkeypatch):
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


# -- ICC profiles ----------------------------------------------------------------------------------


def s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def rgb_profile(primaries: tuple[tuple[float, float, float], ...], gamma: float, padding: int = 0) -> bytes:
    """A matrix/TRC display profile (ICC v2) written by hand: ``primaries`` are the D50 XYZ of red,
    green and blue; ``padding`` bytes of a private tag make it as big as a printer's."""
    xyz = [b"XYZ \0\0\0\0" + b"".join(s15(v) for v in p) for p in primaries]
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))
    name = b"test profile\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(name)) + name + b"\0" * 8 + b"\0\0\0" + b"\0" * 67
    tags = [(b"desc", desc), (b"wtpt", b"XYZ \0\0\0\0" + s15(0.9642) + s15(1.0) + s15(0.8249)),
            (b"rXYZ", xyz[0]), (b"gXYZ", xyz[1]), (b"bXYZ", xyz[2]),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve), (b"cprt", b"text\0\0\0\0none\0")]
    if padding:
        tags.append((b"zzzz", b"zzzz\0\0\0\0" + b"\0" * padding))
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"lcms" + b"\x02\x10\x00\x00" + b"mntrRGB XYZ " + b"\0" * 12 + b"acsp"
              + b"\0" * 24 + b"\0\0\0\0" + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


DISPLAY_P3 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))


def junk_profile(fmt: str) -> bytes:
    """HTML and a ZIP where the profile should be: 2 MiB in a JPEG; less in a PNG, where Pillow itself
    refuses (422) a profile that inflates to over 1 MiB."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("payload.html", "<script>alert(1)</script>" * 1000)
        z.writestr("payload.bin", random.Random(1).randbytes(2 * MIB if fmt == "JPEG" else MIB // 2))
    return b"<html><body><script>alert(document.cookie)</script></body></html>" + archive.getvalue()


def with_profile(fmt: str, profile: bytes, colour: tuple[int, int, int] = (200, 120, 60)) -> bytes:
    return encode(PILImage.new("RGB", (400, 200), colour), fmt, icc_profile=profile)


async def served_profiles(api, image: dict) -> list[bytes | None]:
    """The profile of the image as served and of its thumbnail."""
    return [open_image((await fetch(api, url)).body).info.get("icc_profile")
            for url in (image["url"], image["thumbnails"]["160"])]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@gen_test
async def test_a_profile_that_is_not_icc_is_dropped(api, user, fmt):
    image = await uploaded(api, user.token, with_profile(fmt, junk_profile(fmt)), content_type=f"image/{fmt.lower()}")
    assert await served_profiles(api, image) == [None, None]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("kind", ["sRGB", "Display P3"])
@gen_test
async def test_a_real_small_profile_is_kept_byte_for_byte(api, user, fmt, kind):
    profile = (ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes() if kind == "sRGB"
               else rgb_profile(DISPLAY_P3, 2.2))
    ImageCms.ImageCmsProfile(io.BytesIO(profile))  # a real profile
    image = await uploaded(api, user.token, with_profile(fmt, profile), content_type=f"image/{fmt.lower()}")
    assert await served_profiles(api, image) == [profile, profile]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@gen_test
async def test_bytes_after_a_real_profile_are_not_kept(api, user, fmt):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    smuggled = profile + junk_profile("PNG")[:40_000]
    ImageCms.ImageCmsProfile(io.BytesIO(smuggled))  # parses as ICC all the same
    image = await uploaded(api, user.token, with_profile(fmt, smuggled), content_type=f"image/{fmt.lower()}")
    assert await served_profiles(api, image) == [profile, profile]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@gen_test
async def test_a_real_but_oversized_profile_is_applied_to_the_pixels_and_dropped(api, user, fmt):
    # Display P3 primaries with a linear curve: far from sRGB, so the conversion shows in the pixels.
    profile = rgb_profile(DISPLAY_P3, 1.0, padding=imaging.MAX_ICC_BYTES)
    assert len(profile) > imaging.MAX_ICC_BYTES
    original = PILImage.new("RGB", (400, 200), (120, 60, 30))
    expected = ImageCms.profileToProfile(original, ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                         ImageCms.createProfile("sRGB")).getpixel((0, 0))
    image = await uploaded(api, user.token, encode(original, fmt, icc_profile=profile),
                           content_type=f"image/{fmt.lower()}")
    assert await served_profiles(api, image) == [None, None]
    served = open_image((await fetch(api, image["url"])).body).convert("RGB").getpixel((0, 0))
    assert served != (120, 60, 30)
    assert all(abs(a - b) <= 3 for a, b in zip(served, expected)), (served, expected)  # JPEG: +-1 or 2


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@gen_test
async def test_an_animation_keeps_a_real_profile_and_drops_junk(api, user, fmt):
    frames = [gradient((200, 100)).rotate(angle) for angle in (0, 180)]
    profile = rgb_profile(DISPLAY_P3, 2.2)
    for icc, kept in ((profile, profile), (junk_profile(fmt), None)):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, icc_profile=icc)
        image = await uploaded(api, user.token, data, content_type=MIME[fmt])
        assert await served_profiles(api, image) == [kept, kept]
