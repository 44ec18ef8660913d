"""``python -m demo.admin copy-media`` as an operator runs it: a real process, its exit status and output,
into a folder (``local``) and into SeaweedFS (``s3``); then the server on the copied store."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy.orm import Session

from demo.common.images.storage import ImageStore, make_store
from demo.common.images.transfer import Source
from demo.common.infra import migrate
from demo.conf import settings as config
from demo.models import Image, ImageBlob, User
from tests.common.images.folders import MediaFolder, media_folder
from tests.common.images.support import jpeg, upload
from tests.conftest import COOKIE_SECRET
from tests.helpers import (
    ROOT,
    S3_CREDENTIALS,
    HttpClient,
    SeaweedFS,
    finish,
    free_port,
    make_test_engine,
    start,
    stop,
    wait_for,
)


def admin(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m demo.admin ARGS`` from the checkout, with only the DEMO_* variables of ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "demo.admin", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def options(settings: dict[str, Any]) -> list[str]:
    return [f"--{name}={value}" for name, value in settings.items()]


@pytest.fixture
def folder(tmp_path: Path) -> MediaFolder:
    return media_folder(tmp_path / "source")


@pytest.fixture
def target(storage: dict[str, Any], tmp_path: Path) -> tuple[list[str], ImageStore]:
    """The command line naming the destination (a folder, or a fresh prefix on SeaweedFS) and a migrated
    database without images (the final run checks the database's blobs), and that store."""
    database = f"sqlite:///{tmp_path / 'server.sqlite3'}"
    engine = make_test_engine(database)
    migrate.upgrade(engine)
    engine.dispose()
    settings = {**storage, "media_root": str(tmp_path / "destination"), "database_url": database}
    return options(settings), make_store(config.defaults(**settings))


def test_copies_the_folder_with_a_progress_bar_and_a_summary_then_the_final_rerun_claims_it(folder, target):
    args, store = target
    count, size = len(folder.objects), sum(map(len, folder.objects.values()))

    done = admin("copy-media", f"--from={folder.root}", *args)

    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(
        f": copied {count}, skipped 0, corrupt 0, differing 0, {size} bytes copied; "
        "not claimed: rerun with --final once the servers are stopped\n"
    )
    assert "copy-media: 100%" in done.stderr and f"{count}/{count} files" in done.stderr  # the bar, on stderr
    folder.assert_copied_to(store)
    assert store.identity() is None  # the old servers may still take uploads: no server starts on it yet

    # The old servers stopped after deleting an image (its blob and two thumbnails): gone from the store too.
    deleted = folder.blobs[0]
    for width in (None, 16, 32):
        folder.path(deleted, width).unlink()
    again = admin("copy-media", f"--from={folder.root}", "--quiet", "--final", *args)
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout.endswith(
        f": copied 0, skipped {count - 3}, corrupt 0, differing 0, 0 bytes copied, deleted 3 not in the folder; "
        f"deployment {folder.identity} claimed\n"
    )
    assert store.identity() == folder.identity and not store.exists(deleted) and not store.exists(deleted, 16)


def test_settings_come_from_the_environment_and_the_config_file_as_for_the_server(folder, target, tmp_path):
    args, store = target
    settings = dict(a.removeprefix("--").split("=", 1) for a in args)
    conf = tmp_path / "demo.conf"
    conf.write_text("".join(f"{name} = {value!r}\n" for name, value in settings.items() if name != "media_root"))
    env = {"DEMO_CONFIG": str(conf), "DEMO_MEDIA_ROOT": settings["media_root"]}

    done = admin("copy-media", f"--from={folder.root}", "--quiet", env=env)

    assert done.returncode == 0, done.stderr
    folder.assert_copied_to(store)


def test_a_corrupt_blob_exits_1_names_it_and_leaves_the_store_unclaimed(folder, target):
    args, store = target
    bad = folder.blobs[1]
    folder.path(bad).write_bytes(folder.objects[(bad, None)][:-1] + b"\x00")

    done = admin("copy-media", f"--from={folder.root}", "--quiet", "--final", *args)

    assert done.returncode == 1
    assert re.fullmatch(
        rf"copy-media: corrupt: blobs/../../{bad}: its bytes in \S+ hash to [0-9a-f]{{64}}\n", done.stderr
    )
    assert "corrupt 1," in done.stdout and "deployment id not claimed" in done.stdout
    assert not store.exists(bad) and store.identity() is None


def test_a_blob_the_database_uses_but_the_folder_lacks_stops_the_final_run(folder, target):
    """The folder of the wrong host, or a blob lost from it: going live would lose those images for good."""
    args, store = target
    database = next(arg.split("=", 1)[1] for arg in args if arg.startswith("--database_url="))
    lost = "ab" * 32
    engine = make_test_engine(database)
    with Session(engine) as s, s.begin():
        now = dt.datetime(2026, 11, 29)
        user = User(phone="+8618866668888", password_hash="-", created_at=now)
        s.add_all([user, ImageBlob(sha256=lost, refs=1, created_at=now)])
        s.flush()
        s.add(
            Image(
                id="i-lost-0000000000000000",
                owner_id=user.id,
                sha256=lost,
                format="jpeg",
                width=10,
                height=10,
                bytes=100,
                created_at=now,
            )
        )
    engine.dispose()
    done = admin("copy-media", f"--from={folder.root}", "--quiet", "--final", *args)
    assert done.returncode == 1, done.stderr
    assert f"copy-media: missing: blobs/ab/ab/{lost}: images in the database use it" in done.stderr
    assert ", missing 1," in done.stdout and "deployment id not claimed" in done.stdout
    assert store.identity() is None


def test_the_final_run_with_an_unreachable_database_exits_3(folder, target):
    args, store = target
    args = [arg for arg in args if not arg.startswith("--database_url=")]
    done = admin(
        "copy-media",
        f"--from={folder.root}",
        "--quiet",
        "--final",
        *args,
        "--database_url=mysql+mysqldb://root:pw-secret@127.0.0.1:9/x",
    )
    assert done.returncode == 3, done.stderr
    assert "database mysql+mysqldb://root:***@127.0.0.1:9/x" in done.stderr and "pw-secret" not in done.stderr
    assert "Traceback" not in done.stderr and store.identity() is None


def test_an_unreadable_file_exits_1_in_one_line_and_leaves_the_store_unclaimed(folder, target):
    args, store = target
    bad = folder.blobs[0]
    folder.path(bad).unlink()
    folder.path(bad).symlink_to("/proc/self/mem")  # reading it fails with EIO

    done = admin("copy-media", f"--from={folder.root}", "--quiet", "--final", *args)

    assert done.returncode == 1
    name, path = folder.path(bad).relative_to(folder.root), folder.path(bad)
    assert done.stderr == f"copy-media: unreadable: {name}: {path}: Input/output error\n"
    assert ", unreadable 1, " in done.stdout and "deployment id not claimed" in done.stdout
    assert not store.exists(bad) and store.identity() is None


def test_a_store_of_another_deployment_exits_2_before_copying(folder, target):
    args, store = target
    store.claim_identity("another-deployment")

    done = admin("copy-media", f"--from={folder.root}", *args)

    assert done.returncode == 2
    assert (
        done.stderr.startswith("copy-media: the store ") and "belongs to deployment another-deployment" in done.stderr
    )
    assert done.stderr.count("\n") == 1 and list(store.blobs()) == []


def test_a_store_that_does_not_answer_exits_5_at_once(folder, tmp_path):
    unreachable = {"storage": "s3://demo-test/x", "s3_endpoint": f"http://127.0.0.1:{free_port()}"}
    began = time.monotonic()

    done = admin(
        "copy-media", f"--from={folder.root}", f"--media_root={tmp_path}", *options(unreachable), env=S3_CREDENTIALS
    )

    assert done.returncode == 5, done.stderr
    assert time.monotonic() - began < 20
    assert (
        done.stderr.startswith("copy-media: the store s3://demo-test/x does not answer (")
        and done.stderr.count("\n") == 1
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--from={missing}"], "copy-media: {missing}: no such folder"),
        (["--from={tmp}"], "copy-media: {tmp}: not a media folder (it has no blobs/ folder)"),
        (["--from={source}", "--storage=ftp://bucket"], "copy-media: storage must be empty"),
        (["--from={source}", "--storage=s3://bucket?x=1"], "copy-media: storage must look like s3://bucket/prefix"),
        (["--from={source}", "--s3_timeout=0"], "copy-media: --s3_timeout=0.0: must be from 0.1 to 600"),
        (["--from={source}", "--stroage=s3://b"], "copy-media: --stroage=s3://b: Unrecognized command line option"),
        (["--from={source}", "--jobs=0"], "copy-media: --jobs=0: must be from 1 to 64"),
        (["--from={source}", "--jobs=many"], "python -m demo.admin copy-media: argument --jobs: invalid int value"),
        ([], "python -m demo.admin copy-media: the following arguments are required: --from"),
    ],
    ids=["missing", "not-media", "scheme", "url", "range", "unknown", "jobs", "jobs-type", "no-from"],
)
def test_bad_input_is_one_line_and_exit_2(folder, tmp_path, args, says):
    names = {"missing": tmp_path / "missing", "tmp": tmp_path, "source": folder.root}
    done = admin("copy-media", *(a.format(**names) for a in args), f"--media_root={tmp_path / 'm'}")
    assert done.returncode == 2
    assert done.stderr.startswith(says.format(**names)) and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


def test_help_lists_the_settings_it_reads_and_the_exit_statuses():
    done = admin("copy-media", "--help")
    assert done.returncode == 0 and done.stderr == ""
    assert "--from FOLDER" in done.stdout and "--quiet" in done.stdout and "--final" in done.stdout
    assert "--verify-existing" in done.stdout
    for name in ("--storage", "--s3_endpoint", "--s3_region", "--media_root", "--database_url"):
        assert f"\n  {name}\n" in done.stdout
    statuses = done.stdout.split("exit statuses:")[1]
    assert [line.split()[0] for line in statuses.splitlines() if line[2:4].strip()] == [
        "0",
        "1",
        "2",
        "3",
        "5",
        "130",
    ]


@pytest.mark.s3
@pytest.mark.gen_test(timeout=120)
async def test_a_folder_made_by_the_app_is_served_by_a_server_on_the_store_after_the_copy(
    app, api, user, settings, s3_server: SeaweedFS, tmp_path
):
    # The app on its local folder, bound to its database as the server binds it when it starts; two
    # uploads and a thumbnail of each, made by asking for it.
    app.services.images.bind()
    served: dict[str, bytes] = {}
    for size in ((640, 480), (400, 300)):
        answer = await upload(api, user.token, jpeg(size))
        assert answer.code == 201, answer.body
        image = answer.json["image"]
        for url in (image["url"], image["thumbnails"]["160"]):
            parts = urlsplit(url)
            path = f"{parts.path}?{parts.query}" if parts.query else parts.path  # ?w=160: the thumbnail
            got = await api.get(path)
            assert got.code == 200
            served[path] = got.body
    source = Source.open(settings.media_root)
    assert source.count == 4
    s3 = s3_server.settings(f"t-{uuid.uuid4().hex[:12]}")
    server_env = {
        "DEMO_COOKIE_SECRET": COOKIE_SECRET,
        "DEMO_DATABASE_URL": settings.database_url,
        "DEMO_MEDIA_ROOT": str(tmp_path / "server-media"),  # its temp folder only: the images are in S3
        **{f"DEMO_{name.upper()}": str(value) for name, value in s3.items()},
    }
    port = free_port()

    # After a first copy (the old server still serving), the server refuses the store: it carries no
    # deployment id until the final run.
    first = admin("copy-media", f"--from={settings.media_root}", "--quiet", *options(s3))
    assert first.returncode == 0, first.stderr
    refused = start(tmp_path, f"--port={port}", "--log_dir=", env=server_env)
    assert "carries no deployment id" in finish(refused) and refused.returncode == 2

    final = ["--final", f"--database_url={settings.database_url}"]  # its images' blobs are all in the folder
    done = admin("copy-media", f"--from={settings.media_root}", "--quiet", *final, *options(s3))
    assert done.returncode == 0, done.stderr
    store = make_store(config.defaults(media_root=str(tmp_path / "check"), **s3))
    for obj in source.objects():
        assert store.read(obj.sha256, obj.width) == obj.path.read_bytes(), obj.name

    proc = start(tmp_path, f"--port={port}", "--log_dir=", env=server_env)
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", proc)
        client = HttpClient(f"http://127.0.0.1:{port}")
        for path, body in served.items():
            answer = client.get(path)
            assert (answer.code, answer.body) == (200, body), path
    finally:
        stop(proc)
