"""The local image store (images/storage.py): durable blobs, temp files, variants, sweeps."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

gen_test = pytest.mark.gen_test(timeout=60)


def test_the_store_makes_a_kept_blob_durable_and_skips_a_duplicate(tmp_path, monkeypatch):
    """The re-encoded file is not fsynced by the codec thread: put() fsyncs it before renaming it into
    place, then the folder; a blob already there costs no fsync at all."""
    from demo.common.images.storage import LocalImageStore

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
