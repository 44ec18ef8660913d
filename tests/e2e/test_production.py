"""Production, end to end: the shipped nginx sample in front of two real server processes on MariaDB.

The ``stack`` fixture renders ``demo/conf/nginx/demo.conf`` for temporary ports and folders (a few
explicit replacements; a token that is no longer in the shipped file fails the test, so the test
follows the file), makes a self-signed certificate with openssl, starts two ``demo/main.py``
processes on a fresh MariaDB database and one shared media folder, and runs Debian's nginx
(/usr/sbin/nginx) in front of them. The tests talk HTTPS to nginx as a phone would.
``s3_stack`` is the same on the S3 backend (SeaweedFS, a prefix of its own), nginx fetching the
images from the store through a ``StoreRelay`` that keeps what nginx sent; the image tests run on
both (``images``: ids ``[local]``, ``[s3]``).

Skipped when nginx, openssl or MariaDB is missing, unless DEMO_REQUIRE_MYSQL=1 (CI): then it fails.
The systemd, supervisor and logrotate samples are checked here too.
"""

from __future__ import annotations

import configparser
import contextlib
import gzip
import http.client
import io
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import obstore
import pytest
from obstore.store import S3Store
from PIL import Image

from demo.conf import settings as config
from tests.helpers import (
    ROOT,
    S3_BUCKET,
    S3_CREDENTIALS,
    HttpClient,
    LoopbackHTTPSConnection,
    Nginx,
    Response,
    SeaweedFS,
    ThrowawayDatabase,
    free_port,
    replace_all,
    sent_phone,
    sms_code,
    wait_until,
)

CONF = ROOT / "demo" / "conf"
NGINX_CONF = CONF / "nginx" / "demo.conf"
IMMUTABLE = "public, max-age=31536000, immutable"
HSTS = "max-age=63072000"
PASSWORD = "demo123456"
# The shipped file keeps images 30 s in nginx's cache, and each process remembers an image id for
# DEMO_IMAGE_LOOKUP_TTL; here 2 s and 1 s, so that "a deleted image is gone once both are over" takes
# seconds to watch (test_a_deleted_image_is_gone_within_60_seconds_as_shipped checks the real values).
TEST_CACHE_SECONDS = 2
TEST_LOOKUP_SECONDS = 1
WAIT = 30  # seconds: the bound on every wait in this module (also wait_until's default)

_phones = itertools.count(1000)


def new_phone() -> str:
    """A fresh national number per call, so SMS resend limits never meet between tests."""
    return f"1886666{next(_phones):04d}"


# -- the samples, without running anything ---------------------------------------------------------


def test_nginx_body_limit_agrees_with_the_app():
    """nginx refuses over DEMO_MAX_UPLOAD_BYTES plus multipart slack, never less than the app accepts."""
    shipped = NGINX_CONF.read_text()
    kib = int(re.search(r"^\s*client_max_body_size (\d+)k;", shipped, re.M).group(1))
    max_upload = config.defaults().max_upload_bytes
    assert kib * 1024 == max_upload + 64 * 1024  # what main.make_server gives Tornado as max_body_size
    assert f"limited to {max_upload // (1024 * 1024)} MiB" in shipped


def test_a_deleted_image_is_gone_within_60_seconds_as_shipped():
    """nginx keeps an image 30 s whatever max-age the app gives clients, and nginx may refill it from
    a process that still remembers the id for image_lookup_ttl: the two add up to the contract's 60 s."""
    shipped = NGINX_CONF.read_text()
    assert "proxy_cache_valid 200 30s;" in shipped
    assert re.search(r"proxy_ignore_headers [^;]*Cache-Control", shipped)
    assert 30 + config.defaults().image_lookup_ttl <= 60


def test_nginx_keeps_idle_connections_shorter_than_the_app():
    shipped = NGINX_CONF.read_text()
    keepalive = int(re.search(r"^\s*keepalive_timeout (\d+)s;", shipped, re.M).group(1))
    assert keepalive < config.defaults().idle_timeout


def test_the_store_s_host_is_the_same_in_both_places_it_is_named():
    """nginx connects to the store's upstream and signs nothing: the Host it sends must be the one the
    app signed for (DEMO_S3_ENDPOINT's host:port). As shipped, both KEEP IN SYNC lines name one store."""
    shipped = NGINX_CONF.read_text()
    upstream = re.search(r"upstream demo_store \{\s*server ([^;\s]+);", shipped).group(1)
    host = re.search(r'set \$demo_store_host "([^"]+)";', shipped).group(1)
    assert upstream == host
    store = shipped[shipped.index("location /_store/ {") :]
    store = store[: store.index("\n    }\n")]
    for line in ("internal;", "proxy_pass_request_headers off;", 'proxy_set_header Authorization "";'):
        assert line in store, line
    assert 'proxy_set_header Cookie "";' in store and "proxy_max_temp_file_size 0;" in store


def systemd_units() -> list[Path]:
    return [CONF / "systemd" / "demo@.service", CONF / "systemd" / "demo.service"]


@pytest.mark.parametrize("unit", systemd_units(), ids=lambda p: p.name)
def test_systemd_unit_stops_gracefully_and_reloads_logs(unit):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(unit.read_text())
    service = parser["Service"]
    grace = config.defaults().shutdown_grace
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > grace + 5
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "-m demo.main" in service["ExecStart"] and "--address=127.0.0.1" in service["ExecStart"]
    assert service["EnvironmentFile"] == "/etc/demo/demo.env"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert "/var/lib/demo" in service["ReadWritePaths"]
    if unit.name == "demo@.service":
        assert "--port=%i" in service["ExecStart"] and "--log_dir=/var/log/demo/%i" in service["ExecStart"]


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    for unit in systemd_units():
        # The one thing verify cannot find on a build machine: the installed interpreter.
        rendered = replace_all(unit.read_text(), [("/opt/demo/.venv/bin/python", sys.executable)], unit.name)
        (tmp_path / unit.name).write_text(rendered)
    (tmp_path / "demo@8001.service").symlink_to(tmp_path / "demo@.service")
    units = [str(tmp_path / "demo@8001.service"), str(tmp_path / "demo.service")]
    done = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_supervisor_sample_stops_gracefully():
    parser = configparser.RawConfigParser()
    parser.read_string((CONF / "supervisor" / "demo.conf").read_text())
    program = parser["program:demo"]
    assert program["stopsignal"] == "TERM"
    assert int(program["stopwaitsecs"]) > config.defaults().shutdown_grace + 5
    ports = [
        f"80{n:02d}"
        for n in range(int(program["numprocs_start"]), int(program["numprocs_start"]) + int(program["numprocs"]))
    ]
    assert ports == ["8001", "8002"]  # the upstream servers of the nginx sample
    for port in ports:
        assert f"server 127.0.0.1:{port} " in NGINX_CONF.read_text()
    assert "--port=80%(process_num)02d" in program["command"]
    assert "--address=127.0.0.1" in program["command"]


def test_logrotate_sample_parses(tmp_path):
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not os.path.exists(logrotate):
        pytest.skip("logrotate is not installed")
    conf = tmp_path / "demo"
    conf.write_text(
        replace_all(
            (CONF / "logrotate" / "demo").read_text(),
            [  # no `demo` user here
                ("su demo demo", "su root root"),
                ("create 0640 demo demo", "create 0640 root root"),
            ],
            "logrotate/demo",
        )
    )
    done = subprocess.run(
        [logrotate, "-d", "-s", str(tmp_path / "state"), str(conf)], capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr.lower(), done.stderr


# -- the running stack -------------------------------------------------------------------------------


class Client(HttpClient):
    """A phone talking HTTPS to nginx from ``ip`` (any 127.x address: nginx sees it as the client)."""

    def __init__(self, stack: Stack, ip: str = "127.0.0.1") -> None:
        super().__init__(stack.base_url, tls=stack.tls, source_ip=ip, timeout=WAIT)
        self.stack = stack
        self.ip = ip

    def register(self, phone: str | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
        phone = phone or new_phone()
        sent = self.post("/users/code", {"phone": phone}, headers=headers)
        assert sent.code == 200, sent.body
        code = self.stack.sms_code(sent_phone(phone))
        made = self.post("/users/regist", {"phone": phone, "password": PASSWORD, "code": code}, headers=headers)
        assert made.code == 201, made.body
        return {**made.json, "phone": phone}

    def upload(self, token: str, image: bytes, path: str = "/images") -> Response:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                f"Content-Type: image/png\r\n\r\n"
            ).encode()
            + image
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return self.request(
            "POST", path, body=body, token=token, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )


def png(width: int, height: int) -> bytes:
    """Random pixels: PNG cannot compress them, so the file is about width*height*3 bytes."""
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(out, "PNG")
    return out.getvalue()


class Worker:
    """One ``demo/main.py`` process on its own port, as demo@<port>.service runs it."""

    def __init__(self, stack: Stack, port: int) -> None:
        self.stack = stack
        self.port = port
        self.log_dir = stack.tmp / "log" / str(port)
        self.proc: subprocess.Popen | None = None
        self.output = stack.tmp / f"worker-{port}.out"

    def start(self) -> None:
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "demo" / "main.py"),
                    f"--port={self.port}",
                    "--address=127.0.0.1",
                    f"--log_dir={self.log_dir}",
                    "--log_level=debug",
                ],  # the tests read 2xx access lines
                cwd=self.stack.tmp,
                env=self.stack.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self) -> None:
        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"worker {self.port} exited early:\n{self.output.read_text()[-3000:]}")
            try:
                return HttpClient(f"http://127.0.0.1:{self.port}", timeout=2).get("/healthz").code == 200
            except OSError:
                return False

        wait_until(ready, f"worker {self.port} to answer", every=0.1)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
            raise AssertionError(f"worker {self.port} did not stop on signal {signum}") from None

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("demo.log*")))


class StoreRelay:
    """A TCP relay between nginx and the store: keeps every byte nginx sent (its requests to the store),
    can be stopped (the store unreachable for nginx, while the app still reaches it) and can spoil the
    presigned URLs' signatures on the way (the store then refuses them with a 403)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.spoil = False
        self._sent = bytearray()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []

    def sent(self) -> bytes:
        with self._lock:
            return bytes(self._sent)

    def start(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones (nginx's idle keep-alive connections included)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                store = socket.create_connection(("127.0.0.1", self.target_port), timeout=WAIT)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, store]
            threading.Thread(target=self._pump, args=(client, store, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(store, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_nginx: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_nginx:
                    with self._lock:
                        self._sent += data
                    if self.spoil:
                        data = data.replace(b"X-Amz-Signature=", b"X-Amz-Signature=0")
                sink.sendall(data)
        except OSError:
            pass
        finally:  # one side closed: close both (the other pump then stops too)
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._open = [sock for sock in self._open if sock not in (source, sink)]


class Stack:
    def __init__(self, tmp: Path, database_url: str, nginx: type[Nginx], store: SeaweedFS | None = None) -> None:
        self.tmp = tmp
        self.database_url = database_url
        self.outbox = tmp / "outbox.jsonl"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "PROMETHEUS_"))}
        self.env.update(
            {
                "DEMO_COOKIE_SECRET": "production-test-" + secrets.token_hex(16),  # 48 characters
                "DEMO_DATABASE_URL": database_url,
                "DEMO_MEDIA_ROOT": str(tmp / "media"),  # one folder shared by both processes
                "DEMO_SMS_BACKEND": f"file:{self.outbox}",
                "DEMO_SMS_IP_HOURLY": "3",
                "DEMO_SHUTDOWN_GRACE": "20",
                "DEMO_DB_POOL_SIZE": "4",
                "DEMO_IMAGE_LOOKUP_TTL": str(TEST_LOOKUP_SECONDS),
            }
        )
        # On the S3 backend: a prefix of the test bucket of its own, and a relay in front of the store
        # for nginx (the app reaches the store directly, as it signs for DEMO_S3_ENDPOINT).
        self.store, self.relay, self.backend = store, None, "local"
        if store is not None:
            self.backend = "s3"
            self.prefix = f"prod-{uuid.uuid4().hex[:12]}"
            self.env.update({f"DEMO_{name.upper()}": value for name, value in store.settings(self.prefix).items()})
            self.env.update(S3_CREDENTIALS)
            self.relay = StoreRelay(store.ports["-s3.port"])
        self.workers = [Worker(self, free_port()), Worker(self, free_port())]
        # The shipped config with test ports and folders (rendered as for the benchmark), the app's own
        # static folder, and a short image cache so expiry can be watched.
        self.nginx = nginx(
            tmp,
            [w.port for w in self.workers],
            ROOT / "demo" / "static",
            extra=[
                ("proxy_cache_valid 200 30s;", f"proxy_cache_valid 200 {TEST_CACHE_SECONDS}s;"),
                # Every client here is on loopback: only 127.0.0.1 stays "internal" for /readyz, so a
                # phone on another 127.x address plays the public.
                ("allow 127.0.0.0/8;", "allow 127.0.0.1;"),
            ],
            store_endpoint=store.endpoint if store else None,
            store_address=self.relay.address if self.relay else None,
        )
        self.https_port, self.http_port = self.nginx.https_port, self.nginx.http_port
        self.base_url = self.nginx.base_url
        self.cert, self.nginx_dir = self.nginx.cert, self.nginx.dir
        self.tls: ssl.SSLContext | None = None  # trusts the self-signed certificate, once it exists

    # -- set-up ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.relay is not None:
            self.relay.start()
        for worker in self.workers:  # at once: the two processes race to migrate the fresh database
            worker.start()
        self.nginx.start()
        self.tls = self.nginx.client_tls()
        for worker in self.workers:
            worker.wait_ready()

        def nginx_up() -> bool:
            if not self.nginx.running():
                raise AssertionError(f"nginx exited: {self.nginx.logs()}")
            try:
                return self.client().get("/healthz").code == 200
            except OSError:
                return False

        wait_until(nginx_up, "nginx to answer", every=0.1)

    def ensure_workers(self) -> None:
        """Restart whichever worker a test stopped, and wait until nginx uses both again."""
        restarted = [worker for worker in self.workers if not worker.running()]
        for worker in restarted:
            worker.start()
        for worker in self.workers:
            worker.wait_ready()
        if restarted:
            self.wait_nginx_uses(self.workers)

    def wait_nginx_uses(self, workers: list[Worker]) -> None:
        """nginx leaves a process that failed alone for fail_timeout: wait until it sends to each again."""
        seen: set[int] = set()

        def reached_all() -> bool:
            rid = f"probe-{uuid.uuid4().hex}"
            try:
                self.client().get("/healthz", headers={"X-Request-Id": rid})
            except OSError:
                return False
            time.sleep(0.02)  # the log line is written just after the answer
            seen.update(w.port for w in workers if rid in w.log())
            return len(seen) == len(workers)

        wait_until(reached_all, "nginx to send requests to every process again", every=0.1)

    def stop(self) -> None:
        self.nginx.stop()
        if self.relay is not None:
            self.relay.stop()
        for worker in self.workers:
            if worker.running():
                worker.proc.send_signal(signal.SIGTERM)
        for worker in self.workers:
            if worker.proc is not None:
                try:
                    worker.proc.wait(timeout=WAIT)
                except subprocess.TimeoutExpired:
                    worker.proc.kill()
                    worker.proc.wait(timeout=10)

    # -- use ------------------------------------------------------------------------------------
    def client(self, ip: str = "127.0.0.1") -> Client:
        return Client(self, ip)

    def direct(self, worker: Worker, path: str, headers: dict[str, str] | None = None) -> Response:
        """A request straight to one Tornado process, bypassing nginx (what only loopback may do)."""
        return HttpClient(f"http://127.0.0.1:{worker.port}", timeout=WAIT).get(path, headers=headers)

    def sms_code(self, phone: str) -> str:
        return sms_code(self.outbox, phone)

    def images_log(self) -> str:
        """nginx's log of the loopback image server: one line per image the cache asked for."""
        path = self.nginx_dir / "logs" / "demo.images.log"
        return path.read_text() if path.exists() else ""

    def app_log(self) -> str:
        return "".join(worker.log() for worker in self.workers)

    def logged(self, pattern: str, times: int = 1) -> str:
        """Wait until the app's logs match ``pattern`` ``times`` times (a line is written just after
        its answer is sent), then insist on exactly that many; the logs."""
        wait_until(
            lambda: len(re.findall(pattern, self.app_log())) >= times, f"{pattern!r} in the app's log", timeout=10
        )
        log = self.app_log()
        assert len(re.findall(pattern, log)) == times, f"{pattern!r} should be logged {times} times:\n{log}"
        return log


def running_stack(
    tmp_path_factory: pytest.TempPathFactory, mysql_server_url: str, nginx: type[Nginx], store: SeaweedFS | None
) -> Iterator[Stack]:
    running: Stack | None = None
    with ThrowawayDatabase(mysql_server_url, "demo_prod") as database:
        try:
            running = Stack(tmp_path_factory.mktemp("production"), database.url, nginx, store)
            running.start()
            yield running
        finally:
            if running is not None:
                running.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mysql_server_url: str, nginx: type[Nginx]) -> Iterator[Stack]:
    """nginx with the shipped sample, two server processes, a fresh MariaDB database, images in a local
    folder; torn down after."""
    yield from running_stack(tmp_path_factory, mysql_server_url, nginx, None)


@pytest.fixture(scope="module")
def s3_stack(
    tmp_path_factory: pytest.TempPathFactory, mysql_server_url: str, nginx: type[Nginx], s3_server: SeaweedFS
) -> Iterator[Stack]:
    """The same with the images on SeaweedFS (a prefix of their own), nginx reaching it through a relay."""
    yield from running_stack(tmp_path_factory, mysql_server_url, nginx, s3_server)


@pytest.fixture
def live(stack: Stack) -> Stack:
    """The stack with both workers up, whatever the previous test did to them."""
    stack.ensure_workers()
    return stack


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def images(request: pytest.FixtureRequest) -> Stack:
    """``live`` on the local folder, then on the S3 store: for the tests of image delivery."""
    running: Stack = request.getfixturevalue("stack" if request.param == "local" else "s3_stack")
    running.ensure_workers()
    if running.relay is not None:  # as a test that stopped or spoiled it may have left it
        running.relay.spoil = False
        running.relay.start()
    return running


# -- HTTPS at the door -------------------------------------------------------------------------------


def test_http_redirects_to_https_and_unknown_names_get_nothing(live):
    plain = HttpClient(f"http://127.0.0.1:{live.http_port}", timeout=WAIT)
    moved = plain.get("/users/me?x=1", headers={"Host": "localhost"})
    assert moved.code == 301
    assert moved.header("Location") == f"https://localhost:{live.https_port}/users/me?x=1"

    # certbot's webroot challenge is answered over plain HTTP.
    (live.nginx_dir / "acme" / ".well-known" / "acme-challenge" / "token123").write_text("proof")
    answer = plain.get("/.well-known/acme-challenge/token123", headers={"Host": "localhost"})
    assert (answer.code, answer.body) == (200, b"proof")

    # Another Host on port 80: the connection is closed without an answer.
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        plain.get("/healthz", headers={"Host": "evil.example"})

    # Another name over TLS: the handshake is refused (SNI), or the request dropped (Host).
    context = ssl.create_default_context(cafile=str(live.cert))
    context.check_hostname = False
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        LoopbackHTTPSConnection(
            "localhost", live.https_port, context=context, timeout=WAIT, sni="evil.example"
        ).connect()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        live.client().get("/healthz", headers={"Host": "evil.example"})


def handshake(live: Stack, context: ssl.SSLContext) -> tuple[str, str]:
    with (
        socket.create_connection(("127.0.0.1", live.https_port), timeout=WAIT) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        return tls.version(), tls.cipher()[0]


def test_tls_1_2_and_1_3_only_with_the_intermediate_ciphers_and_hsts(live):
    allowed = re.search(r"^\s*ssl_ciphers ([^;]+);", NGINX_CONF.read_text(), re.M).group(1).split(":")
    assert handshake(live, ssl.create_default_context(cafile=str(live.cert)))[0] == "TLSv1.3"
    tls12 = ssl.create_default_context(cafile=str(live.cert))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = handshake(live, tls12)
    assert version == "TLSv1.2" and cipher in allowed

    # Not forward-secret, or CBC: refused by the server (the client offered them).
    weak = ssl.create_default_context(cafile=str(live.cert))
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("AES128-SHA:AES256-GCM-SHA384:ECDHE-RSA-AES128-SHA")
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        handshake(live, weak)
    # TLS 1.1 (Debian's nginx.conf allows it at http level; the sample's servers must not).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(live.cert))
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        handshake(live, old)

    answer = live.client().get("/healthz")
    assert answer.code == 200 and answer.header("Strict-Transport-Security") == HSTS


# -- behind the proxy: scheme and client address -------------------------------------------------------

SPOOFED = {
    "X-Forwarded-Proto": "http",
    "X-Scheme": "http",
    "X-Real-IP": "198.51.100.7",
    "X-Forwarded-For": "198.51.100.8, 203.0.113.9",
}


def test_urls_are_https_and_the_h5_cookie_is_secure(live):
    """Scenarios 1 and 3 through nginx; a client claiming plain HTTP changes nothing."""
    phone = live.client("127.0.0.21")
    session = phone.register(headers=SPOOFED)
    prefix = f"https://localhost:{live.https_port}/"
    assert session["h5_url"].startswith(prefix + "h5/home?ticket=")
    login = phone.post("/users/login", {"phone": session["phone"], "password": PASSWORD}, headers=SPOOFED)
    assert login.code == 200 and login.json["h5_url"].startswith(prefix)
    ticket = phone.post("/h5/ticket", token=session["token"], headers=SPOOFED)
    assert ticket.code == 200 and ticket.json["h5_url"].startswith(prefix)

    opened = phone.get(session["h5_url"], headers=SPOOFED)
    assert opened.code == 302, opened.body
    assert opened.header("Location") in ("/h5/home", prefix + "h5/home")
    cookie = next(c for c in opened.all("Set-Cookie") if c.startswith("demo_h5="))
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite"} <= attributes, cookie
    assert opened.header("Strict-Transport-Security") == HSTS

    home = phone.get("/h5/home", headers={"Cookie": cookie.split(";")[0], "Accept-Encoding": "gzip", **SPOOFED})
    assert home.code == 200 and home.header("Content-Type").startswith("text/html")
    assert home.header("Content-Encoding") is None  # no compression on H5 pages (BREACH)
    assert b"/static/h5/" in home.body

    no_ticket = phone.get("/h5/home")
    assert no_ticket.code == 401 and no_ticket.header("Content-Type").startswith("text/html")


def test_rate_limits_see_the_address_nginx_saw_not_the_one_the_client_claims(live):
    """DEMO_SMS_IP_HOURLY=3: a fourth code from one address is refused, whatever it claims to be."""
    attacker = live.client("127.0.0.31")
    for i in range(3):
        claims = {"X-Real-IP": f"198.51.100.{i + 10}", "X-Forwarded-For": f"198.51.100.{i + 20}, 203.0.113.{i}"}
        sent = attacker.post("/users/code", {"phone": new_phone()}, headers=claims)
        assert sent.code == 200, sent.body
    refused = attacker.post(
        "/users/code",
        {"phone": new_phone()},
        headers={"X-Real-IP": "198.51.100.99", "X-Forwarded-For": "198.51.100.98"},
    )
    assert refused.code == 429 and refused.error == "rate_limited"
    assert int(refused.header("Retry-After")) > 0
    # Someone else (another address, as nginx sees it) is not held back.
    assert live.client("127.0.0.32").post("/users/code", {"phone": new_phone()}).code == 200

    # The addresses came from nginx's X-Real-IP, not from the TCP peer (nginx connects from 127.0.0.1).
    live.logged(r"POST /users/code .* ip=127\.0\.0\.31 ", 4)
    log = live.logged(r"POST /users/code .* ip=127\.0\.0\.32 ", 1)
    assert "198.51.100." not in log and "203.0.113." not in log


def test_forwarded_headers_are_believed_so_the_app_must_listen_on_loopback_only(live):
    """Why --address defaults to 127.0.0.1: the default trusted proxy is loopback (nginx on this
    machine), so a process there that reaches the port directly can claim any address."""
    assert config.defaults().address == "127.0.0.1"
    direct = live.direct(live.workers[0], "/healthz", headers={"X-Real-IP": "192.0.2.44"})
    assert direct.code == 200
    live.logged(r"GET /healthz .* ip=192\.0\.2\.44 ", 1)


# -- images from nginx --------------------------------------------------------------------------------


def test_images_come_from_nginx_with_the_contract_headers(images):
    phone = images.client("127.0.0.41")
    session = phone.register()
    uploaded = phone.upload(session["token"], png(600, 400))
    assert uploaded.code == 201, uploaded.body
    image = uploaded.json["image"]
    prefix = f"https://localhost:{images.https_port}/images/{image['id']}.png"
    assert image["url"] == prefix and uploaded.header("Location") == prefix
    assert image["thumbnails"] == {w: f"{prefix}?w={w}" for w in ("160", "320", "640", "1280")}
    path = f"/images/{image['id']}.png"
    reference = images.direct(images.workers[0], path)  # what the app itself sends
    assert reference.code == 200

    # The phone's cookie and token travel with the first request, which fills the cache: they must not
    # reach the store.
    first = phone.get(path, token=session["token"], headers={"Cookie": f"demo_h5={SECRET_COOKIE}"})
    second = phone.get(path)
    assert first.header("X-Cache-Status") == "MISS" and second.header("X-Cache-Status") == "HIT"
    for answer in (first, second):
        assert answer.code == 200 and answer.body == reference.body
        assert answer.header("Content-Type") == "image/png"
        assert answer.header("ETag") == reference.header("ETag") == f'"{image["sha256"]}"'
        assert answer.header("Cache-Control") == IMMUTABLE
        assert answer.header("Content-Security-Policy") == "sandbox"
        assert answer.header("X-Content-Type-Options") == "nosniff"
        assert answer.header("Accept-Ranges") == "bytes"
        assert answer.header("Strict-Transport-Security") == HSTS
        assert len(answer.all("X-Request-Id")) == 1
    assert first.header("X-Request-Id") != second.header("X-Request-Id")  # not replayed from the cache

    ranged = phone.get(path, headers={"Range": "bytes=0-99"})
    assert ranged.code == 206 and ranged.header("X-Cache-Status") == "HIT"
    assert ranged.body == reference.body[:100]
    assert ranged.header("Content-Range") == f"bytes 0-99/{len(reference.body)}"
    assert ranged.header("ETag") == reference.header("ETag")
    assert ranged.header("Content-Security-Policy") == "sandbox"
    assert ranged.header("Cache-Control") == IMMUTABLE

    fresh = phone.get(path, headers={"If-None-Match": reference.header("ETag")})
    assert fresh.code == 304 and fresh.body == b"" and fresh.header("X-Cache-Status") == "HIT"
    assert fresh.header("ETag") == reference.header("ETag") and fresh.header("Cache-Control") == IMMUTABLE

    head = phone.request("HEAD", path)
    assert head.code == 200 and head.body == b""
    assert int(head.header("Content-Length")) == len(reference.body)

    # A thumbnail is its own cache entry; a Range on the very first request (MISS) works too.
    thumb = images.direct(images.workers[1], f"{path}?w=160")
    thumb_range = phone.get(f"{path}?w=160", headers={"Range": "bytes=0-99"})
    assert thumb_range.code == 206 and thumb_range.header("X-Cache-Status") == "MISS"
    assert thumb_range.body == thumb.body[:100] and thumb_range.header("ETag") == thumb.header("ETag")
    assert thumb.header("ETag") != reference.header("ETag")
    # A Range past the end: answered by nginx from the cache, with the contract's error body.
    beyond = phone.get(path, headers={"Range": f"bytes={len(reference.body) + 10}-"})
    assert beyond.code == 416 and beyond.error == "range_not_satisfiable"
    assert beyond.header("Content-Range") == f"bytes */{len(reference.body)}"
    assert "no-store" in beyond.all("Cache-Control")

    # Six requests for the image went through nginx, yet the app answered twice only: once straight
    # to this test, once to fill the cache. The same for the thumbnail.
    images.logged(rf"GET {re.escape(path)} ", 2)
    images.logged(rf"GET {re.escape(path)}\?w=160 ", 2)
    # And on S3 the app sent none of the bytes of the fills: the store did.
    filled_from(images, path, image["sha256"], None, len(reference.body))
    filled_from(images, f"{path}?w=160", image["sha256"], 160, len(thumb.body))
    if images.relay is not None:
        nothing_of_the_phone_reached_the_store(images, [session["token"], SECRET_COOKIE])


SECRET_COOKIE = "the-phone-s-own-cookie"


def filled_from(stack: Stack, path: str, sha256: str, width: int | None, size: int) -> None:
    """The image server's log line of the cache fill of ``path``. With the local folder the app sent the
    bytes; on S3 the app answered with X-Accel-Redirect (no body: the line's URI is the store's object,
    its upstreams the app, then, after " : ", the store) and the store sent the ``size`` bytes."""
    if stack.relay is None:
        uri = path.split("?")[0]  # the log has the path without its query (see log_format)
        line = rf'"GET {re.escape(uri)} HTTP/1\.1" 200 {size} \S+ up=127\.0\.0\.1:\d+/200/'
    else:
        kind, suffix = ("blobs", "") if width is None else ("thumbs", f"-w{width}")
        name = f"{S3_BUCKET}/{stack.prefix}/{kind}/{sha256[:2]}/{sha256[2:4]}/{sha256}{suffix}"
        upstreams = rf"127\.0\.0\.1:\d+ : {re.escape(stack.relay.address)}/200 : 200/"
        line = rf'"GET /_store/{re.escape(name)} HTTP/1\.1" 200 {size} \S+ up={upstreams}'
    wait_until(lambda: re.search(line, stack.images_log()), f"{line!r} in the image server's log", timeout=10)
    assert len(re.findall(line, stack.images_log())) == 1, stack.images_log()


def nothing_of_the_phone_reached_the_store(stack: Stack, secrets_sent: list[str]) -> None:
    """nginx's requests to the store carry the signed Host and nothing else of the phone's request."""
    assert stack.store is not None and stack.relay is not None
    host = urlsplit(stack.store.endpoint).netloc  # what the app signed for: any other would be a 403
    requests = [r for r in stack.relay.sent().split(b"\r\n\r\n") if r.startswith(b"GET ")]
    assert requests
    for request in requests:
        line, *fields = request.decode().split("\r\n")
        assert line.startswith(f"GET /{S3_BUCKET}/{stack.prefix}/") and "X-Amz-Signature=" in line, line
        assert fields == [f"Host: {host}"], request  # no Cookie, Authorization, X-Forwarded-*, Range...
    for secret in secrets_sent:
        assert secret.encode() not in stack.relay.sent()


def test_the_image_cache_keeps_one_entry_per_path_and_width(images):
    """Other parameters and spellings of an image URL use the entry of the plain URL, and the app is
    asked for exactly what the key names: no spelling stores one answer under another's key."""
    phone = images.client("127.0.0.43")
    session = phone.register()
    image = phone.upload(session["token"], png(400, 300)).json["image"]
    path = f"/images/{image['id']}.png"
    plain = phone.get(path)
    assert plain.code == 200 and plain.header("X-Cache-Status") == "MISS"
    for spelling in (f"{path}?junk=1", f"{path}?junk=2&x=%01", path.replace(".png", "%2Epng")):
        again = phone.get(spelling)
        assert again.header("X-Cache-Status") == "HIT" and again.body == plain.body, spelling
    thumb = phone.get(f"{path}?w=160")
    assert thumb.header("X-Cache-Status") == "MISS" and thumb.body != plain.body
    for spelling in (f"{path}?junk=1&w=160", f"{path}?w=160&w=320"):
        again = phone.get(spelling)
        assert again.header("X-Cache-Status") == "HIT" and again.body == thumb.body, spelling
    images.logged(rf"GET {re.escape(path)} ", 1)
    images.logged(rf"GET {re.escape(path)}\?w=160 ", 1)

    # A first request spelled "W=320" (nginx's $arg_w ignores letter case; Tornado does not) fills
    # the entry of w=320 with the 320 thumbnail, not with the full image.
    first = phone.get(f"{path}?W=320")
    assert first.header("X-Cache-Status") == "MISS"
    expected = images.direct(images.workers[0], f"{path}?w=320").body
    assert first.body == expected and phone.get(f"{path}?w=320").body == expected


def test_many_ranges_get_the_whole_file_never_a_multipart_answer(images):
    """A Range with hundreds of parts made nginx send each part with its own headers: a multipart
    answer many times the file's size. More than one range: the whole file, once."""
    phone = images.client("127.0.0.45")
    session = phone.register()
    uploaded = phone.upload(session["token"], png(40, 40))
    assert uploaded.code == 201, uploaded.body
    many = "bytes=" + ",".join(f"{n}-{n}" for n in range(0, 1200, 2))  # 600 one-byte ranges
    image_path = f"/images/{uploaded.json['image']['id']}.png"
    for path in (image_path, image_path, "/static/h5/h5.css"):  # a cache MISS, a HIT, a static file
        whole = phone.get(path)
        assert whole.code == 200
        answer = phone.get(path, headers={"Range": many})
        assert answer.code == 200 and answer.body == whole.body, (path, answer.code, len(answer.body))
        assert "multipart" not in answer.header("Content-Type")
    single = phone.get(image_path, headers={"Range": "bytes=0-9"})
    assert single.code == 206 and len(single.body) == 10


def test_a_deleted_image_is_gone_once_both_caches_expired(images):
    phone = images.client("127.0.0.51")
    session = phone.register()
    uploaded = phone.upload(session["token"], png(64, 64))
    assert uploaded.code == 201, uploaded.body
    path = f"/images/{uploaded.json['image']['id']}.png"
    assert phone.get(path).code == 200
    assert phone.get(path).header("X-Cache-Status") == "HIT"

    deleted_at = time.monotonic()
    assert phone.request("DELETE", path.removesuffix(".png"), token=session["token"]).code == 204

    def gone_from_cache() -> Response | None:
        answer = phone.get(path)
        assert answer.code in (200, 404), answer.body  # the cached copy, until it expires
        return answer if answer.code == 404 else None

    bound = TEST_CACHE_SECONDS + TEST_LOOKUP_SECONDS
    gone = wait_until(gone_from_cache, "the deleted image to leave the caches", timeout=bound + 5, every=0.2)
    assert time.monotonic() - deleted_at <= bound + 1.5
    assert gone.error == "not_found" and gone.header("Content-Type").startswith("application/json")


@pytest.mark.s3
def test_a_store_nginx_cannot_use_is_a_503_and_a_lost_object_a_404(s3_stack):
    """What nginx does when the store fails it (the app still reaching the store): unreachable, or
    refusing the presigned URL (an expired or spoiled signature: 403), is the contract's 503 in JSON
    and is not cached; an object gone from the store is the JSON 404. Never the image's headers."""
    live, relay = s3_stack, s3_stack.relay
    live.ensure_workers()
    phone = live.client("127.0.0.53")
    session = phone.register()
    uploaded = [phone.upload(session["token"], png(32 + n, 32)) for n in range(3)]
    assert [u.code for u in uploaded] == [201] * 3, [u.body for u in uploaded]
    down, refused, lost = (f"/images/{u.json['image']['id']}.png" for u in uploaded)

    def is_json_error(answer: Response, code: int, error: str) -> None:
        assert (answer.code, answer.error) == (code, error), (answer.code, answer.body[:300])
        assert answer.header("Content-Type") == "application/json"
        assert IMMUTABLE not in answer.all("Cache-Control") and answer.header("ETag") is None
        assert answer.header("Content-Security-Policy") is None

    try:
        relay.stop()
        started = time.monotonic()
        is_json_error(phone.get(down), 503, "unavailable")
        assert time.monotonic() - started < 3  # refused at once: no waiting on a dead store
        relay.spoil = True
        relay.start()
        is_json_error(phone.get(refused), 503, "unavailable")
    finally:
        relay.spoil = False
        relay.start()
    for path in (down, refused):  # the store is back: the 503s were not cached
        again = phone.get(path)
        assert again.code == 200 and again.header("X-Cache-Status") == "MISS", again.body[:300]
        assert again.body == live.direct(live.workers[0], path).body

    sha256 = uploaded[2].json["image"]["sha256"]
    store = S3Store(
        S3_BUCKET,
        prefix=live.prefix,
        config={"endpoint": live.store.endpoint, "region": "us-east-1", **aws_keys()},
        client_options={"allow_http": True},
    )
    obstore.delete(store, f"blobs/{sha256[:2]}/{sha256[2:4]}/{sha256}")
    is_json_error(phone.get(lost), 404, "not_found")


def aws_keys() -> dict[str, str]:
    return {
        "access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


# -- nginx's own answers -------------------------------------------------------------------------------


def post_raw(live: Stack, ip: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
    """POST the whole body even when the server answers early (nginx reads and drops the rest)."""
    conn = live.client(ip).connection()
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the answer waits in the socket
            conn.request("POST", path, body=body, headers=headers)
        answer = conn.getresponse()
        return Response(answer.status, answer.headers, answer.read())
    finally:
        conn.close()


def test_an_oversized_upload_gets_nginx_s_413_as_json(live):
    phone = live.client("127.0.0.61")
    session = phone.register()
    auth = {"Authorization": f"Bearer {session['token']}", "Content-Type": "image/png"}
    max_upload = config.defaults().max_upload_bytes

    too_big = post_raw(live, "127.0.0.61", "/images", os.urandom(max_upload + 1024 * 1024), auth)
    assert too_big.code == 413 and too_big.error == "too_large"
    assert too_big.header("Content-Type") == "application/json"
    assert too_big.header("X-Content-Type-Options") == "nosniff" and too_big.header("X-Request-Id")
    assert too_big.header("Strict-Transport-Security") == HSTS
    # The H5 page's upload (an XHR reading JSON) gets the same answer.
    h5 = post_raw(live, "127.0.0.61", "/h5/images", os.urandom(max_upload + 1024 * 1024), {"Content-Type": "image/png"})
    assert h5.code == 413 and h5.error == "too_large"
    assert "413 POST /images" not in live.app_log() and "413 POST /h5/images" not in live.app_log()

    # Just over the app's limit but inside nginx's slack: the app refuses it, in the same shape.
    over = post_raw(live, "127.0.0.61", "/images", os.urandom(max_upload + 1), auth)
    assert over.code == 413 and over.error == "too_large"
    live.logged("413 POST /images ", 1)


def test_metrics_are_not_reachable_from_outside(live):
    phone = live.client()
    for path in ("/metrics", "//metrics", "/%6detrics", "/metrics?format=text"):
        hidden = phone.get(path)
        assert hidden.code == 404 and hidden.error == "not_found", path
        assert hidden.header("Content-Type") == "application/json"
    # Prometheus scrapes each process on loopback.
    for worker in live.workers:
        scraped = live.direct(worker, "/metrics")
        assert scraped.code == 200, scraped.body[:300]
        assert scraped.header("Content-Type").startswith("text/plain")
        assert b"demo_requests_total" in scraped.body


def test_readiness_is_answered_to_internal_addresses_only(live):
    for path in ("/readyz", "//readyz", "/%72eadyz", "/readyz?x=1"):
        hidden = live.client("127.0.0.91").get(path)
        assert hidden.code == 404 and hidden.error == "not_found", path
        assert hidden.header("Content-Type") == "application/json"
    ready = live.client().get("/readyz")  # the load balancer's address (here 127.0.0.1)
    assert ready.code == 200 and ready.json["checks"] == {"database": "ok", "storage": "ok"}


def test_text_is_compressed_and_static_files_come_from_disk(live):
    phone = live.client()
    document = phone.get("/openapi.yaml", headers={"Accept-Encoding": "gzip"})
    assert document.code == 200 and document.header("Content-Encoding") == "gzip"
    assert gzip.decompress(document.body) == live.direct(live.workers[0], "/openapi.yaml").body

    css = ROOT / "demo" / "static" / "h5" / "h5.css"
    versioned = phone.get("/static/h5/h5.css?v=0123abcd")
    assert versioned.code == 200 and versioned.body == css.read_bytes()
    assert versioned.header("Cache-Control") == IMMUTABLE
    assert versioned.header("Content-Type") == "text/css"
    assert versioned.header("X-Content-Type-Options") == "nosniff"
    assert versioned.header("Strict-Transport-Security") == HSTS
    assert phone.get("/static/h5/h5.css").header("Cache-Control") == "no-cache"
    missing = phone.get("/static/h5/nope.css")
    assert missing.code == 404 and missing.error == "not_found"
    outside = phone.get("/static/../demo/main.py")  # nginx resolves it to /demo/main.py: the app's 404/403
    assert outside.code in (400, 403, 404) and b"import" not in outside.body
    assert "/static/h5/h5.css" not in live.app_log()  # nginx served them, not Python


def test_with_every_process_down_nginx_answers_the_contract_s_503(live):
    """The contract maps `unavailable` to 503: nginx's own answer when no process answers is that, in
    JSON for the API and images, and for /h5/ the app's error page in the H5 look with its headers."""
    phone = live.client()
    app_page = phone.get("/h5/home")  # the app's own 401 page: the headers H5 pages carry
    assert app_page.code == 401 and app_page.header("Content-Security-Policy")
    for worker in live.workers:
        assert worker.stop() == 0
    api = phone.get("/users/me")
    assert api.code == 503 and api.error == "unavailable" and api.header("Retry-After")
    assert api.header("Content-Type") == "application/json"
    image = phone.get("/images/AbCdEfGh.png")
    assert image.code == 503 and image.error == "unavailable"
    assert image.header("Content-Type") == "application/json"

    page = phone.get("/h5/home")
    assert page.code == 503 and page.header("Content-Type") == "text/html" and page.header("Retry-After")
    assert page.body == (ROOT / "demo" / "static" / "h5" / "unavailable.html").read_bytes()
    for name in ("Content-Security-Policy", "Referrer-Policy", "Cache-Control", "X-Content-Type-Options"):
        assert page.header(name) == app_page.header(name), name
    assert page.header("Strict-Transport-Security") == HSTS and page.header("X-Request-Id")
    stylesheet = re.search(rb'<link rel="stylesheet" href="([^"]+)"', page.body).group(1).decode()
    css = phone.get(stylesheet)
    assert css.code == 200 and css.header("Content-Type") == "text/css" and b".notice" in css.body
    posted = phone.post("/h5/logout")  # whatever the method (nginx sends files for GET and HEAD only)
    assert posted.code == 503 and posted.body == page.body
    direct = phone.get("/static/h5/unavailable.html")  # nginx's error page only, never a page of its own
    assert direct.code == 404 and direct.error == "not_found"

    live.ensure_workers()
    wait_until(lambda: phone.get("/readyz").code == 200, "nginx to reach the restarted processes")


# -- processes: logs, graceful stop, crashes ---------------------------------------------------------


def test_the_logrotate_sample_rotates_and_every_process_reopens_its_log(live, tmp_path):
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not os.path.exists(logrotate):
        pytest.skip("logrotate is not installed")
    logs = live.tmp / "log"
    pids = " ".join(str(worker.proc.pid) for worker in live.workers)
    source = CONF / "logrotate" / "demo"
    rendered = replace_all(
        source.read_text(),
        [
            ("/var/log/demo/", f"{logs}/"),
            ("su demo demo", "su root root"),
            ("create 0640 demo demo", "create 0640 root root"),
            ("systemctl reload 'demo@*.service' >/dev/null 2>&1 || true", f"kill -HUP {pids}"),
        ],
        "logrotate/demo",
    )
    conf = tmp_path / "demo.logrotate"
    conf.write_text(rendered)
    done = subprocess.run(
        [logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)], capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    for worker in live.workers:
        assert (worker.log_dir / "demo.log.1").exists()
    phone = live.client()

    def writes_anew(worker: Worker) -> bool:
        fresh = worker.log_dir / "demo.log"
        return fresh.exists() and "GET /readyz" in fresh.read_text()

    def both_write_anew() -> bool:
        phone.get("/readyz")  # nginx takes turns: each process gets some
        return all(writes_anew(worker) for worker in live.workers)

    wait_until(both_write_anew, "both processes to write a new demo.log", timeout=10, every=0.1)


def test_sigterm_during_an_in_flight_upload_lets_it_finish_with_201(live):
    phone = live.client("127.0.0.71")
    session = phone.register()
    image = png(1200, 1000)  # several MiB
    assert len(image) > 3 * 1024 * 1024
    worker = live.workers[0]
    head = (
        f"POST /images HTTP/1.1\r\nHost: localhost:{live.https_port}\r\n"
        f"Authorization: Bearer {session['token']}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(image)}\r\nX-Real-IP: 127.0.0.71\r\n"
        "X-Forwarded-Proto: https\r\n\r\n"
    ).encode()
    half = len(image) // 2
    with socket.create_connection(("127.0.0.1", worker.port), timeout=WAIT) as conn:
        conn.sendall(head + image[:half])
        time.sleep(0.5)  # headers read, token checked, half the body streamed to disk
        worker.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert worker.running()  # still finishing this upload
        # Meanwhile nginx sends everything to the other process.
        for _ in range(5):
            assert phone.get("/users/me", token=session["token"]).code == 200
        conn.sendall(image[half:])
        answer = http.client.HTTPResponse(conn)
        answer.begin()
        body = answer.read()
    assert answer.status == 201, body
    created = json.loads(body)["image"]
    assert created["url"].startswith(f"https://localhost:{live.https_port}/images/")
    assert worker.proc.wait(timeout=WAIT) == 0
    assert "stopped" in worker.output.read_text()
    fetched = phone.get(created["url"])
    assert fetched.code == 200 and fetched.header("ETag") == f'"{created["sha256"]}"'


def test_killing_one_process_fails_none_of_the_next_requests(live):
    phone = live.client("127.0.0.81")
    session = phone.register()
    uploaded = phone.upload(session["token"], png(300, 200))
    assert uploaded.code == 201, uploaded.body
    path = f"/images/{uploaded.json['image']['id']}.png"
    for _ in range(6):  # keep-alive connections from nginx to both processes
        assert phone.get("/users/me", token=session["token"]).code == 200

    victim = live.workers[1]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=WAIT)
    time.sleep(0.2)  # nginx notices the closed keep-alive connections (a crash is never this punctual)
    answers = []
    for i in range(8):
        answers.append(phone.get("/users/me", token=session["token"]))
        answers.append(phone.post("/users/login", {"phone": session["phone"], "password": PASSWORD}))
        answers.append(phone.get(f"{path}?w={(160, 320, 640, 1280)[i % 4]}"))
        answers.append(live.client().get("/readyz"))  # the load balancer's probe (phones get a 404)
    assert [a.code for a in answers] == [200] * len(answers), [(a.code, a.body[:200]) for a in answers]
