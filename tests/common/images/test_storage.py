"""The image stores (images/storage.py, local_store.py, s3_store.py) on both backends: the local
folder, then SeaweedFS; then what only one of them does (a folder's fsyncs and sweeps, an outage)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from demo.common.images.local_store import LocalImageStore
from demo.common.images.storage import ImageStore, StoreUnavailable, make_store, object_name
from demo.conf import settings as config
from tests.helpers import SeaweedFS

DATA = bytes(range(256)) * 40  # 10 KiB, every offset's byte known
SHA = hashlib.sha256(DATA).hexdigest()
JPEG = "image/jpeg"


def store_for(tmp_path: Path, storage: dict[str, Any]) -> ImageStore:
    return make_store(config.defaults(media_root=str(tmp_path / "media"), **storage))


@pytest.fixture
def store(tmp_path: Path, storage: dict[str, Any]) -> ImageStore:
    """The test's store: a folder, then a fresh prefix on the session's SeaweedFS."""
    return store_for(tmp_path, storage)


def spool(store: ImageStore, data: bytes) -> str:
    """A finished local file in the store's temp folder, as an upload or a thumbnail leaves one."""
    fd, path = store.temp_file()
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- both backends ------------------------------------------------------------------------------------


def test_a_put_lands_whole_and_a_second_put_of_the_name_keeps_the_first_bytes(store):
    assert not store.exists(SHA) and store.size(SHA) is None
    first = spool(store, DATA)
    store.put(SHA, first, content_type=JPEG)
    second = spool(store, b"other bytes under the same name")
    store.put(SHA, second, content_type=JPEG)
    assert not os.path.exists(first) and not os.path.exists(second)  # the temp files go either way
    assert store.read(SHA) == DATA and store.size(SHA) == len(DATA) and store.exists(SHA)
    assert os.listdir(store.temp_dir()) == []


def test_an_empty_file_and_one_of_several_mib_land_whole(store):
    big = os.urandom(3 << 20) + DATA  # past any single read's size
    for data in (b"", big):
        sha = hashlib.sha256(data).hexdigest()
        store.put(sha, spool(store, data), content_type=JPEG)
        assert store.size(sha) == len(data) and store.read(sha) == data
    assert os.listdir(store.temp_dir()) == []


def test_ranges_chunks_and_open_read_the_bytes_asked_for(store):
    store.put(SHA, spool(store, DATA), content_type=JPEG)
    assert store.read(SHA, None, 100, 356) == DATA[100:356]
    assert store.read(SHA, None, 10_000) == DATA[10_000:]
    pieces = list(store.chunks(SHA, None, 5, 9_000, 1024))
    assert b"".join(pieces) == DATA[5:9_000] and all(pieces)
    if isinstance(store, LocalImageStore):  # obstore's size is a minimum: it hands on what arrived
        assert len(pieces) == 9 and max(map(len, pieces)) == 1024
    assert list(store.chunks(SHA, None, 7, 7, 1024)) == []
    with store.open(SHA) as f:
        assert f.read() == DATA
        f.seek(4000)
        assert f.read(10) == DATA[4000:4010]


def test_a_missing_object_is_file_not_found(store):
    with pytest.raises(FileNotFoundError):
        store.read(SHA)
    with pytest.raises(FileNotFoundError):
        b"".join(store.chunks(SHA, None, 0, 10, 1024))
    with pytest.raises(FileNotFoundError):
        store.open(SHA)


def test_variants_live_beside_their_blob_and_go_with_it(store):
    store.put(SHA, spool(store, DATA), content_type=JPEG)
    for width in (160, 320):
        store.put(SHA, spool(store, f"thumb {width}".encode()), content_type=JPEG, width=width)
    assert store.read(SHA, 160) == b"thumb 160" and store.size(SHA, 320) == len(b"thumb 320")
    assert sorted(store.names("thumbs")) == [object_name(SHA, 160), object_name(SHA, 320)]
    assert list(store.names("blobs")) == [object_name(SHA)] and list(store.blobs()) == [SHA]
    store.delete_variant(SHA, 320)
    assert store.exists(SHA) and not store.exists(SHA, 320) and store.exists(SHA, 160)
    store.delete(SHA, (160, 320, 640))
    store.delete(SHA, (160,))  # absent is fine
    store.delete_variant(SHA, 160)
    assert list(store.names("blobs")) == [] and list(store.names("thumbs")) == []
    assert not store.exists(SHA) and not store.exists(SHA, 160)


def test_the_identity_is_claimed_once_even_by_concurrent_claimers(store):
    assert store.identity() is None
    results: list[str] = []
    claimers = [threading.Thread(target=lambda n=n: results.append(store.claim_identity(f"id-{n}"))) for n in range(8)]
    for thread in claimers:
        thread.start()
    for thread in claimers:
        thread.join()
    assert len(set(results)) == 1 and results[0].startswith("id-")
    assert store.identity() == results[0] and store.claim_identity("late") == results[0]
    assert os.listdir(store.temp_dir()) == []  # the claims' temp files are gone


def test_a_redirect_url_fetches_the_object_or_there_is_none(store):
    store.put(SHA, spool(store, DATA), content_type=JPEG)
    url = store.redirect_url(SHA)
    if isinstance(store, LocalImageStore):
        assert url is None  # the app sends a folder's bytes itself
        return
    assert url is not None and "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == DATA and response.headers["Content-Type"] == JPEG


@pytest.mark.parametrize("sha", ["../../etc/passwd", "A" * 64, "a" * 63, "g" * 64])
def test_names_are_made_of_hex_digests_only(store, sha):
    with pytest.raises(ValueError):
        object_name(sha)
    with pytest.raises(ValueError):
        store.exists(sha)


def test_the_start_up_sweep_lists_only_a_folder(store):
    assert store.listed_at_start is isinstance(store, LocalImageStore)


# -- the local folder ------------------------------------------------------------------------------


def test_the_folder_makes_a_kept_blob_durable_and_skips_a_duplicate(tmp_path, monkeypatch):
    """The re-encoded file is not fsynced by the codec thread: put() fsyncs it before renaming it into
    place, then the folder; a blob already there costs no fsync at all."""
    store = LocalImageStore(str(tmp_path / "media"))
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    sources = []
    for _ in range(2):
        sources.append(spool(store, b"pixels"))
        store.put(SHA, sources[-1], content_type=JPEG)
        assert not os.path.exists(sources[-1])
    blob = tmp_path / "media" / object_name(SHA)
    assert blob.read_bytes() == b"pixels"
    assert synced == [sources[0], str(blob.parent)]


def test_temp_files_of_a_live_process_stay_and_those_of_a_dead_one_go(tmp_path):
    store = LocalImageStore(str(tmp_path / "media"))
    fd, mine = store.temp_file()
    os.close(fd)
    assert Path(mine).parent == Path(store.temp_dir()) and str(os.getpid()) in Path(mine).name
    stray = Path(store.temp_dir()) / f"up-{dead_pid()}-abcdef.tmp"
    stray.write_bytes(b"half an upload")
    assert store.sweep_temp() == 1
    assert Path(mine).exists() and not stray.exists()


def test_the_folder_sweeps_variants_whose_blob_is_gone_and_has_no_row(tmp_path):
    store = LocalImageStore(str(tmp_path / "media"))
    store.put(SHA, spool(store, DATA), content_type=JPEG)
    store.put(SHA, spool(store, b"thumb"), content_type=JPEG, width=160)
    assert store.sweep_variants(known=set()) == 0  # its blob is there
    store.delete(SHA, ())
    assert store.sweep_variants(known={SHA}) == 0  # its blob has a row: kept
    assert store.sweep_variants(known=set()) == 1 and not store.exists(SHA, 160)


# -- an S3 store that goes down -------------------------------------------------------------------


@pytest.mark.s3
def test_a_store_that_is_down_fails_fast_leaves_nothing_and_recovers_without_a_restart(s3_server, tmp_path):
    """s3_server: the credentials and the binary; the store here is a private SeaweedFS, stopped and
    started again (never the session's)."""
    private = SeaweedFS(tmp_path / "weed").start()
    try:
        store = store_for(tmp_path, private.settings(f"t-{uuid.uuid4().hex[:12]}"))
        store.put(SHA, spool(store, DATA), content_type=JPEG)
        private.stop()
        calls = [
            lambda: store.size(SHA),
            lambda: store.read(SHA),
            lambda: store.open(SHA),
            lambda: b"".join(store.chunks(SHA, None, 0, 100, 1024)),
            lambda: store.put(hashlib.sha256(b"new").hexdigest(), spool(store, b"new"), content_type=JPEG),
            lambda: store.delete(SHA, (160,)),
            lambda: store.identity(),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - started < 5  # one quick retry, not obstore's minutes
        assert os.listdir(store.temp_dir()) == []  # the failed put's file and open's copy are gone
        private.start()
        assert store.read(SHA) == DATA  # the same store object: no restart needed
        assert not store.exists(hashlib.sha256(b"new").hexdigest())  # nothing half-written
    finally:
        private.stop()


@pytest.mark.s3
def test_an_s3_put_sends_a_buffer_of_exactly_the_file_and_lets_it_go_at_once(s3_server, tmp_path, monkeypatch):
    """upload_memory counts a put as its file's size: the buffer obstore sends from is that size (not
    obstore's own read of the path, grown by doubling) and is unmapped when the put returns."""
    from demo.common.images import s3_store

    store = store_for(tmp_path, s3_server.settings(f"t-{uuid.uuid4().hex[:12]}"))
    sent: list[memoryview] = []
    real_put = s3_store.obstore.put

    def spy(target: Any, name: str, body: Any, **options: Any) -> Any:
        assert isinstance(body, memoryview) and body.nbytes == len(DATA) and bytes(body) == DATA
        sent.append(body)
        return real_put(target, name, body, **options)

    monkeypatch.setattr(s3_store.obstore, "put", spy)
    store.put(SHA, spool(store, DATA), content_type=JPEG)
    assert len(sent) == 1 and store.read(SHA) == DATA
    with pytest.raises(ValueError, match="released"):
        sent[0].nbytes  # noqa: B018 - the mapping is gone, not waiting for a garbage collection


# -- heads (added for the copy's verification, images/transfer.py) -----------------------------------


def test_a_head_gives_the_size_and_on_s3_the_md5_etag_of_a_single_put(store):
    assert store.head(SHA) is None
    store.put(SHA, spool(store, DATA), content_type=JPEG)
    head = store.head(SHA)
    assert head is not None and head.size == len(DATA)
    if isinstance(store, LocalImageStore):
        assert head.etag is None  # a folder has none: the copy hashes its bytes instead
    else:
        assert head.etag == f'"{hashlib.md5(DATA).hexdigest()}"'
