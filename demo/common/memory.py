"""Keep big, short-lived buffers (decoded images) out of the malloc heaps that never shrink."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("demo")
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 256 * 1024


def return_large_buffers_to_the_os() -> bool:
    """glibc raises its mmap threshold after each large free (up to 32 MiB), so Pillow's 16 MiB image
    blocks end up in per-thread heaps that keep their memory: RSS grew by ~100 MiB after four 12 MP
    uploads. A fixed threshold keeps every buffer >= 256 KiB mmapped and unmapped on free."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("mallopt unavailable; malloc left as it is")
        return False
