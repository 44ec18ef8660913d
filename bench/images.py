"""Deterministic, photo-like JPEGs for the benchmark, generated with Pillow (no files in git).

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
    channels = [gradient.rotate(rnd.uniform(0, 360), resample=Image.Resampling.BILINEAR)
                .resize((width, height), Image.Resampling.BILINEAR) for _ in range(3)]
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
