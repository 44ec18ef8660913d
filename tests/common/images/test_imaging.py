"""imaging: what an upload is re-encoded into (formats, orientation, transparency, animation, colour
profiles, metadata gone) and its thumbnails; limits refused before any decode. No HTTP: the functions
the upload and delivery call, called here directly.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import ExifTags, ImageCms, PngImagePlugin
from PIL import Image as PILImage

from demo.common.errors import InvalidImage
from demo.common.images import imaging
from demo.conf import settings as config

from .support import (
    MIB,
    encode,
    gif_of,
    gradient,
    jpeg,
    open_image,
)

MAX_PIXELS = 40_000_000
MAX_ANIMATION_PIXELS = config.defaults().max_animation_pixels


@dataclass
class Served:
    mime: str
    body: bytes


class Made:
    """What an upload of ``data`` is made into: measured and refused before any decode as the upload
    does (``measure_upload``), then re-encoded (``process_upload``); its fields as the image record
    shows them (``image["format"]``), and what delivery serves of it (``served(width)``: the file, or a
    thumbnail made from it, never upscaled)."""

    def __init__(self, data: bytes, folder: Path) -> None:
        imaging.measure_upload(data, MAX_PIXELS, MAX_ANIMATION_PIXELS)
        self.image = imaging.process_upload(data, str(folder), MAX_PIXELS, MAX_ANIMATION_PIXELS)
        assert self.image.path is not None
        self.path = Path(self.image.path)
        self.folder = folder

    def __getitem__(self, field: str) -> Any:
        return getattr(self.image, field)

    @property
    def body(self) -> bytes:
        return self.path.read_bytes()

    def served(self, width: int | None = None) -> Served:
        mime = imaging.MIME_TYPES[self.image.format]
        if width is None or width >= self.image.width:
            return Served(mime, self.body)
        thumbnail = self.folder / f"{self.image.sha256}-w{width}"
        imaging.make_thumbnail(str(self.path), self.image.format, width, str(thumbnail))
        return Served(mime, thumbnail.read_bytes())


def made(data: bytes, folder: Path) -> Made:
    return Made(data, folder)


# -- upload: formats and re-encoding ---------------------------------------------------------------


def test_jpeg_with_gps_and_orientation_6_is_stored_upright_without_exif(tmp_path):
    exif = PILImage.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "PhoneCo"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps.update({1: "N", 2: (39.0, 54.0, 27.0), 3: "E", 4: (116.0, 23.0, 0.0)})
    data = jpeg((80, 40), exif=exif, comment=b"secret comment")
    original = open_image(data)
    assert original.getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the test image really carries GPS

    image = made(data, tmp_path)
    assert (image["width"], image["height"]) == (40, 80)  # orientation applied: upright
    served = image.body
    stored = open_image(served)
    assert stored.size == (40, 80)
    assert dict(stored.getexif()) == {}
    assert not stored.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert "exif" not in stored.info and "comment" not in stored.info
    assert b"PhoneCo" not in served and b"secret comment" not in served


def test_png_alpha_is_kept(tmp_path):
    im = PILImage.new("RGBA", (50, 40), (255, 0, 0, 0))
    im.putpixel((5, 5), (0, 255, 0, 128))
    image = made(encode(im, "PNG"), tmp_path)
    stored = open_image(image.body)
    assert image["format"] == "png" and stored.mode == "RGBA"
    assert stored.getpixel((5, 5)) == (0, 255, 0, 128) and stored.getpixel((0, 0))[3] == 0


def test_animated_gif_keeps_its_frames(tmp_path):
    frames = [PILImage.new("P", (40, 30), i) for i in range(3)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=120, loop=0)
    image = made(data, tmp_path)
    assert image["format"] == "gif" and imaging.EXTENSIONS[image["format"]] == "gif"
    stored = open_image(image.body)
    assert stored.format == "GIF" and stored.n_frames == 3


def test_cmyk_jpeg_is_accepted_and_served_as_rgb(tmp_path):
    data = encode(PILImage.new("CMYK", (40, 30), (0, 100, 200, 10)), "JPEG")
    assert open_image(data).mode == "CMYK"
    image = made(data, tmp_path)
    stored = open_image(image.body)
    assert image["format"] == "jpeg" and stored.mode == "RGB" and stored.size == (40, 30)


def test_16_bit_png_is_accepted(tmp_path):
    im = PILImage.new("I;16", (60, 40))
    im.putdata([(i * 37) % 65536 for i in range(60 * 40)])
    data = encode(im, "PNG")
    assert open_image(data).mode.startswith("I;16")
    image = made(data, tmp_path)
    assert image["format"] == "png" and (image["width"], image["height"]) == (60, 40)
    assert open_image(image.body).size == (60, 40)


def test_icc_profile_is_kept(tmp_path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = jpeg((64, 48), icc_profile=icc)
    assert open_image(data).info["icc_profile"] == icc
    image = made(data, tmp_path)
    assert open_image(image.body).info.get("icc_profile") == icc


def test_script_appended_after_a_valid_jpeg_is_cut_off_by_re_encoding(tmp_path):
    data = jpeg() + b"<script>alert(document.cookie)</script>"
    image = made(data, tmp_path)
    served = image.body
    assert b"<script" not in served and served.endswith(b"\xff\xd9")
    assert image["sha256"] != hashlib.sha256(data).hexdigest()
    assert open_image(served).size == (64, 48)


# -- what phones and editors really send: multi-picture JPEG, APNG, palette transparency -------------


def alpha_at(im: PILImage.Image, xy: tuple[int, int], frame: int = 0) -> int:
    im.seek(frame)
    return im.convert("RGBA").getpixel(xy)[3]


def test_multi_picture_jpeg_is_stored_as_a_plain_jpeg(tmp_path):
    """Phone cameras write MPO (a JPEG plus depth or preview pictures): the main picture is what counts."""
    main, extra = gradient((60, 40)), PILImage.new("RGB", (60, 40), (0, 0, 200))
    data = encode(main, "MPO", save_all=True, append_images=[extra])
    assert open_image(data).n_frames == 2
    image = made(data, tmp_path)
    assert image["format"] == "jpeg" and (image["width"], image["height"]) == (60, 40)
    served = image.served()
    stored = open_image(served.body)
    assert served.mime == "image/jpeg"
    assert stored.format == "JPEG" and getattr(stored, "n_frames", 1) == 1  # JPEG bytes, not another format


def test_animated_png_stays_an_animated_png(tmp_path):
    frames = []
    for i in range(3):
        frame = PILImage.new("RGBA", (200, 100), (0, 0, 0, 0))
        frame.paste((255, 0, 0, 255), (50 * i, 20, 50 * i + 50, 80))
        frames.append(frame)
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = made(data, tmp_path)
    assert image["format"] == "png"
    for asked, width in ((None, 200), (160, 160)):
        served = image.served(asked)
        assert served.mime == "image/png"
        stored = open_image(served.body)
        assert stored.format == "PNG" and stored.n_frames == 3 and stored.width == width
        assert alpha_at(stored, (0, 0), frame=2) == 0


def palette_image(size: tuple[int, int] = (200, 100)) -> PILImage.Image:
    """Index 0 (the background) is the transparent colour; a red square in the middle."""
    im = PILImage.new("P", size, 0)
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    im.paste(1, (50, 25, 150, 75))
    return im


@pytest.mark.parametrize(
    "kind", ["png-palette", "png-palette-alpha-table", "png-rgb-colour-key", "gif", "gif-animated"]
)
def test_transparency_of_palette_and_colour_key_images_is_kept(tmp_path, kind):
    if kind == "png-palette":
        data, mime = encode(palette_image(), "PNG", transparency=0), "image/png"
    elif kind == "png-palette-alpha-table":
        data, mime = encode(palette_image(), "PNG", transparency=b"\x00\xff"), "image/png"
    elif kind == "png-rgb-colour-key":
        im = PILImage.new("RGB", (200, 100), (0, 0, 0))
        im.paste((255, 0, 0), (50, 25, 150, 75))
        data, mime = encode(im, "PNG", transparency=(0, 0, 0)), "image/png"
    elif kind == "gif":
        data, mime = encode(palette_image(), "GIF", transparency=0), "image/gif"
    else:
        frames = [palette_image() for _ in range(3)]
        for i, frame in enumerate(frames):
            frame.paste(2, (10 * i, 0, 10 * i + 5, 5))
        data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=0, duration=100, loop=0)
        mime = "image/gif"
    original = open_image(data)
    assert alpha_at(original, (0, 99)) == 0 and alpha_at(original, (100, 50)) == 255
    image = made(data, tmp_path)
    for asked, scale in ((None, 1), (160, 0.8)):
        served = image.served(asked)
        assert served.mime == mime
        stored = open_image(served.body)
        frames = getattr(stored, "n_frames", 1)
        assert frames == (3 if kind == "gif-animated" else 1)
        for frame in range(frames):
            assert alpha_at(stored, (0, int(99 * scale)), frame) == 0, (asked, frame)  # still see-through
            assert alpha_at(stored, (int(100 * scale), int(50 * scale)), frame) == 255, (asked, frame)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "gif", "webp"])
def test_exif_xmp_and_text_metadata_are_gone_in_every_format(tmp_path, fmt):
    exif = PILImage.Exif()
    exif[ExifTags.Base.Make] = "PhoneCo"
    exif.get_ifd(ExifTags.IFD.GPSInfo).update({1: "N", 2: (39.0, 54.0, 27.0)})
    im = gradient((60, 40))
    options: dict[str, Any] = {"exif": exif}
    if fmt == "png":
        text = PngImagePlugin.PngInfo()
        text.add_text("Comment", "PhoneCo owner")
        options["pnginfo"] = text
    if fmt in ("jpeg", "webp"):
        options["xmp"] = b"<x:xmpmeta>PhoneCo owner</x:xmpmeta>"
    if fmt == "gif":
        im, options = im.convert("P"), {"comment": b"PhoneCo owner"}
    data = encode(im, fmt.upper(), **options)
    assert b"PhoneCo" in data
    image = made(data, tmp_path)
    served = image.body
    assert b"PhoneCo" not in served
    stored = open_image(served)
    assert dict(stored.getexif()) == {} and stored.format == fmt.upper()


def test_decoding_reuses_image_memory_up_to_the_decode_budget(app, tmp_path):
    """Pillow keeps freed image blocks for the next decode (no fresh calloc, zeroing and page faults
    under the GIL), and keeps no more than decoding the budget's pixels at once needs."""
    core = PILImage.core
    budget_bytes = app.services.images.rules.decode_budget * 4
    assert budget_bytes <= core.get_blocks_max() * core.get_block_size() < budget_bytes + core.get_block_size()
    src = tmp_path / "photo.jpg"
    src.write_bytes(jpeg((1024, 768)))
    os.unlink(imaging.process_upload(str(src), str(tmp_path), 40_000_000, MAX_ANIMATION_PIXELS).path)
    before = core.get_stats()
    os.unlink(imaging.process_upload(str(src), str(tmp_path), 40_000_000, MAX_ANIMATION_PIXELS).path)
    after = core.get_stats()
    assert after["reused_blocks"] > before["reused_blocks"]
    assert after["allocated_blocks"] == before["allocated_blocks"]


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
    tags = [
        (b"desc", desc),
        (b"wtpt", b"XYZ \0\0\0\0" + s15(0.9642) + s15(1.0) + s15(0.8249)),
        (b"rXYZ", xyz[0]),
        (b"gXYZ", xyz[1]),
        (b"bXYZ", xyz[2]),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text\0\0\0\0none\0"),
    ]
    if padding:
        tags.append((b"zzzz", b"zzzz\0\0\0\0" + b"\0" * padding))
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + b"\x02\x10\x00\x00"
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 24
        + b"\0\0\0\0"
        + s15(0.9642)
        + s15(1.0)
        + s15(0.8249)
        + b"\0" * 48
    )
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


def served_profiles(image: Made) -> list[bytes | None]:
    """The profile of the image as served and of its thumbnail."""
    return [open_image(image.served(width).body).info.get("icc_profile") for width in (None, 160)]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_profile_that_is_not_icc_is_dropped(tmp_path, fmt):
    image = made(with_profile(fmt, junk_profile(fmt)), tmp_path)
    assert served_profiles(image) == [None, None]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("kind", ["sRGB", "Display P3"])
def test_a_real_small_profile_is_kept_byte_for_byte(tmp_path, fmt, kind):
    profile = (
        ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        if kind == "sRGB"
        else rgb_profile(DISPLAY_P3, 2.2)
    )
    ImageCms.ImageCmsProfile(io.BytesIO(profile))  # a real profile
    image = made(with_profile(fmt, profile), tmp_path)
    assert served_profiles(image) == [profile, profile]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_bytes_after_a_real_profile_are_not_kept(tmp_path, fmt):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    smuggled = profile + junk_profile("PNG")[:40_000]
    ImageCms.ImageCmsProfile(io.BytesIO(smuggled))  # parses as ICC all the same
    image = made(with_profile(fmt, smuggled), tmp_path)
    assert served_profiles(image) == [profile, profile]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_real_but_oversized_profile_is_applied_to_the_pixels_and_dropped(tmp_path, fmt):
    # Display P3 primaries with a linear curve: far from sRGB, so the conversion shows in the pixels.
    profile = rgb_profile(DISPLAY_P3, 1.0, padding=imaging.MAX_ICC_BYTES)
    assert len(profile) > imaging.MAX_ICC_BYTES
    original = PILImage.new("RGB", (400, 200), (120, 60, 30))
    expected = ImageCms.profileToProfile(
        original, ImageCms.ImageCmsProfile(io.BytesIO(profile)), ImageCms.createProfile("sRGB")
    ).getpixel((0, 0))
    image = made(encode(original, fmt, icc_profile=profile), tmp_path)
    assert served_profiles(image) == [None, None]
    served = open_image(image.body).convert("RGB").getpixel((0, 0))
    assert served != (120, 60, 30)
    assert all(abs(a - b) <= 3 for a, b in zip(served, expected, strict=True)), (served, expected)  # JPEG: +-1 or 2


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_animation_keeps_a_real_profile_and_drops_junk(tmp_path, fmt):
    frames = [gradient((200, 100)).rotate(angle) for angle in (0, 180)]
    profile = rgb_profile(DISPLAY_P3, 2.2)
    for icc, kept in ((profile, profile), (junk_profile(fmt), None)):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, icc_profile=icc)
        image = made(data, tmp_path)
        assert served_profiles(image) == [kept, kept]
