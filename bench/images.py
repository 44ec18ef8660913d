"""Deterministic, photo-like JPEGs (and one animated GIF) for the benchmark, generated with Pillow
(no files in git).

Photo-like means what a JPEG encoder finds in a photo: smooth colour gradients, a few soft shapes,
and per-pixel sensor-like noise. A flat colour would compress to almost nothing and decode
unrealistically fast; pure noise would be the opposite. The noise level is the knob that brings
each file to its target size; it starts from a calibrated value and is only searched (bisection,
still deterministic) when a different libjpeg lands outside the tolerance.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFilter

KIB, MIB = 1024, 1024 * 1024
TOLERANCE = 0.08  # a file within +-8 % of its target size is accepted as is


@dataclass(frozen=True)
class Spec:
    name: str
    width: int
    height: int
    quality: int
    target_bytes: int
    noise: int  # calibrated starting point, percent of full-scale noise
    seed: int


# small: the delivery benchmarks (a feed/thumbnail-sized photo, what is fetched most often);
# upload: "the 1 MiB JPEG" of the upload benchmark and of the Pillow ceiling (a 3-megapixel photo,
#         what apps typically send after resizing on the phone);
# large: the memory test's 8 MiB upload (a 12-megapixel phone-camera photo at high quality).
SPECS = {
    "small": Spec("small", 640, 480, 85, 45 * KIB, 6, 1),
    "upload": Spec("upload", 2048, 1536, 90, 1 * MIB, 12, 2),
    "large": Spec("large", 4032, 3024, 95, 8 * MIB, 38, 3),
}


def photo(width: int, height: int, seed: int, noise: int) -> Image.Image:
    """Gradients + soft ellipses + noise; the same arguments always give the same pixels."""
    rnd = random.Random(seed)
    gradient = Image.linear_gradient("L")
    channels = [
        gradient.rotate(rnd.uniform(0, 360), resample=Image.Resampling.BILINEAR).resize(
            (width, height), Image.Resampling.BILINEAR
        )
        for _ in range(3)
    ]
    image = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rnd.uniform(0, width), rnd.uniform(0, height)
        r = rnd.uniform(0.05, 0.3) * min(width, height)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rnd.randrange(256) for _ in range(3)))
    image = image.filter(ImageFilter.GaussianBlur(max(1, min(width, height) // 200)))
    grain = Image.frombytes("L", (width, height), rnd.randbytes(width * height))
    grain = grain.point(lambda v: 128 + (v - 128) * noise // 100)
    return ImageChops.add(image, Image.merge("RGB", (grain, grain, grain)), scale=1.0, offset=-128)


def encode(spec: Spec, noise: int) -> bytes:
    out = io.BytesIO()
    photo(spec.width, spec.height, spec.seed, noise).save(out, "JPEG", quality=spec.quality)
    return out.getvalue()


def generate(spec: Spec) -> tuple[bytes, int]:
    """The JPEG bytes for ``spec`` and the noise level used."""
    noise = spec.noise
    data = encode(spec, noise)
    low, high = 0, 100
    for _ in range(8):  # size grows with noise: bisect towards the target
        if abs(len(data) - spec.target_bytes) <= TOLERANCE * spec.target_bytes:
            break
        if len(data) < spec.target_bytes:
            low = noise
        else:
            high = noise
        noise = (low + high) // 2
        if noise in (low, high):
            break
        data = encode(spec, noise)
    return data, noise


# The memory test's animated case: a GIF of the shape chat apps send (480x270, 5 s at 24 frames a
# second: 15.6 M pixels decoded, just inside the default max_animation_pixels), every frame different.
ANIMATION = {"width": 480, "height": 270, "frames": 120, "duration_ms": 42}


def animation() -> bytes:
    """A photo panning sideways, 2 pixels a frame, as a looping GIF."""
    width, height, frames = ANIMATION["width"], ANIMATION["height"], ANIMATION["frames"]
    scene = photo(width + 2 * frames, height, seed=4, noise=2).quantize(64)  # one palette for all frames
    pictures = [scene.crop((2 * n, 0, 2 * n + width, height)) for n in range(frames)]
    out = io.BytesIO()
    pictures[0].save(out, "GIF", save_all=True, append_images=pictures[1:], duration=ANIMATION["duration_ms"], loop=0)
    return out.getvalue()


def with_comment(gif: bytes, text: str) -> bytes:
    """The same GIF with a comment block after its colour table: other bytes (so never a known
    upload, which would not be decoded), the same pixels."""
    flags = gif[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    note = text.encode()[:255]
    return gif[:at] + b"\x21\xfe" + bytes([len(note)]) + note + b"\x00" + gif[at:]
