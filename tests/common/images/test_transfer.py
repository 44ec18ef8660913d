"""Copying a media folder into a store (demo/common/images/transfer.py), into both kinds of
destination: another folder (``local``) and a fresh prefix on SeaweedFS (``s3``)."""

from __future__ import annotations

import os
import uuid
from hashlib import md5, sha256
from pathlib import Path
from typing import Any

import obstore
import pytest

from demo.common.images import transfer
from demo.common.images.local_store import LocalImageStore
from demo.common.images.storage import ImageStore, StoreUnavailable, make_store, object_name
from demo.common.images.transfer import Result, Source
from demo.conf import settings as config
from tests.common.images.folders import MediaFolder, media_folder, put_file
from tests.helpers import S3_CREDENTIALS, SeaweedFS, require_s3


@pytest.fixture
def folder(tmp_path: Path) -> MediaFolder:
    return media_folder(tmp_path / "source", big=True)


@pytest.fixture
def destination(storage: dict[str, Any], tmp_path: Path) -> ImageStore:
    """The store the settings name: the folder media_root, or a fresh prefix on SeaweedFS."""
    return make_store(config.defaults(media_root=str(tmp_path / "destination"), **storage))


def test_the_final_run_copies_every_blob_and_thumbnail_then_claims_the_deployment(folder, destination):
    source = Source.open(folder.root)
    assert (source.count, source.size) == (len(folder.objects), sum(map(len, folder.objects.values())))
    seen = []

    def done(outcome: transfer.Outcome) -> None:
        assert destination.identity() is None  # not before every object is in and verified
        seen.append(outcome)

    summary = transfer.copy_media(source, destination, jobs=3, final=True, done=done)

    folder.assert_copied_to(destination)
    assert {o.result for o in seen} == {Result.COPIED} and len(seen) == len(folder.objects)
    assert (summary.copied, summary.skipped, summary.failed) == (len(folder.objects), 0, 0)
    assert summary.bytes_copied == source.size
    assert summary.claimed == folder.identity == destination.identity()
    assert sorted(destination.blobs()) == sorted(folder.blobs)
    assert not os.listdir(destination.temp_dir())  # every staged copy was moved in or removed


def test_a_run_without_final_copies_and_verifies_but_never_claims(folder, destination):
    # The first run, made while the old servers still serve: a server must not start on this copy,
    # which misses every image uploaded after it.
    summary = transfer.copy_media(Source.open(folder.root), destination)

    folder.assert_copied_to(destination)
    assert (summary.copied, summary.failed, summary.claimed) == (len(folder.objects), 0, None)
    assert destination.identity() is None
    assert summary.line().endswith("; not claimed: rerun with --final once the servers are stopped")


def test_a_rerun_verifies_what_is_there_and_copies_nothing(folder, destination):
    source = Source.open(folder.root)
    transfer.copy_media(source, destination)
    again = transfer.copy_media(source, destination, final=True)
    assert (again.copied, again.skipped, again.failed, again.bytes_copied) == (0, len(folder.objects), 0, 0)
    assert again.claimed == folder.identity
    assert again.line().endswith(f"; deployment {folder.identity} claimed")


def reads(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None]]:
    """The objects read back from ``store`` from now on (each call of its real ``chunks``)."""
    seen: list[tuple[str, int | None]] = []
    real = store.chunks

    def chunks(sha256: str, width: int | None, start: int, end: int, chunk_size: int) -> Any:
        seen.append((sha256, width))
        return real(sha256, width, start, end, chunk_size)

    monkeypatch.setattr(store, "chunks", chunks)
    return seen


def test_s3_objects_are_verified_by_their_etag_and_a_folder_s_by_their_bytes(folder, destination, monkeypatch):
    read, count = reads(destination, monkeypatch), len(folder.objects)
    source = Source.open(folder.root)

    first = transfer.copy_media(source, destination)
    again = transfer.copy_media(source, destination, final=True)

    assert (first.copied, again.skipped, again.failed, again.claimed) == (count, count, 0, folder.identity)
    if isinstance(destination, LocalImageStore):
        assert sorted(read, key=str) == sorted(
            [*folder.objects, *folder.objects], key=str
        )  # each run hashes every file
    else:
        assert read == []  # a single PUT's ETag is the MD5 of its bytes: the final run downloads nothing
    read.clear()
    forced = transfer.copy_media(source, destination, verify_existing=True)
    assert (forced.skipped, forced.failed) == (count, 0)
    assert sorted(read, key=str) == sorted(folder.objects, key=str)


def test_a_thumbnail_of_the_same_size_with_other_bytes_differs(folder, destination):
    sha, width = folder.blobs[0], 16
    data = bytearray(folder.objects[(sha, width)])
    data[-20] ^= 0xFF  # same size: only its bytes (or the ETag made of them) can tell
    put_file(destination, bytes(data), sha256=sha, width=width)

    summary = transfer.copy_media(Source.open(folder.root), destination, final=True)

    theirs, ours = md5(data).hexdigest(), md5(folder.objects[(sha, width)]).hexdigest()
    assert summary.problems == [
        f"differs: {object_name(sha, width)}: the store's bytes differ from the folder's (MD5 {theirs}, not {ours}); "
        "delete the object and rerun"
    ]
    assert (summary.differs, summary.claimed) == (1, None) and destination.read(sha, width) == bytes(data)


def test_a_blob_gone_bad_in_the_folder_after_its_copy_is_judged_by_the_store_s_bytes(folder, destination):
    source = Source.open(folder.root)
    transfer.copy_media(source, destination)
    bad = folder.blobs[0]
    folder.path(bad).write_bytes(b"\x00" * len(folder.objects[(bad, None)]))  # a disk fault after the first run

    summary = transfer.copy_media(source, destination, final=True)

    assert (summary.skipped, summary.failed, summary.claimed) == (len(folder.objects), 0, folder.identity)
    folder.assert_copied_to(destination)


@pytest.mark.s3
def test_an_etag_that_is_no_md5_makes_the_copy_read_the_object_back(s3_server, folder, tmp_path, monkeypatch):
    store = make_store(config.defaults(media_root=str(tmp_path / "m"), **s3_server.settings(uuid.uuid4().hex[:12])))
    big = max(folder.blobs, key=lambda sha: len(folder.objects[(sha, None)]))
    good, thumbnail = folder.objects[(big, None)], folder.objects[(folder.blobs[0], 16)]
    # A multipart upload's ETag is "<md5 of the parts' md5s>-<parts>": how another tool may have put it.
    obstore.put(store._store, object_name(big), good, use_multipart=True, chunk_size=5 << 20)
    obstore.put(store._store, object_name(folder.blobs[0], 16), thumbnail, use_multipart=True, chunk_size=5 << 20)
    assert store.head(big).etag.endswith('-1"')
    read = reads(store, monkeypatch)

    summary = transfer.copy_media(Source.open(folder.root), store)

    assert (big, None) in read and (folder.blobs[0], 16) in read
    assert (summary.skipped, summary.failed) == (2, 0)  # the bytes were the folder's
    folder.assert_copied_to(store)


def forget(folder: MediaFolder, sha: str) -> list[tuple[str, int | None]]:
    """Delete an image's blob and thumbnails from the folder, as the server deletes an image; their keys."""
    keys = [key for key in folder.objects if key[0] == sha]
    for key in keys:
        folder.path(*key).unlink()
        del folder.objects[key]
    return keys


def test_the_final_run_deletes_what_the_folder_lost_since_the_first(folder, destination):
    transfer.copy_media(Source.open(folder.root), destination)
    gone = forget(folder, folder.blobs[0])  # an image deleted while the old servers still served
    put_file(destination, b"not an object's name", sha256="ab" * 32, width=None)  # named as one: stale too

    summary = transfer.copy_media(Source.open(folder.root), destination, final=True)

    assert (summary.deleted, summary.claimed) == (len(gone) + 1, folder.identity)
    assert summary.line().endswith(f", deleted {len(gone) + 1} not in the folder; deployment {folder.identity} claimed")
    assert not any(destination.exists(*key) for key in gone) and not destination.exists("ab" * 32)
    names = sorted([*destination.names("blobs"), *destination.names("thumbs")])
    assert names == sorted(object_name(*key) for key in folder.objects)
    assert destination.identity() == folder.identity


def test_a_run_without_final_deletes_nothing(folder, destination):
    transfer.copy_media(Source.open(folder.root), destination)
    gone = forget(folder, folder.blobs[0])
    summary = transfer.copy_media(Source.open(folder.root), destination)
    assert summary.deleted == 0 and all(destination.exists(*key) for key in gone)


def test_a_store_claimed_by_the_deployment_is_live_and_nothing_is_deleted(folder, destination):
    transfer.copy_media(Source.open(folder.root), destination, final=True)
    gone = forget(folder, folder.blobs[0])  # or: uploaded to the new store, never in the folder

    summary = transfer.copy_media(Source.open(folder.root), destination, final=True)

    assert (summary.live, summary.deleted, summary.claimed) == (True, 0, folder.identity)
    assert "; nothing deleted: the store was claimed already, it is live;" in summary.line()
    assert all(destination.exists(*key) for key in gone)


def test_a_corrupt_blob_is_reported_not_copied_and_the_deployment_not_claimed(folder, destination):
    bad = folder.blobs[0]
    data = bytearray(folder.objects[(bad, None)])
    data[-20] ^= 0xFF  # same size, other bytes: only the hash can tell
    folder.path(bad).write_bytes(bytes(data))

    summary = transfer.copy_media(Source.open(folder.root), destination, final=True)

    assert (summary.corrupt, summary.differs, summary.claimed) == (1, 0, None)
    assert summary.copied == len(folder.objects) - 1
    digest = sha256(data).hexdigest()
    assert summary.problems == [f"corrupt: {object_name(bad)}: its bytes in {folder.path(bad)} hash to {digest}"]
    assert not destination.exists(bad) and destination.identity() is None
    # Put right (restored from a backup), a rerun completes.
    folder.path(bad).write_bytes(folder.objects[(bad, None)])
    summary = transfer.copy_media(Source.open(folder.root), destination, final=True)
    assert (summary.copied, summary.failed, summary.claimed) == (1, 0, folder.identity)
    folder.assert_copied_to(destination)


def test_an_unreadable_file_is_reported_not_copied_and_the_deployment_not_claimed(folder, destination):
    bad = folder.blobs[0]
    folder.path(bad).unlink()
    folder.path(bad).symlink_to("/proc/self/mem")  # a file whose read fails with EIO, as a failing disk's

    summary = transfer.copy_media(Source.open(folder.root), destination, final=True)

    assert summary.problems == [f"unreadable: {object_name(bad)}: {folder.path(bad)}: Input/output error"]
    assert (summary.unreadable, summary.failed, summary.claimed) == (1, 1, None)
    assert summary.copied == len(folder.objects) - 1 and ", unreadable 1, " in summary.line()
    assert not destination.exists(bad) and destination.identity() is None


def test_other_bytes_under_a_name_in_the_store_fail_verification_and_stay(folder, destination):
    blob, thumbnail = folder.blobs[0], (folder.blobs[1], 16)
    put_file(destination, b"\x89PNG not these bytes" + bytes(len(folder.objects[(blob, None)]) - 20), sha256=blob)
    put_file(destination, b"\x89PNG shorter", sha256=thumbnail[0], width=thumbnail[1])

    summary = transfer.copy_media(Source.open(folder.root), destination, final=True)

    assert (summary.differs, summary.corrupt, summary.claimed) == (2, 0, None)
    assert any(p.startswith(f"differs: {object_name(blob)}: the store's bytes hash to ") for p in summary.problems)
    assert any(p.startswith(f"differs: {object_name(*thumbnail)}: the store holds 12 bytes") for p in summary.problems)
    assert destination.read(*thumbnail) == b"\x89PNG shorter"  # never overwritten
    assert destination.identity() is None


def test_a_store_of_another_deployment_is_refused_before_anything_is_copied(folder, destination):
    destination.claim_identity("another-deployment")
    with pytest.raises(transfer.DeploymentMismatch, match="belongs to deployment another-deployment"):
        transfer.copy_media(Source.open(folder.root), destination)
    assert list(destination.blobs()) == []


def test_the_source_folder_must_be_a_bound_media_folder(tmp_path):
    with pytest.raises(transfer.SourceError, match="no such folder"):
        Source.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(transfer.SourceError, match="not a media folder"):
        Source.open(tmp_path / "plain")
    (tmp_path / "plain" / "blobs").mkdir()
    with pytest.raises(transfer.SourceError, match="carries no deployment id"):
        Source.open(tmp_path / "plain")


def test_files_that_are_not_objects_are_left_out(folder):
    sha256 = folder.blobs[0]
    (folder.root / "tmp" / "up-1-x.tmp").write_bytes(b"an upload in progress")
    (folder.root / "blobs" / "00" / "00").mkdir(parents=True)
    (folder.root / "blobs" / "00" / "00" / sha256).write_bytes(b"in the wrong folder")
    (folder.path(sha256).parent / "notes.txt").write_bytes(b"not a blob")
    source = Source.open(folder.root)
    assert source.count == len(folder.objects)
    assert {(o.sha256, o.width) for o in source.objects()} == set(folder.objects)


def test_the_folder_itself_is_not_a_destination(folder):
    same = make_store(config.defaults(media_root=str(folder.root), storage=""))
    with pytest.raises(transfer.SourceError, match="is the destination itself"):
        transfer.copy_media(Source.open(folder.root), same)


@pytest.mark.s3
def test_a_copy_cut_off_by_the_store_going_down_completes_on_a_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    server: SeaweedFS = require_s3(tmp_path / "weed")  # a store of this test's own, to stop
    try:
        folder = media_folder(tmp_path / "source", images=8)
        settings = config.defaults(media_root=str(tmp_path / "temp"), **server.settings(uuid.uuid4().hex[:12]))
        store = make_store(settings.replace(s3_timeout=3.0))
        finished = []

        def done(outcome: transfer.Outcome) -> None:
            finished.append(outcome)
            if len(finished) == 5:
                server.stop()  # as a kill would: the objects put so far stay, the rest never come

        with pytest.raises(StoreUnavailable):
            transfer.copy_media(Source.open(folder.root), store, jobs=2, final=True, done=done)
        server.start()
        assert store.identity() is None  # the half copy cannot be served
        present = [key for key in folder.objects if store.exists(*key)]
        assert 5 <= len(present) < len(folder.objects)

        summary = transfer.copy_media(Source.open(folder.root), store, jobs=2, final=True)
        assert summary.skipped == len(present) and summary.copied == len(folder.objects) - len(present)
        assert (summary.failed, summary.claimed) == (0, folder.identity)
        folder.assert_copied_to(store)
    finally:
        server.stop()
