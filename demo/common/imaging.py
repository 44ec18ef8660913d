"""Image checks and re-encoding with Pillow. Blocking by nature: callers run these on a thread pool.

An upload is trusted only after it has been identified by its bytes (not its name or Content-Type),
fully decoded within a pixel budget, and re-encoded: orientation applied, EXIF/GPS/XMP/comments gone,
ICC colour profile kept, animation kept.
"""
from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import tempfile
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, ImageSequence

from demo.common.errors import InvalidImage, UnsupportedMediaType

# Pillow name -> (contract format, file extension, MIME type)
FORMATS = {
    "JPEG": ("jpeg", "jpg", "image/jpeg"),
    "PNG": ("png", "png", "image/png"),
    "GIF": ("gif", "gif", "image/gif"),
    "WEBP": ("webp", "webp", "image/webp"),
}
EXTENSIONS = {fmt: ext for fmt, ext, _ in FORMATS.values()}
MIME_TYPES = {fmt: mime for fmt, _, mime in FORMATS.values()}
PILLOW_NAMES = {fmt: name for name, (fmt, _, _) in FORMATS.items()}
MAX_FRAMES = 1000
ANIMATION_PIXEL_FACTOR = 4  # all frames together may hold this many times the still-image budget
JPEG_QUALITY = 85
# Pillow feeds its codecs 64 KiB at a time and takes the GIL back between blocks: 16 times per MiB
# decoded, ~10 per re-encode. Each time it may wait up to the switch interval (5 ms) for a thread
# running Python (the event loop): two threads re-encoded 50 uploads/s beside a busy loop instead of
# 58. 1 MiB blocks make that one or two hand-backs per image, for 1 MiB of buffer per codec at work.
ImageFile.MAXBLOCK = 1024 * 1024
# Pillow warns (rather than fails) between 1x and 2x its pixel limit: treat that as the error it is.
warnings.simplefilter("error", Image.DecompressionBombWarning)

# Errors Pillow raises for corrupt, truncated or hostile files.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                 Image.DecompressionBombError, Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ProcessedImage:
    path: str  # the re-encoded file, a temp file in the caller's folder
    sha256: str
    format: str  # jpeg | png | gif | webp
    width: int
    height: int
    bytes: int


def sniff_format(head: bytes) -> str | None:
    """The contract format named by the file's magic bytes, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def decoded_pixels(src: str | bytes) -> int:
    """How many pixels decoding ``src`` (a path, or the file's bytes) will hold (all frames), from its
    header only; 0 if unreadable (process_upload then says why). Nothing is decoded, but an animation's
    frames are counted by walking the file: not for the event loop."""
    try:
        with Image.open(_readable(src)) as im:
            return im.width * im.height * getattr(im, "n_frames", 1)
    except Exception:  # noqa: BLE001 - any failure is reported properly by process_upload
        return 0


def configure(max_pixels: int, decode_budget: int) -> None:
    """Pillow's own bomb check (at open, before our explicit one) uses the same pixel limit; and Pillow
    keeps the freed blocks of image memory that ``decode_budget`` pixels decoding at once need.

    Why keep them? Without the cache each decode callocs ~4 bytes per pixel afresh, and since image
    work trims the heaps after itself (memory.trims_after) that means zeroing and faulting in every
    page again, partly under the GIL: on the benchmark VM two threads re-encoded 36 uploads/s instead
    of 59 (3,164 page faults per 3 MP upload). Reused blocks cost a memset; the cache is bounded by
    the decode budget, memory the server holds at its peak anyway.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    Image.core.set_blocks_max(math.ceil(decode_budget * 4 / Image.core.get_block_size()))


def process_upload(src: str | bytes, work_dir: str, max_pixels: int) -> ProcessedImage:
    """Check ``src`` (a path, or the file's bytes) and write its re-encoded form to a new file in
    ``work_dir``."""
    if isinstance(src, bytes):
        head = src[:16]
    else:
        with open(src, "rb") as f:
            head = f.read(16)
    if not head:
        raise InvalidImage("The upload is empty.", field="image")
    fmt = sniff_format(head)
    if fmt is None:
        raise UnsupportedMediaType(field="image")
    try:
        with Image.open(_readable(src), formats=[PILLOW_NAMES[fmt]]) as im:
            _check_budget(im, max_pixels)
            frames = _decoded_frames(im, fmt)
            # Not fsynced here: the store does that if it keeps the file (a duplicate never is), and
            # this thread moves on to the next decode instead of waiting for the disk.
            out = _write_temp(work_dir, lambda fp: _encode(im, frames, fmt, fp), durable=False)
            # What was written: orientation applied (in place), so no need to reopen the output.
            width, height = frames[0][0].size if frames else im.size
    except (InvalidImage, UnsupportedMediaType):
        raise
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the disk is full, the image may be fine: not the client's fault (507)
        raise InvalidImage(field="image") from None
    except Image.UnidentifiedImageError:
        raise InvalidImage("The file claims to be an image but cannot be read.", field="image") from None
    except DECODE_ERRORS:
        raise InvalidImage(field="image") from None
    return ProcessedImage(out, file_sha256(out), fmt, width, height, os.path.getsize(out))


def make_thumbnail(src: str, fmt: str, width: int, dst: str) -> None:
    """Write a ``width``-wide copy of the stored image ``src`` to ``dst`` (atomically, same format)."""
    with Image.open(src, formats=[PILLOW_NAMES[fmt]]) as im:
        scale = width / im.width
        size = (width, max(1, round(im.height * scale)))
        if getattr(im, "n_frames", 1) > 1:
            frames = [(frame.convert("RGBA").resize(size, Image.Resampling.LANCZOS), frame.info.get("duration", 100))
                      for frame in ImageSequence.Iterator(im)]
            out = _write_temp(os.path.dirname(dst), lambda fp: _save_animation(frames, fmt, fp, im.info))
        else:
            if fmt == "jpeg":
                im.draft(im.mode, size)  # decode at a reduced scale: far less memory and time
            source = im.convert("RGBA") if "transparency" in im.info else im  # resize alpha, not colour keys
            small = source.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            out = _write_temp(os.path.dirname(dst), lambda fp: _save_still(small, fmt, fp, im.info.get("icc_profile")))
    os.replace(out, dst)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- internals ---------------------------------------------------------------------------------------


def _readable(src: str | bytes) -> str | io.BytesIO:
    return io.BytesIO(src) if isinstance(src, bytes) else src  # BytesIO shares the bytes, no copy


def _check_budget(im: Image.Image, max_pixels: int) -> None:
    width, height = im.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidImage(f"The image is larger than {max_pixels} pixels.", field="image")
    frames = getattr(im, "n_frames", 1)
    if frames > MAX_FRAMES or frames * width * height > ANIMATION_PIXEL_FACTOR * max_pixels:
        raise InvalidImage("The animation has too many frames.", field="image")


def _decoded_frames(im: Image.Image, fmt: str) -> list[tuple[Image.Image, int]] | None:
    """Decode everything (a truncated file fails here); for animations, the frames and durations.

    A JPEG is never an animation: a multi-picture JPEG (MPO, as phone cameras write) is stored as its
    first, main picture. Frames with a transparent colour become RGBA, so the encoder keeps it.
    """
    if getattr(im, "n_frames", 1) == 1 or fmt == "jpeg":
        im.load()
        return None
    return [(frame.convert("RGBA") if "transparency" in frame.info else frame.copy(),
             frame.info.get("duration", 100)) for frame in ImageSequence.Iterator(im)]


def _encode(im: Image.Image, frames: list[tuple[Image.Image, int]] | None, fmt: str, fp) -> None:
    if frames is not None:
        _save_animation(frames, fmt, fp, im.info)
        return
    icc = im.info.get("icc_profile")
    # In place: without it Pillow copies the whole decoded image even when nothing needs turning.
    ImageOps.exif_transpose(im, in_place=True)
    _save_still(im, fmt, fp, icc)


def _save_still(im: Image.Image, fmt: str, fp, icc: bytes | None) -> None:
    # Only what we pass here is written: EXIF, XMP, comments and text chunks stay behind.
    transparency = im.info.get("transparency")  # a transparent palette entry or colour key is pixels
    im.info = {}
    options: dict = {"icc_profile": icc} if icc else {}
    if transparency is not None and fmt in ("png", "gif"):
        options["transparency"] = transparency
    if fmt == "jpeg":
        if im.mode not in ("RGB", "L"):
            # CMYK/YCCK JPEGs render badly in many app decoders; its ICC profile describes CMYK, so drop it.
            if im.mode == "CMYK":
                options.pop("icc_profile", None)
            im = im.convert("RGB")
        # Baseline, not progressive+optimize: those buffer every DCT coefficient of the image (tens of
        # MB for a phone photo) and encode 6x slower, for a file about 9% smaller.
        im.save(fp, "JPEG", quality=JPEG_QUALITY, **options)
    elif fmt == "png":
        im.save(fp, "PNG", compress_level=6, **options)
    elif fmt == "gif":
        im.save(fp, "GIF", **options)
    else:
        im.save(fp, "WEBP", quality=JPEG_QUALITY, method=4, **options)


def _save_animation(frames: list[tuple[Image.Image, int]], fmt: str, fp, info: dict) -> None:
    images = [frame for frame, _ in frames]
    for image in images:
        image.info = {}
    options = {
        "save_all": True, "append_images": images[1:], "duration": [d for _, d in frames],
        "loop": info.get("loop", 0),
    }
    if fmt == "gif":
        images[0].save(fp, "GIF", disposal=2, **options)
    elif fmt == "png":
        images[0].save(fp, "PNG", compress_level=6, **options)  # APNG
    elif fmt == "webp":
        images[0].save(fp, "WEBP", quality=JPEG_QUALITY, method=4, **options)
    else:
        raise ValueError(f"no animated {fmt}")  # never write one format's bytes under another's name


def _write_temp(work_dir: str, write, *, durable: bool = True) -> str:
    """Run ``write(fileobj)`` into a new temp file in ``work_dir`` (fsynced if ``durable``); remove it
    on failure."""
    fd, path = tempfile.mkstemp(prefix=f"enc-{os.getpid()}-", suffix=".tmp", dir=work_dir)
    try:
        with os.fdopen(fd, "wb") as fp:
            write(fp)
            if durable:
                fp.flush()
                os.fsync(fp.fileno())
    except BaseException:
        os.unlink(path)
        raise
    return path
