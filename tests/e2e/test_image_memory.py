"""Images and memory, end to end: animation bombs and the decode budget, measured on a real server
process's peak resident memory (Pillow's C memory included), on both image stores (an S3 thumbnail
build downloads its original to a temp file: that must not cost memory either).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.common.images.support import (
    MIB,
    MIME,
    animation,
    open_image,
    storage_env,
)
from tests.helpers import call, free_port, memory, register, reset_peak_memory, start, stop, wait_for

gen_test = pytest.mark.gen_test(timeout=120)


# -- animation bombs: a real server's memory -------------------------------------------------------


@pytest.fixture
def server(tmp_path, storage):
    """A real server process (one process, SQLite, the test's image store) and a user's token: (port, pid, token)."""
    port = free_port()
    env = {
        "DEMO_COOKIE_SECRET": "p" * 48,
        "DEMO_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "DEMO_MEDIA_ROOT": str(tmp_path / "media"),
        "DEMO_SMS_BACKEND": f"file:{tmp_path / 'outbox.jsonl'}",
        "DEMO_SMS_TEST_NUMBERS": "+8618800000001:123456",
        **storage_env(storage),
    }
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
