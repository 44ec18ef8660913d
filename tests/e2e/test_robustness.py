"""Under faults demo keeps answering, answers correctly, and loses nothing it acknowledged.

Slow and idle clients, a full disk (a real tmpfs), kill -9 in the middle of uploads and
registrations (on both image stores), and a database and an object store that go away and come back
(a private MariaDB instance and a private SeaweedFS, so the shared servers are untouched).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine, func, select, text

from demo.common.images.storage import object_name
from demo.common.infra.readiness import READY_TTL
from demo.conf import settings as config
from demo.models import Image, ImageBlob
from tests.common.images.support import fetch, open_image, storage_env, stored_objects, temp_files
from tests.helpers import (
    GENEROUS_LIMITS,
    REQUIRE_MYSQL,
    SeaweedFS,
    call,
    finish,
    free_port,
    output_of,
    register,
    start,
    stop,
    wait_for,
    wait_until,
)

gen_test = pytest.mark.gen_test(timeout=120)
TEST_NUMBERS = ",".join(f"+86188000000{n:02d}:123456" for n in range(100))


def fixed_phone(n: int) -> str:
    return f"+86188000000{n:02d}"


def server_env(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    return {
        "DEMO_COOKIE_SECRET": "p" * 48,
        "DEMO_DATABASE_URL": database_url,
        "DEMO_MEDIA_ROOT": str(tmp_path / "media"),
        "DEMO_SMS_BACKEND": f"file:{tmp_path / 'outbox.jsonl'}",
        "DEMO_SMS_TEST_NUMBERS": TEST_NUMBERS,
        **GENEROUS_LIMITS,
        **extra,
    }


def noise_png(size: tuple[int, int], seed: int) -> bytes:
    """Incompressible pixels: the encoded size is close to width * height * 3."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    PILImage.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3))).save(buffer, "PNG")
    return buffer.getvalue()


# -- slow and idle clients -------------------------------------------------------------------------


def test_slow_and_idle_clients_do_not_starve_others(tmp_path):
    port = free_port()
    proc = start(
        tmp_path,
        f"--port={port}",
        "--log_dir=",
        "--idle_timeout=2",
        "--body_timeout=3",
        env=server_env(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite3'}"),
    )
    held: list[socket.socket] = []
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
        for n in range(500):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            if n < 200:  # slowloris: headers that never end
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            elif n < 350:  # a body that trickles and never completes
                conn.sendall(
                    b"POST /users/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 100000\r\n\r\n{"phone": '
                )
            # the rest: connected and silent
            held.append(conn)
        # Everyone else is served as usual, including calls that need the database.
        for _ in range(20):
            assert call(port, "GET", "/healthz", timeout=5)[0] == 200
        assert call(port, "POST", "/users/code", {"phone": fixed_phone(1)}, timeout=5)[0] == 200
        # And the server lets go of every one of them once its timeouts pass.
        for conn in held:
            conn.settimeout(15)
            with contextlib.suppress(ConnectionResetError):
                assert conn.recv(1024) == b""
    finally:
        for conn in held:
            conn.close()
        stop(proc)
    assert proc.returncode == 0


# -- a full disk -------------------------------------------------------------------------------------
# The local store only: these fill (or fake filling) the media folder's own filesystem, which an S3
# store does not have (its uploads in progress are spooled the same way on either backend).


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: writes past it fail with ENOSPC, like a full disk."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {done.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def app(request, settings, build_app):
    """The usual app; with ``tiny_disk``, its media folder lives on that small tmpfs; with
    ``private_s3``, its images are stored there."""
    if "tiny_disk" in request.fixturenames:
        settings = settings.replace(media_root=str(request.getfixturevalue("tiny_disk") / "media"))
    if "private_s3" in request.fixturenames:
        settings = settings.replace(**request.getfixturevalue("private_s3").settings("outage"))
    return build_app(settings)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def image_rows(app) -> int:
    return app.services.db.run_sync(lambda s: s.scalar(select(func.count()).select_from(Image)))


async def assert_disk_full_upload_is_507_and_leaves_nothing(api, user, app, tiny_disk, leave_kib: int) -> None:
    filler = tiny_disk / "filler"
    free = shutil.disk_usage(tiny_disk).free
    filler.write_bytes(b"\0" * (free - leave_kib * 1024))
    response = await api.post(
        "/images", body=noise_png((250, 250), seed=1), token=user.token, headers={"Content-Type": "image/png"}
    )  # ~190 KiB body, re-encode needs as much again
    assert response.code == 507 and response.error == "insufficient_storage"
    assert files_under(tiny_disk / "media") == [] and image_rows(app) == 0
    filler.unlink()  # space again: the same upload now works
    retry = await api.post(
        "/images", body=noise_png((250, 250), seed=1), token=user.token, headers={"Content-Type": "image/png"}
    )
    assert retry.code == 201


@gen_test
async def test_disk_full_while_re_encoding_is_507_and_leaves_nothing(api, user, app, tiny_disk):
    # The small body stays in memory; the re-encoded file does not fit in what is left.
    await assert_disk_full_upload_is_507_and_leaves_nothing(api, user, app, tiny_disk, leave_kib=100)


@pytest.mark.settings(upload_memory=0)
@gen_test
async def test_disk_full_mid_upload_is_507_and_leaves_nothing(api, user, app, tiny_disk):
    # The body goes to a temp file (no upload memory): it fits, its re-encoded copy does not.
    await assert_disk_full_upload_is_507_and_leaves_nothing(api, user, app, tiny_disk, leave_kib=200)


@gen_test
async def test_disk_full_while_storing_is_507_and_leaves_nothing(api, user, app, monkeypatch):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(app.services.store, "put", full)
    response = await api.post(
        "/images", body=noise_png((20, 20), seed=2), token=user.token, headers={"Content-Type": "image/png"}
    )
    assert response.code == 507 and response.json["error"]["code"] == "insufficient_storage"
    media = Path(app.services.settings.media_root)
    assert files_under(media / "tmp") == [] and files_under(media / "blobs") == [] and image_rows(app) == 0
    blobs = app.services.db.run_sync(lambda s: s.scalar(select(func.count()).select_from(ImageBlob)))
    assert blobs == 0


# -- kill -9 in the middle of traffic --------------------------------------------------------------


def check_consistency(database_url: str, store: config.Settings) -> None:
    """No temp files; every row has its blob; every stored blob has rows; no blob row is left unused."""
    assert files_under(Path(store.media_root) / "tmp") == []
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            used = set(conn.execute(select(Image.sha256).distinct()).scalars())
            blobs = set(conn.execute(select(ImageBlob.sha256)).scalars())
    finally:
        engine.dispose()
    assert blobs == used, "blob rows differ from the blobs images use"
    assert stored_objects(store) == sorted(object_name(sha) for sha in used), "stored blobs and image rows disagree"


def test_kill_9_mid_uploads_and_registrations_loses_nothing_acknowledged(tmp_path, database_url, storage):
    port = free_port()
    env = server_env(tmp_path, database_url, **storage_env(storage))
    proc = start(tmp_path, f"--port={port}", "--log_dir=", env=env)
    wait_for(f"http://127.0.0.1:{port}/healthz", proc)
    token = register(port, fixed_phone(0), "123456")
    images: list[dict] = []
    users: list[str] = []
    gone = threading.Event()

    def upload(worker: int) -> None:
        for n in range(10_000):
            data = noise_png((40, 30), seed=n % 7 if worker % 2 else worker * 10_000 + n)  # some bytes repeat
            try:
                status, body = call(
                    port, "POST", "/images", body=data, token=token, headers={"Content-Type": "image/png"}
                )
            except OSError:
                return  # the server is gone: this one was never acknowledged
            if status == 201:
                images.append(body["image"])
            if gone.is_set():
                return

    def enrol() -> None:
        for n in range(1, 100):
            try:
                users.append(register(port, fixed_phone(n), "123456"))
                users[-1] = fixed_phone(n)
            except (OSError, AssertionError):
                return
            if gone.is_set():
                return

    threads = [threading.Thread(target=upload, args=(w,)) for w in range(6)] + [threading.Thread(target=enrol)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while (len(images) < 25 or len(users) < 5) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-flight: uploads and registrations are being processed
    gone.set()
    for thread in threads:
        thread.join(timeout=30)
    finish(proc, 10)
    assert len(images) >= 25 and len(users) >= 5, output_of(proc)

    restarted = start(tmp_path, f"--port={port}", "--log_dir=", env=env)
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", restarted)
        check_consistency(database_url, config.defaults(media_root=str(tmp_path / "media"), **storage))
        for image in images:  # every 201 the clients saw is still there, byte for byte
            status, body = call(port, "GET", image["url"].split(str(port), 1)[1])
            assert status == 200 and hashlib.sha256(body).hexdigest() == image["sha256"]
        for phone in users:
            assert call(port, "POST", "/users/login", {"phone": phone, "password": "demo123456"})[0] == 200
    finally:
        stop(restarted)


# -- the database goes away and comes back ---------------------------------------------------------


class PrivateMariaDB:
    """A throw-away MariaDB server: its own datadir, port and socket."""

    def __init__(self, folder: Path) -> None:
        self.datadir = folder / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        done = subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr

    @property
    def url(self) -> str:
        return f"mysql+mysqldb://root@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log = open(self.datadir.parent / "mariadb.log", "a")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [
                "/usr/sbin/mariadbd",
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--port={self.port}",
                f"--socket={self.datadir}/mysqld.sock",
                f"--pid-file={self.datadir}/mysqld.pid",
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert self.proc.poll() is None, (self.datadir.parent / "mariadb.log").read_text()
                time.sleep(0.05)
        raise AssertionError("private MariaDB did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # a clean shutdown: committed data is on disk
            self.proc.wait(timeout=60)
        if self.proc:
            self.log.close()


@pytest.fixture(scope="module")
def private_mariadb(tmp_path_factory):
    missing = [tool for tool in ("mariadb-install-db", "/usr/sbin/mariadbd") if not shutil.which(tool)]
    if missing:
        if REQUIRE_MYSQL:
            pytest.fail(f"DEMO_REQUIRE_MYSQL=1 but {missing} not installed")
        pytest.skip(f"{missing} not installed")
    pytest.importorskip("MySQLdb")
    server = PrivateMariaDB(tmp_path_factory.mktemp("private-mariadb"))
    server.start()
    engine = create_engine(server.url + "/")
    with engine.connect() as conn:
        conn.execute(text("CREATE DATABASE demo CHARACTER SET utf8mb4"))
    engine.dispose()
    yield server
    server.stop()


def timed(port: int, *args, **kwargs) -> tuple[int, float]:
    started = time.monotonic()
    status, _ = call(port, *args, timeout=10, **kwargs)
    return status, time.monotonic() - started


def readiness_once_stale(port: int) -> tuple[int, float]:
    """The first /readyz answer after the last ready one: a probe may be answered from the previous
    ping for up to READY_TTL (one ping serves every probe for that long)."""
    deadline = time.monotonic() + READY_TTL + 1
    while (answer := timed(port, "GET", "/readyz"))[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    return answer


def test_database_outage_is_a_fast_503_and_recovery_needs_no_restart(tmp_path, private_mariadb):
    port = free_port()
    proc = start(
        tmp_path,
        f"--port={port}",
        "--log_dir=",
        "--db_connect_timeout=1",
        env=server_env(tmp_path, private_mariadb.url + "/demo"),
    )
    acknowledged: list[str] = []
    stop_traffic = threading.Event()

    def traffic() -> None:
        for n in range(1, 100):
            if stop_traffic.is_set():
                return
            try:
                status, _ = call(port, "POST", "/users/code", {"phone": fixed_phone(n)})
                if status == 200:
                    status, _ = call(
                        port,
                        "POST",
                        "/users/regist",
                        {"phone": fixed_phone(n), "password": "demo123456", "code": "123456"},
                    )
                    if status == 201:
                        acknowledged.append(fixed_phone(n))
            except OSError:
                pass
            time.sleep(0.02)

    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", proc)
        token = register(port, fixed_phone(0), "123456")
        worker = threading.Thread(target=traffic)
        worker.start()
        while len(acknowledged) < 5:
            time.sleep(0.01)

        private_mariadb.stop()
        answers = [
            timed(port, "POST", "/users/login", {"phone": fixed_phone(0), "password": "demo123456"}),
            timed(port, "GET", "/users/me", token=token),
            readiness_once_stale(port),
        ]
        burst = []
        threads = [
            threading.Thread(target=lambda: burst.append(timed(port, "GET", "/users/me", token=token)))
            for _ in range(20)
        ]  # more callers than DB threads: none may wait for a stuck one
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for status, seconds in answers + burst:
            assert status == 503 and seconds < 2, (status, seconds)
        assert call(port, "GET", "/healthz")[0] == 200

        private_mariadb.start()
        back = time.monotonic()
        while call(port, "GET", "/readyz")[0] != 200:
            assert time.monotonic() - back < 5, "no recovery within 5 s"
            time.sleep(0.05)
        assert call(port, "GET", "/users/me", token=token)[0] == 200
        stop_traffic.set()
        worker.join(timeout=60)
        for phone in acknowledged:  # nothing the clients saw as done was lost
            assert call(port, "POST", "/users/login", {"phone": phone, "password": "demo123456"})[0] == 200
    finally:
        stop_traffic.set()
        stop(proc)
    assert proc.returncode == 0


# -- the object store goes away and comes back ---------------------------------------------------


@pytest.fixture
def private_s3(s3_server, tmp_path):
    """A SeaweedFS of this test's own, to stop and start again on the same folder and ports. The
    session's ``s3_server`` (every other test's objects) is never stopped; asking for it puts the
    credentials in the environment."""
    server = SeaweedFS(tmp_path / "seaweedfs").start()
    yield server
    server.stop()


def rows(app) -> tuple[int, int]:
    """(images, blob rows)."""

    def count(model) -> int:
        return app.services.db.run_sync(lambda s: s.scalar(select(func.count()).select_from(model)))

    return count(Image), count(ImageBlob)


# The store is the private one (the app fixture); the parameter makes the id read [sqlite-s3].
@pytest.mark.parametrize("storage", [pytest.param("s3", marks=pytest.mark.s3)], indirect=True)
@pytest.mark.usefixtures("storage")
@gen_test
async def test_store_outage_is_a_fast_503_leaves_nothing_half_made_and_heals_without_a_restart(
    api, user, app, private_s3
):
    async def post_png(seed: int, size: tuple[int, int] = (300, 200)):
        body = noise_png(size, seed=seed)  # 300x200: about 180 KiB, held in memory once read
        return await api.post("/images", body=body, token=user.token, headers={"Content-Type": "image/png"})

    shown = (await post_png(1)).json["image"]  # served once: its bytes are in the app's memory now
    unseen = (await post_png(2)).json["image"]  # never served: its bytes are only in the store
    large = (await post_png(4, (600, 600))).json["image"]  # about 1 MiB: always streamed from the store
    assert (await fetch(api, shown["url"])).code == 200
    before, objects = rows(app), stored_objects(app.services.settings)
    assert before == (3, 3) and len(objects) == 3

    private_s3.stop()
    calls = {
        "new upload": lambda: post_png(3),
        "known upload": lambda: post_png(1),  # the same bytes as `shown`: its blob is checked in the store
        "image": lambda: fetch(api, unseen["url"]),
        "large image": lambda: fetch(api, large["url"]),  # the first piece fails: nothing sent yet
        "new thumbnail": lambda: fetch(api, shown["thumbnails"]["160"]),
    }
    for name, request in calls.items():
        started = time.monotonic()
        response = await request()
        took = time.monotonic() - started
        assert response.code == 503 and response.error == "unavailable", (name, response.code, response.body)
        assert took < 2, (name, took)
    images, blobs = rows(app)
    assert images == before[0], "a failed upload left an image row"
    # The failed new upload's blob row may stay: it was committed before the put, so that an object
    # the store may have kept (a PUT that timed out after landing) has a record; no image uses it, and
    # the housekeeping sweep collects it once the store answers again (checked below).
    assert blobs - before[1] in (0, 1)
    assert temp_files(app) == []
    served = await fetch(api, shown["url"])  # from memory: immutable bytes need no store
    assert served.code == 200 and hashlib.sha256(served.body).hexdigest() == shown["sha256"]

    private_s3.start()  # the same folder and ports: the app, never restarted, finds it again
    assert app.services.images.collect_unused() == blobs - before[1]  # the housekeeping sweep
    assert rows(app) == before
    started = time.monotonic()
    fresh = await post_png(3)
    assert fresh.code == 201, fresh.body
    for image in (unseen, large):
        again = await fetch(api, image["url"])
        assert again.code == 200 and hashlib.sha256(again.body).hexdigest() == image["sha256"]
    thumbnail = await fetch(api, shown["thumbnails"]["160"])  # the failed build left no claim to wait out
    assert thumbnail.code == 200 and open_image(thumbnail.body).width == 160
    assert time.monotonic() - started < 10
    sha = fresh.json["image"]["sha256"]
    assert rows(app) == (4, 4)
    made = [object_name(sha), object_name(shown["sha256"], 160)]
    assert stored_objects(app.services.settings) == sorted([*objects, *made])
    assert temp_files(app) == []


@pytest.mark.parametrize("storage", [pytest.param("s3", marks=pytest.mark.s3)], indirect=True)
@pytest.mark.usefixtures("storage")
@pytest.mark.settings(s3_timeout=1.0)
@gen_test
async def test_a_frozen_store_is_a_503_within_its_timeout_and_heals_when_it_thaws(api, user, app, private_s3):
    """A store that accepts connections but never answers (SIGSTOP: a hung host, a cut link) costs each
    request s3_timeout, not obstore's minutes of retries; thawed, the same app serves again."""
    body = noise_png((300, 200), seed=7)
    image = (await api.post("/images", body=body, token=user.token, headers={"Content-Type": "image/png"})).json
    assert private_s3.proc is not None
    os.killpg(private_s3.proc.pid, signal.SIGSTOP)
    try:
        for name, request in {
            "image": lambda: fetch(api, image["image"]["url"]),
            "upload": lambda: api.post(
                "/images", body=noise_png((300, 200), seed=8), token=user.token, headers={"Content-Type": "image/png"}
            ),
        }.items():
            started = time.monotonic()
            response = await request()
            took = time.monotonic() - started
            assert response.code == 503 and response.error == "unavailable", (name, response.code, response.body)
            assert took < 1.0 * 2 + 1, (name, took)  # one attempt within the timeout (a retry would double it)
    finally:
        os.killpg(private_s3.proc.pid, signal.SIGCONT)
    wait_until(private_s3.takes_writes, "SeaweedFS to thaw")
    served = await fetch(api, image["image"]["url"])
    assert served.code == 200 and hashlib.sha256(served.body).hexdigest() == image["image"]["sha256"]
