"""The local image store (images/storage.py): durable blobs, temp files, variants, sweeps."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from demo.common.images.storage import LocalImageStore

SHA = hashlib.sha256(b"pixels").hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> LocalImageStore:
    return LocalImageStore(str(tmp_path / "media"))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_store_makes_a_kept_blob_durable_and_skips_a_duplicate(tmp_path, monkeypatch):
    """The re-encoded file is not fsynced by the codec thread: put() fsyncs it before renaming it into
    place, then the folder; a blob already there costs no fsync at all."""
    store = LocalImageStore(str(tmp_path / "media"))
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    sha = hashlib.sha256(b"pixels").hexdigest()
    for attempt in range(2):
        src = Path(store.temp_dir()) / f"enc-{attempt}.tmp"
        src.write_bytes(b"pixels")
        store.put(sha, str(src))
        assert not src.exists()
    blob = Path(store.local_path(sha))
    assert blob.read_bytes() == b"pixels"
    assert synced == [str(Path(store.temp_dir()) / "enc-0.tmp"), str(blob.parent)]


def test_temp_files_of_a_live_process_stay_and_those_of_a_dead_one_go(store):
    fd, mine = store.temp_file()
    os.close(fd)
    assert Path(mine).parent == Path(store.temp_dir()) and str(os.getpid()) in Path(mine).name
    stray = Path(store.temp_dir()) / f"up-{dead_pid()}-abcdef.tmp"
    stray.write_bytes(b"half an upload")
    assert store.sweep_temp() == 1
    assert Path(mine).exists() and not stray.exists()


def test_the_identity_is_claimed_once(store):
    assert store.identity() is None
    assert store.claim_identity("first") == "first"
    assert store.claim_identity("second") == "first" and store.identity() == "first"
    assert os.listdir(store.temp_dir()) == []  # the claim's temp file is gone


def test_a_variant_is_built_once_even_by_concurrent_callers(store):
    src = Path(store.temp_dir()) / "blob"
    src.write_bytes(b"pixels")
    store.put(SHA, str(src))
    builds = []

    def build(source: str, dst: str) -> None:
        builds.append(source)
        time.sleep(0.05)
        Path(dst).write_bytes(b"thumb")

    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(store.make_variant(SHA, 160, build))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [store.local_path(SHA)] and set(paths) == {store.local_path(SHA, 160)}


def test_delete_takes_the_blob_and_its_variants_and_the_sweep_takes_orphan_variants(store):
    src = Path(store.temp_dir()) / "blob"
    src.write_bytes(b"pixels")
    store.put(SHA, str(src))
    for width in (160, 320):
        store.make_variant(SHA, width, lambda _src, dst: Path(dst).write_bytes(b"thumb"))
    assert store.exists(SHA) and list(store.blobs()) == [SHA]
    store.delete(SHA)
    store.delete(SHA)  # absent is fine
    assert not store.exists(SHA) and list(store.blobs()) == []
    assert not Path(store.local_path(SHA, 160)).exists()
    orphan = Path(store.local_path(SHA, 640))
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"finished after its blob went")
    assert store.sweep_variants(known={SHA}) == 0  # its blob has a row: kept
    assert store.sweep_variants(known=set()) == 1 and not orphan.exists()


@pytest.mark.parametrize("sha", ["../../etc/passwd", "A" * 64, "a" * 63, "g" * 64])
def test_paths_are_made_of_hex_digests_only(store, sha):
    with pytest.raises(ValueError):
        store.local_path(sha)
