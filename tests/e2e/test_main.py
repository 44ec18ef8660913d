"""The real process (main.py): migrates before it listens, serves, stops cleanly on SIGTERM."""

from __future__ import annotations

import http.client
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import (
    ROOT,
    S3_CREDENTIALS,
    SECRET,
    call,
    finish,
    free_port,
    sms_code,
    start,
    stop,
    wait_for,
    wait_until,
)


def server_env(tmp_path: Path, database_url: str | None = None, **more: str) -> dict[str, str]:
    """A production-like server of one test: its secret, its database (SQLite in tmp_path by default), its media."""
    return {
        "DEMO_COOKIE_SECRET": SECRET,
        "DEMO_DATABASE_URL": database_url or f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "DEMO_MEDIA_ROOT": str(tmp_path / "media"),
        **more,
    }


def test_refuses_to_start_in_production_without_cookie_secret(tmp_path):
    proc = start(tmp_path, f"--port={free_port()}", "--log_dir=")
    out = finish(proc, 20)
    assert proc.returncode == 2 and "DEMO_COOKIE_SECRET" in out


def test_serves_migrated_sqlite_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    db = tmp_path / "fresh.sqlite3"
    proc = start(
        tmp_path,
        f"--port={port}",
        f"--log_dir={tmp_path / 'log'}",
        "--log_level=debug",
        env=server_env(tmp_path, f"sqlite:///{db}"),
    )
    try:
        assert wait_for(f"http://127.0.0.1:{port}/readyz", proc)["checks"] == {"database": "ok", "storage": "ok"}
    finally:
        proc.send_signal(signal.SIGTERM)
        out = finish(proc)
    assert proc.returncode == 0, out
    assert "stopped" in out
    log_text = (tmp_path / "log" / "demo.log").read_text()
    assert "200 GET /readyz" in log_text


@pytest.mark.parametrize("signum", [signal.SIGINT])
def test_sigint_also_stops_cleanly(tmp_path, signum):
    port = free_port()
    proc = start(
        tmp_path,
        f"--port={port}",
        "--log_dir=",
        "--debug",
        f"--database_url=sqlite:///{tmp_path / 'db.sqlite3'}",
        f"--media_root={tmp_path / 'media'}",
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
    finally:
        proc.send_signal(signum)
        out = finish(proc)
    assert proc.returncode == 0, out


DEBUG_LOG = "--log_level=debug"  # every answer in the access log, with the answering worker's pid


def start_workers(tmp_path: Path, port: int, *more: str) -> subprocess.Popen:
    return start(
        tmp_path, f"--port={port}", "--processes=2", f"--log_dir={tmp_path / 'log'}", *more, env=server_env(tmp_path)
    )


def worker_pids(tmp_path: Path, count: int, timeout: float = 20) -> list[int]:
    """The first ``count`` workers the supervisor reports started (in its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = tmp_path / "log" / "demo.log"
        pids = [int(pid) for pid in re.findall(r"worker (\d+) started", log.read_text())] if log.exists() else []
        if len(pids) >= count:
            return pids[:count]
        time.sleep(0.01)
    raise AssertionError("workers did not start")


def test_a_sighup_while_workers_start_does_not_kill_them(tmp_path):
    """logrotate may signal at any moment, also while a worker is still starting."""
    port = free_port()
    proc = start_workers(tmp_path, port)
    try:
        worker_pids(tmp_path, 2)
        for _ in range(30):  # across the workers' start-up, before their event loops handle it
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.01)
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = finish(proc)
    assert proc.returncode == 0, out
    assert "exited" not in (tmp_path / "log" / "demo.log").read_text()


def test_a_stop_during_a_restart_pause_starts_no_new_worker(tmp_path):
    port = free_port()
    proc = start_workers(tmp_path, port)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
        os.kill(worker_pids(tmp_path, 2)[1], signal.SIGKILL)  # the supervisor waits, then replaces it
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)  # during that wait
        out = finish(proc, 15)
    assert proc.returncode == 0, out
    log = (tmp_path / "log" / "demo.log").read_text()
    assert "starting a new one" in log and len(re.findall(r"worker \d+ started", log)) == 2


# The route label of GET /healthz in demo_requests_total.
HEALTH_ROUTE = "ops.healthz"


def health_requests_counted(port: int) -> float:
    """GET /healthz answers counted in one scrape of /metrics (by whichever worker answers it)."""
    status, scrape = call(port, "GET", "/metrics")
    assert status == 200, scrape
    prefix = f'demo_requests_total{{method="GET",route="{HEALTH_ROUTE}"'
    return sum(float(line.split()[-1]) for line in scrape.decode().splitlines() if line.startswith(prefix))


def test_workers_share_the_port_and_the_metrics_then_stop_together(tmp_path):
    port = free_port()
    log_dir = tmp_path / "log"
    proc = start(
        tmp_path,
        f"--port={port}",
        "--processes=2",
        f"--log_dir={log_dir}",
        "--log_level=debug",
        env=server_env(tmp_path),
    )
    try:
        workers = set(worker_pids(tmp_path, 2))
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
        sent = 1
        # Both workers must answer some of the requests (else the scrape below proves nothing): send
        # them a few at once, so that one busy worker leaves the next connection to the other.
        with ThreadPoolExecutor(8) as pool:

            def both_answered() -> bool:
                nonlocal sent
                assert all(status == 200 for status, _ in pool.map(lambda _: call(port, "GET", "/healthz"), range(8)))
                sent += 8
                log = (log_dir / "demo.log").read_text()
                answered = {int(pid) for pid in re.findall(r"\[(\d+)\] demo\.access\b.* 200 GET /healthz", log)}
                assert proc.pid not in answered  # workers, not the supervisor, answer
                return answered >= workers

            wait_until(both_answered, "both workers to answer GET /healthz", timeout=20, every=0)
        # The scrape counts every worker's requests, whichever worker answers it. A request is counted
        # just after its answer is sent, so the last ones may land a moment after the client moved on.
        wait_until(lambda: health_requests_counted(port) >= sent, f"{sent} requests counted", timeout=10)
        for _ in range(6):  # whichever worker answers the scrape, and never more than were sent
            assert health_requests_counted(port) == sent

        # SIGHUP: logrotate moved the file; the workers reopen it and write to a new one.
        (log_dir / "demo.log").rename(log_dir / "demo.log.1")
        proc.send_signal(signal.SIGHUP)
        new_log = log_dir / "demo.log"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (new_log.exists() and "GET /healthz" in new_log.read_text()):
            call(port, "GET", "/healthz", timeout=5)
            time.sleep(0.05)
        assert "GET /healthz" in new_log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        out = finish(proc)
    assert proc.returncode == 0, out
    assert "all workers stopped" in out


# -- --processes=N: a SO_REUSEPORT socket per worker, the kernel spreads connections across them ---


def answering_pids(log: Path, tag: str) -> dict[int, set[int]]:
    """Connection number -> the pids whose access log shows ``GET /healthz?<tag>=<number>`` (debug level)."""
    seen: dict[int, set[int]] = {}
    text = log.read_text() if log.exists() else ""
    for pid, number in re.findall(rf"\[(\d+)\] demo\.access: 200 GET /healthz\?{tag}=(\d+) ", text):
        seen.setdefault(int(number), set()).add(int(pid))
    return seen


def keep_alive_round(port: int, count: int, tag: str, timeout: float) -> None:
    """``count`` connections opened at once (all in the kernel's accept queues before any request),
    then two requests on each: every answer a 200, none waiting longer than ``timeout``."""
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=timeout) for _ in range(count)]
    try:
        for conn in conns:
            conn.connect()
        for _ in range(2):
            for number, conn in enumerate(conns):
                conn.request("GET", f"/healthz?{tag}={number}")
            for conn in conns:
                answer = conn.getresponse()
                answer.read()
                assert answer.status == 200 and not answer.will_close
    finally:
        for conn in conns:
            conn.close()


def answered_round(log: Path, count: int, tag: str) -> dict[int, int]:
    """Connection number -> the one worker that answered both its requests (the log is written just after)."""
    wait_until(lambda: len(answering_pids(log, tag)) == count, f"{count} connections logged", timeout=10)
    seen = answering_pids(log, tag)
    assert all(len(pids) == 1 for pids in seen.values()), seen  # a keep-alive connection stays with its worker
    return {number: pids.pop() for number, pids in seen.items()}


def fair_share(answered: dict[int, int], workers: set[int]) -> None:
    """Each worker answered at least a quarter of the connections (of 40: a uniform hash misses that
    once in 1,500 runs; workers sharing one accept queue missed it in most)."""
    shares = {pid: list(answered.values()).count(pid) for pid in workers}
    assert set(answered.values()) <= workers, (answered, workers)
    assert all(share >= len(answered) / 4 for share in shares.values()), shares


def serving(log: Path, pid: int) -> bool:
    return log.exists() and f"[{pid}] demo: demo listening on" in log.read_text()


def test_two_workers_each_answer_a_fair_share_of_keep_alive_connections(tmp_path):
    port = free_port()
    log = tmp_path / "log" / "demo.log"
    proc = start_workers(tmp_path, port, DEBUG_LOG)
    try:
        workers = set(worker_pids(tmp_path, 2))
        for pid in workers:
            wait_until(lambda pid=pid: serving(log, pid), f"worker {pid} serving", timeout=20)
        keep_alive_round(port, 40, "fair", timeout=5)
        fair_share(answered_round(log, 40, "fair"), workers)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = finish(proc)
    assert proc.returncode == 0, out


def test_a_killed_worker_is_replaced_on_its_own_socket_and_no_connection_hangs(tmp_path):
    """Connections the kernel hashes to a dead worker's socket wait in its queue (the supervisor keeps
    it open) and the replacement answers them; once it serves, every connection is answered at once."""
    port = free_port()
    log = tmp_path / "log" / "demo.log"
    proc = start_workers(tmp_path, port, DEBUG_LOG)
    try:
        survivor, killed = worker_pids(tmp_path, 2)
        for pid in (survivor, killed):
            wait_until(lambda pid=pid: serving(log, pid), f"worker {pid} serving", timeout=20)
        os.kill(killed, signal.SIGKILL)
        started = time.monotonic()
        keep_alive_round(port, 20, "gap", timeout=15)  # made while no worker accepts on the dead slot
        gap = time.monotonic() - started
        replacement = worker_pids(tmp_path, 3)[2]
        gap_answers = answered_round(log, 20, "gap")
        assert set(gap_answers.values()) <= {survivor, replacement}, gap_answers
        assert replacement in gap_answers.values()  # held in the dead slot's queue, not refused or reset
        assert gap < 10, gap

        wait_until(lambda: serving(log, replacement), "the replacement serving", timeout=20)
        keep_alive_round(port, 40, "after", timeout=3)
        fair_share(answered_round(log, 40, "after"), {survivor, replacement})
    finally:
        proc.send_signal(signal.SIGTERM)
        out = finish(proc)
    assert proc.returncode == 0, out


def test_sigterm_lets_an_in_flight_request_finish(tmp_path):
    """A request still sending its body when SIGTERM arrives completes (201), then the process exits 0."""
    port = free_port()
    db = tmp_path / "db.sqlite3"
    outbox = tmp_path / "outbox.jsonl"
    proc = start(
        tmp_path,
        f"--port={port}",
        "--log_dir=",
        env=server_env(tmp_path, f"sqlite:///{db}", DEMO_SMS_BACKEND=f"file:{outbox}", DEMO_SHUTDOWN_GRACE="20"),
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
        token = register(port, outbox)
        image = io.BytesIO()
        Image.new("RGB", (300, 200), (10, 200, 90)).save(image, "PNG")
        body = image.getvalue()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(
                (
                    f"POST /images HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                    f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body[:100]
            )
            time.sleep(0.3)  # the request is in flight: headers and part of the body are in
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            conn.sendall(body[100:])
            answer = conn.recv(65536).decode()
    finally:
        out = finish(proc)
    assert answer.startswith("HTTP/1.1 201"), answer
    assert "Connection: close" in answer
    assert proc.returncode == 0, out


def register(port: int, outbox: Path) -> str:
    def post(path: str, payload: dict) -> dict:
        status, body = call(port, "POST", path, payload)
        assert status in (200, 201), body
        return body

    post("/users/code", {"phone": "18866668888"})
    code = sms_code(outbox, "+8618866668888")
    return post("/users/regist", {"phone": "18866668888", "password": "demo123456", "code": code})["token"]


def test_processes_starting_together_migrate_once(tmp_path):
    db = tmp_path / "shared.sqlite3"
    ports = [free_port(), free_port()]
    env = server_env(tmp_path, f"sqlite:///{db}")
    procs = [start(tmp_path, f"--port={port}", "--log_dir=", env=env) for port in ports]
    try:
        for port, proc in zip(ports, procs, strict=True):
            assert wait_for(f"http://127.0.0.1:{port}/readyz", proc)["status"] == "ok"
    finally:
        outs = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            outs.append(finish(proc))
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(out.count("Running upgrade  -> 0001") for out in outs) == 1


def test_debug_with_several_processes_is_refused(tmp_path):
    proc = start(tmp_path, f"--port={free_port()}", "--log_dir=", "--debug", "--processes=2")
    out = finish(proc, 20)
    assert proc.returncode == 2 and "--debug" in out


def test_a_second_server_with_another_database_and_the_same_media_folder_refuses_and_deletes_nothing(
    tmp_path, database_url
):
    """A new operator starts a second instance on its own database but the default media folder."""
    media = tmp_path / "media"
    first_port = free_port()
    env = {
        "DEMO_COOKIE_SECRET": SECRET,
        "DEMO_DATABASE_URL": database_url,
        "DEMO_MEDIA_ROOT": str(media),
        "DEMO_SMS_BACKEND": f"file:{tmp_path / 'outbox.jsonl'}",
    }
    first = start(tmp_path, f"--port={first_port}", "--log_dir=", env=env)
    try:
        wait_for(f"http://127.0.0.1:{first_port}/readyz", first)
        token = register(first_port, tmp_path / "outbox.jsonl")
        picture = io.BytesIO()
        Image.new("RGB", (400, 300), (200, 40, 90)).save(picture, "PNG")
        status, body = call(
            first_port, "POST", "/images", body=picture.getvalue(), token=token, headers={"Content-Type": "image/png"}
        )
        assert status == 201, body
        path = f"/images/{body['image']['id']}.png"
        assert call(first_port, "GET", f"{path}?w=160")[0] == 200
        stored = sorted(p for p in media.rglob("*") if p.is_file() and "tmp" not in p.parts)

        second = start(
            tmp_path,
            f"--port={free_port()}",
            "--log_dir=",
            env={**env, "DEMO_DATABASE_URL": f"sqlite:///{tmp_path / 'second.sqlite3'}"},
        )
        out = finish(second, 30)
        assert second.returncode == 2, out
        assert "refusing to start" in out and "belongs to deployment" in out

        assert sorted(p for p in media.rglob("*") if p.is_file() and "tmp" not in p.parts) == stored
        assert call(first_port, "GET", path)[0] == 200 and call(first_port, "GET", f"{path}?w=160")[0] == 200
    finally:
        stop(first)
    assert first.returncode == 0


# -- refusals to start: one line naming the problem, an exit status per kind ------------------------


def refuse(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``python -m demo.main`` with sane settings plus ``args`` that should stop it; (status, stderr).
    The database and media folder are fresh ones in ``tmp_path``: a start that gets past the checks
    leaves ``db.sqlite3`` behind."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    environ.update(
        {
            "PYTHONPATH": str(ROOT),
            "DEMO_COOKIE_SECRET": SECRET,
            "DEMO_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
            "DEMO_MEDIA_ROOT": str(tmp_path / "media"),
            "DEMO_LOG_DIR": "",
            **(env or {}),
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "demo.main", f"--port={free_port()}", *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "refusing to start" in lines[0]
    return done.returncode, lines[0]


def a_file(tmp_path: Path) -> Path:
    """A regular file where a folder's parent should be: unwritable even for root."""
    path = tmp_path / "not-a-folder"
    path.write_text("")
    return path


def test_an_unreachable_database_is_one_line_with_the_password_masked(tmp_path):
    status, line = refuse(
        tmp_path, "--database_url=mysql+mysqldb://root:s3cret-pw@127.0.0.1:1/x", "--db_connect_timeout=1"
    )
    assert status == 3, line
    assert "mysql+mysqldb://root:***@127.0.0.1:1/x" in line and "s3cret-pw" not in line


def test_a_port_in_use_is_one_line_with_the_address_before_any_migration(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, line = refuse(tmp_path, f"--port={port}")
    assert status == 4, line
    assert f"127.0.0.1:{port}" in line and "in use" in line
    assert not (tmp_path / "db.sqlite3").exists()  # refused before migrating


def test_several_workers_refuse_a_port_in_use_too_also_by_another_reuseport_group(tmp_path):
    """SO_REUSEPORT would join another group of this user's sockets on the port (another demo with
    several workers): that is refused like any port in use, before any worker exists."""
    for reuse_port in (False, True):
        with socket.socket() as taken:
            if reuse_port:
                taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            status, line = refuse(tmp_path, f"--port={port}", "--processes=2")
        assert status == 4, line
        assert f"127.0.0.1:{port}" in line and "in use" in line
        assert not (tmp_path / "db.sqlite3").exists()  # refused before migrating


@pytest.mark.parametrize("option", ["media_root", "log_dir"])
def test_an_unwritable_folder_is_one_line_naming_it(tmp_path, option):
    folder = a_file(tmp_path) / "sub"
    status, line = refuse(tmp_path, f"--{option}={folder}")
    assert status == 5, line
    assert f"--{option}" in line and str(a_file(tmp_path)) in line
    assert not (tmp_path / "db.sqlite3").exists()


@pytest.mark.parametrize(
    "arg, named",
    [
        ("--log_level=verbose", "--log_level"),
        ("--sms_backend=smtp", "--sms_backend"),
        ("--port=abc", "--port=abc"),
        ("--port=70000", "--port"),
        ("--sms_countries=CN,XX", "--sms_countries"),
        ("--database_url=postgres+nodriver://u:pw-secret@h/db", "--database_url"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_option_before_any_migration(tmp_path, arg, named):
    status, line = refuse(tmp_path, arg)
    assert status == 2, line
    assert named in line and "pw-secret" not in line
    assert not (tmp_path / "db.sqlite3").exists()


def refused_after_migrating(tmp_path: Path, *args: str) -> tuple[int, str]:
    """A start that gets past the checks and the migration, then stops: (status, its last line)."""
    proc = start(tmp_path, f"--port={free_port()}", "--log_dir=", *args, env=server_env(tmp_path))
    out = finish(proc, 30)
    assert "Traceback" not in out, out
    return proc.returncode, out.strip().splitlines()[-1]


def test_an_unreachable_s3_store_is_one_line_with_status_5(tmp_path, s3_server):
    started = time.monotonic()
    status, line = refused_after_migrating(
        tmp_path, "--storage=s3://demo-test/down", "--s3_endpoint=http://127.0.0.1:9"
    )
    assert status == 5, line
    assert "refusing to start: --storage s3://demo-test/down" in line
    assert S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in line
    assert time.monotonic() - started < 20  # one quick retry, not obstore's minutes of back-off


def test_an_s3_store_of_another_deployment_is_refused(tmp_path, s3_server):
    """Two databases on one bucket prefix would delete each other's images: the second is refused."""
    store = [f"--{name}={value}" for name, value in s3_server.settings("shared").items()]
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
    port = free_port()
    proc = start(first, f"--port={port}", "--log_dir=", *store, env=server_env(first))
    try:
        assert wait_for(f"http://127.0.0.1:{port}/readyz", proc)["checks"] == {"database": "ok", "storage": "ok"}
    finally:
        stop(proc)
    status, line = refused_after_migrating(second, *store)
    assert status == 2, line
    assert "refusing to start" in line and "belongs to deployment" in line


def test_a_bad_environment_value_names_the_variable(tmp_path):
    status, line = refuse(tmp_path, env={"DEMO_PORT": "eighty"})
    assert status == 2 and "DEMO_PORT" in line


def test_a_missing_cookie_secret_is_one_line_with_status_2(tmp_path):
    status, line = refuse(tmp_path, env={"DEMO_COOKIE_SECRET": ""})
    assert status == 2 and "DEMO_COOKIE_SECRET" in line


# -- the request log --------------------------------------------------------------------------------


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "production"])
def test_successful_requests_are_logged_at_info_under_debug_only(tmp_path, debug):
    port = free_port()
    args = [
        f"--port={port}",
        f"--log_dir={tmp_path / 'log'}",
        f"--media_root={tmp_path / 'media'}",
        f"--database_url=sqlite:///{tmp_path / 'db.sqlite3'}",
    ]
    proc = start(tmp_path, *args, *(["--debug"] if debug else []), env={"DEMO_COOKIE_SECRET": SECRET})
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
        assert call(port, "GET", "/nope")[0] == 404
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out
    log_text = (tmp_path / "log" / "demo.log").read_text()
    assert re.search(r"WARNING \[\d+\] demo\.access: 404 GET /nope", log_text)  # production's request log
    logged_success = re.search(r"INFO \[\d+\] demo\.access: 200 GET /healthz", log_text)
    assert bool(logged_success) is debug, log_text
