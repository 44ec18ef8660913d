"""Image checks and re-encoding with Pillow. Blocking by nature: callers run these on a thread pool.

An upload is trusted only after it has been identified by its bytes (not its name or Content-Type),
fully decoded within a pixel budget, and re-encoded: orientation applied, EXIF/GPS/XMP/comments gone,
a real ICC colour profile kept (see _Colour), animation kept.

An animation is decoded one frame at a time and handed to Pillow's writer as it comes (see _Frames);
what the writer itself keeps until the file is written is counted by ``measure_upload``/``thumbnail_cost``,
which the caller reserves from its decode budget before calling in.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from demo.common.errors import InvalidImage, UnsupportedMediaType
from demo.common.i18n import N_

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
# What Pillow's writers keep of every frame until the whole file is written (a frame identical to the
# one before it is merged; we count the worst case, every frame different), in bytes per pixel. Its APNG
# writer keeps each frame in the output mode (RGBA at most); its GIF writer each as a palette image, but
# quantizing each frame leaves holes in the heap between them (figures: bench/README.md). Its
# WebP writer makes a list of the frames it is given, but encodes a multi-frame source image one frame
# at a time: an upload's WebP is handed over as it is (STREAMED); a thumbnail's resized frames are not.
HELD_BYTES = 4
STREAMED = {"webp"}
# Beside them, at source size: the decoder's frame and the one before it (disposal), a converted copy,
# and the writer's working frame (the difference with the previous one, or libwebp's canvases).
WORKING_FRAMES = 4
# A profile is kept (as re-serialised) only if it parses as ICC and is at most this long. Real
# camera and display profiles (sRGB, Display P3, Adobe RGB) are 0.5-4 KB; a printer's with big lookup
# tables can reach a few hundred KB, which no screen needs: those are applied (the pixels converted to
# sRGB) and not kept.
# Every byte kept is served with every copy of the image and its thumbnails.
MAX_ICC_BYTES = 64 * 1024
JPEG_QUALITY = 85
# Pillow feeds its codecs 64 KiB at a time and takes the GIL back between blocks, each time perhaps
# waiting up to the switch interval for a thread running Python (the event loop), which slows the
# re-encoding beside a busy loop (bench/README.md). 1 MiB blocks make that one or two hand-backs per
# image, for 1 MiB of buffer per codec at work.
ImageFile.MAXBLOCK = 1024 * 1024
# Pillow warns (rather than fails) between 1x and 2x its pixel limit: treat that as the error it is.
warnings.simplefilter("error", Image.DecompressionBombWarning)

# Errors Pillow raises for corrupt, truncated or hostile files.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


@dataclass(frozen=True)
class ProcessedImage:
    path: str | None  # the re-encoded file, a temp file in the caller's folder (None: a blob stored before)
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


def measure_upload(src: str | bytes, max_pixels: int, max_animation_pixels: int) -> int:
    """The decode budget ``process_upload(src)`` needs (see ``_cost``), from the header only; InvalidImage
    when the image is over a limit; 0 if unreadable (process_upload then says why). Nothing is decoded,
    but a GIF's frames are counted by walking the file: not for the event loop."""
    fmt = sniff_format(_head(src))
    if fmt is None:
        return 0
    try:
        with Image.open(_readable(src), formats=[PILLOW_NAMES[fmt]]) as im:
            frames = _check_limits(im, fmt, max_pixels, max_animation_pixels)
            streamed = fmt in STREAMED and not _Colour(im.info.get("icc_profile")).converts
            return _cost(im.width * im.height, im.width * im.height, frames, streamed)
    except InvalidImage:
        raise
    except Exception:  # noqa: BLE001 - any failure is reported properly by process_upload
        return 0


def thumbnail_cost(src: str | IO[bytes], fmt: str, width: int) -> int:
    """The decode budget ``make_thumbnail(src, fmt, width, ...)`` needs, from the header only (``src``:
    a path or a seekable file, left open)."""
    with Image.open(src, formats=[PILLOW_NAMES[fmt]]) as im:
        frames = _frame_count(im, fmt)
        size = _thumbnail_size(im.size, width)
        if frames == 1 and fmt == "jpeg":
            im.draft(im.mode, size)  # what make_thumbnail decodes
        return _cost(im.width * im.height, size[0] * size[1], frames, streamed=False)


def configure(max_pixels: int, decode_budget: int) -> None:
    """Pillow's own bomb check (at open, before our explicit one) uses the same pixel limit; and Pillow
    keeps the freed blocks of image memory that ``decode_budget`` pixels decoding at once need.

    Why keep them? Without the cache each decode callocs ~4 bytes per pixel afresh, and since image
    work trims the heaps after itself (memory.trims_after) that means zeroing and faulting in every
    page again, partly under the GIL, which slows re-encoding (figures: bench/README.md, "Figures
    behind comments in the code"). Reused blocks cost a memset; the cache is bounded by the decode budget, memory the
    server holds at its peak anyway.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    core: Any = Image.core  # type: ignore[attr-defined]  # Pillow's C module: its block cache is not typed
    core.set_blocks_max(math.ceil(decode_budget * 4 / core.get_block_size()))


def process_upload(src: str | bytes, work_dir: str, max_pixels: int, max_animation_pixels: int) -> ProcessedImage:
    """Check ``src`` (a path, or the file's bytes) and write its re-encoded form to a new file in
    ``work_dir``. Every frame is decoded (a truncated file fails), one at a time."""
    head = _head(src)
    if not head:
        raise InvalidImage(N_("The upload is empty."), field="image")
    fmt = sniff_format(head)
    if fmt is None:
        raise UnsupportedMediaType(field="image")
    try:
        with Image.open(_readable(src), formats=[PILLOW_NAMES[fmt]]) as im:
            frames = _check_limits(im, fmt, max_pixels, max_animation_pixels)
            # Not fsynced here: the store does that if it keeps the file (a duplicate never is), and
            # this thread moves on to the next decode instead of waiting for the disk.
            out = _write_temp(work_dir, lambda fp: _encode(im, frames, fmt, fp), durable=False)
            # What was written: orientation applied (in place), so no need to reopen the output.
            width, height = im.size
    except (InvalidImage, UnsupportedMediaType):
        raise
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the disk is full, the image may be fine: not the client's fault (507)
        raise InvalidImage(field="image") from None
    except UnidentifiedImageError:
        raise InvalidImage(N_("The file claims to be an image but cannot be read."), field="image") from None
    except DECODE_ERRORS:
        raise InvalidImage(field="image") from None
    return ProcessedImage(out, file_sha256(out), fmt, width, height, os.path.getsize(out))


def make_thumbnail(src: str | IO[bytes], fmt: str, width: int, dst: str) -> None:
    """Write a ``width``-wide copy of the stored image ``src`` (a path, or a seekable file: Pillow
    reads from its start and leaves it open) to ``dst`` (atomically, same format)."""
    with Image.open(src, formats=[PILLOW_NAMES[fmt]]) as im:
        size = _thumbnail_size(im.size, width)
        colour = _Colour(im.info.get("icc_profile"))
        if _frame_count(im, fmt) > 1:
            out = _write_temp(os.path.dirname(dst), lambda fp: _save_animation(im, fmt, fp, colour, size))
        else:
            if fmt == "jpeg":
                im.draft(im.mode, size)  # decode at a reduced scale: far less memory and time
            source = im.convert("RGBA") if "transparency" in im.info else im  # resize alpha, not colour keys
            small = source.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            out = _write_temp(os.path.dirname(dst), lambda fp: _save_still(small, fmt, fp, colour))
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


def _head(src: str | bytes) -> bytes:
    if isinstance(src, bytes):
        return src[:16]
    with open(src, "rb") as f:
        return f.read(16)


def _frame_count(im: Image.Image, fmt: str | None) -> int:
    """A JPEG is never an animation: a multi-picture JPEG (MPO, as phone cameras write) is stored as
    its first, main picture."""
    return 1 if fmt == "jpeg" else getattr(im, "n_frames", 1)


def _gif_frames(fp: IO[bytes], size: tuple[int, int], limit: int) -> int:
    """The frames of the GIF in ``fp`` (counting stops past ``limit``); InvalidImage if one reaches
    past the canvas. Why not Pillow's ``n_frames``: it walks every frame (a small file can hold hundreds
    of thousands, each walked under the GIL; bench/README.md) and takes the canvas for the image's
    size, but its decoder grows the image to fit a bigger frame: a 10x10 canvas with 4000x4000 frames
    would pass every limit. Read like Pillow reads it: blocks, skipping unknown bytes; nothing decoded.
    The file position is restored."""
    position = fp.tell()
    try:
        fp.seek(10)
        flags = fp.read(3)[0]
        if flags & 128:
            fp.seek(3 << ((flags & 7) + 1), os.SEEK_CUR)  # the global palette
        frames = 0
        while frames <= limit:
            tag = fp.read(1)
            if not tag or tag == b";":
                break
            if tag == b"!":
                fp.read(1)  # the extension's label
                _skip_sub_blocks(fp)
            elif tag == b",":
                descriptor = fp.read(9)
                if len(descriptor) < 9:
                    break
                x, y, width, height, local = struct.unpack("<HHHHB", descriptor)
                if x + width > size[0] or y + height > size[1]:
                    raise InvalidImage(N_("A frame of the animation is larger than its canvas."), field="image")
                if local & 128:
                    fp.seek(3 << ((local & 7) + 1), os.SEEK_CUR)  # the frame's palette
                fp.read(1)  # LZW code size
                _skip_sub_blocks(fp)
                frames += 1
        return frames
    finally:
        fp.seek(position)


def _skip_sub_blocks(fp: IO[bytes]) -> None:
    while (length := fp.read(1)) and length[0]:
        fp.seek(length[0], os.SEEK_CUR)


def _check_limits(im: ImageFile.ImageFile, fmt: str | None, max_pixels: int, max_animation_pixels: int) -> int:
    """The number of frames, once the image is known to fit the limits."""
    width, height = im.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidImage(N_("The image is larger than {limit} pixels."), field="image", params={"limit": max_pixels})
    if fmt == "gif":
        assert im.fp is not None  # an image opened from a file, not yet closed
        frames = _gif_frames(im.fp, im.size, MAX_FRAMES)
    else:
        frames = _frame_count(im, fmt)
    if frames > MAX_FRAMES:
        raise InvalidImage(N_("The animation has too many frames."), field="image")
    if frames > 1 and frames * width * height > max_animation_pixels:
        raise InvalidImage(
            N_("The animation is larger than {limit} pixels in all its frames."),
            field="image",
            params={"limit": max_animation_pixels},
        )
    return frames


def _cost(source: int, out: int, frames: int, streamed: bool) -> int:
    """Pixels of 4 bytes held at the peak while ``frames`` frames of ``source`` pixels are decoded and
    written as frames of ``out`` pixels: a still is its own size; an animation what the writer keeps
    (HELD_BYTES per pixel of every frame, none when STREAMED) and the frames at work (WORKING_FRAMES)."""
    if frames == 1:
        return source
    held = 0 if streamed else HELD_BYTES * out * frames // 4
    return held + WORKING_FRAMES * source


def _thumbnail_size(size: tuple[int, int], width: int) -> tuple[int, int]:
    return width, max(1, round(size[1] * width / size[0]))


class _Colour:
    """What becomes of an image's ICC profile. Kept (re-serialised), if it parses as ICC and is at
    most MAX_ICC_BYTES. Applied, if it parses but is bigger: the pixels are converted to sRGB and the
    profile dropped. Dropped, if it is not ICC at all (anything can hide in those bytes: HTML, a ZIP):
    the pixels are then taken as sRGB, as for an image without a profile."""

    SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))

    def __init__(self, icc: bytes | None) -> None:
        self.keep: bytes | None = None
        self._source: ImageCms.ImageCmsProfile | None = None
        self._transforms: dict[tuple[str, str], ImageCms.ImageCmsTransform] = {}  # per mode: frames share
        if not icc:
            return
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            # As LittleCMS writes it out again: its header and tags, not what followed them (a real
            # profile then 40 KB of HTML parses as ICC). Real profiles come back byte for byte.
            serialised = profile.tobytes()
        except (OSError, ImageCms.PyCMSError, TypeError, ValueError):
            return
        if len(serialised) <= MAX_ICC_BYTES:
            self.keep = serialised
        else:
            self._source = profile

    @property
    def converts(self) -> bool:
        return self._source is not None

    @property
    def options(self) -> dict[str, Any]:
        """The writer's options for the profile."""
        return {"icc_profile": self.keep} if self.keep else {}

    def apply(self, im: Image.Image) -> Image.Image:
        if self._source is None:
            return im
        mode = "RGBA" if im.has_transparency_data else "RGB"
        if im.mode not in ("RGB", "RGBA", "L", "CMYK"):
            im = im.convert(mode)
        try:
            transform = self._transforms.get((im.mode, mode))
            if transform is None:
                transform = self._transforms[(im.mode, mode)] = ImageCms.buildTransform(
                    self._source, self.SRGB, im.mode, mode
                )
            out = ImageCms.applyTransform(im, transform)
        except ImageCms.PyCMSError:
            return im  # the profile does not describe these pixels (say, grey for colour): taken as sRGB
        assert out is not None  # a new image (None only when converting in place)
        out.info = {}
        return out


class _Frames:
    """An animation's frames for Pillow's writer, decoded and converted one at a time as it asks for
    them, never all at once: ``first()``, then the rest by iterating (``append_images``). Iterable more
    than once: Pillow's APNG writer reads the frames twice (their modes, then their pixels).

    Frames with a transparent colour become RGBA, so the writer keeps it; resized frames (``size``)
    are RGBA too. A frame carries only its duration (the writers take it from there): no metadata."""

    def __init__(self, im: Image.Image, colour: _Colour, size: tuple[int, int] | None = None) -> None:
        self.im, self.colour, self.size = im, colour, size

    def first(self) -> Image.Image:
        return self._frame(0)

    def __iter__(self) -> Iterator[Image.Image]:
        for index in range(1, _frame_count(self.im, None)):
            yield self._frame(index)

    def _frame(self, index: int) -> Image.Image:
        _seek_within_canvas(self.im, index)
        source = self.im
        frame = source.convert("RGBA") if self.size or "transparency" in source.info else source.copy()
        if self.size:
            frame = frame.resize(self.size, Image.Resampling.LANCZOS)
        frame = self.colour.apply(frame)
        frame.info = {"duration": source.info.get("duration", 100)}
        return frame


def _encode(im: Image.Image, frames: int, fmt: str, fp: IO[bytes]) -> None:
    colour = _Colour(im.info.get("icc_profile"))
    if frames > 1:
        _save_animation(im, fmt, fp, colour)
        return
    # In place: without it Pillow copies the whole decoded image even when nothing needs turning.
    ImageOps.exif_transpose(im, in_place=True)
    _save_still(im, fmt, fp, colour)


def _save_still(im: Image.Image, fmt: str, fp: IO[bytes], colour: _Colour) -> None:
    # Only what we pass here is written: EXIF, XMP, comments and text chunks stay behind.
    im = colour.apply(im)
    transparency = im.info.get("transparency")  # a transparent palette entry or colour key is pixels
    im.info = {}
    options: dict[str, Any] = dict(colour.options)
    if transparency is not None and fmt in ("png", "gif"):
        options["transparency"] = transparency
    if fmt == "jpeg":
        if im.mode not in ("RGB", "L"):
            # CMYK/YCCK JPEGs render badly in many app decoders; its ICC profile describes CMYK, so drop it.
            if im.mode == "CMYK":
                options.pop("icc_profile", None)
            im = im.convert("RGB")
        # Baseline, not progressive+optimize: those buffer every DCT coefficient of the image and encode
        # several times slower, for a file only slightly smaller (bench/README.md).
        im.save(fp, "JPEG", quality=JPEG_QUALITY, **options)
    elif fmt == "png":
        im.save(fp, "PNG", compress_level=6, **options)
    elif fmt == "gif":
        im.save(fp, "GIF", **options)
    else:
        im.save(fp, "WEBP", quality=JPEG_QUALITY, method=4, **options)


def _save_animation(
    im: Image.Image, fmt: str, fp: IO[bytes], colour: _Colour, size: tuple[int, int] | None = None
) -> None:
    """Write the animation ``im`` (resized to ``size``) frame by frame; see HELD_BYTES for what the
    writer keeps meanwhile."""
    options = {"save_all": True, "loop": im.info.get("loop", 0), **colour.options}
    if fmt in STREAMED and size is None and not colour.converts:
        # The source itself: the writer decodes and encodes one frame at a time. It wants the
        # durations first, which a WebP frame only tells once decoded: one more pass, one frame held.
        durations = [frame.info.get("duration", 100) for frame in _decoded(im)]
        im.save(fp, "WEBP", quality=JPEG_QUALITY, method=4, duration=durations, **options)
        return
    frames = _Frames(im, colour, size)
    first = frames.first()
    if fmt == "gif":
        first.save(fp, "GIF", disposal=2, append_images=frames, **options)
    elif fmt == "png":
        first.save(fp, "PNG", compress_level=6, append_images=frames, **options)  # APNG
    elif fmt == "webp":
        first.save(fp, "WEBP", quality=JPEG_QUALITY, method=4, append_images=frames, **options)
    else:
        raise ValueError(f"no animated {fmt}")  # never write one format's bytes under another's name


def _decoded(im: Image.Image) -> Iterator[Image.Image]:
    for index in range(_frame_count(im, None)):
        _seek_within_canvas(im, index)
        im.load()
        yield im


def _seek_within_canvas(im: Image.Image, index: int) -> None:
    """Seek to frame ``index``, refusing a frame that made the image grow: the limits and the decode
    budget were reckoned for the size seen at open (``_gif_frames`` refuses such a GIF before)."""
    size = im.size
    im.seek(index)
    if im.size != size:
        raise InvalidImage(N_("A frame of the animation is larger than its canvas."), field="image")


def _write_temp(work_dir: str, write: Callable[[IO[bytes]], None], *, durable: bool = True) -> str:
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
