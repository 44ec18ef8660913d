"""Fixtures shared by every test (helpers that are not fixtures live in tests/helpers.py).

The app and its clients:
    settings       demo's settings for a test (``@pytest.mark.settings(name=value)`` changes some)
    app            the app on ``settings`` and ``clock``, not listening; ``build_app(settings)`` makes more
    http_server    ``app`` behind demo's own HTTPServer on a free port, its SMS sender running
    api            the HTTP client (``tests.helpers.Api``) to ``http_server``
    user           a logged-in user (``LoggedInUser``: phone, password, token, id)
    outbox         the SMS outbox file (``Outbox``): the texts sent, the last code to a phone
    clock          the ``FakeClock`` the app reads: tests move time instead of sleeping
The databases (every test that uses ``app`` runs once per database):
    database_url   a migrated, empty database: SQLite, then MariaDB
    empty_database_url   a database without any table (migrations): SQLite, then MariaDB
    mysql_server_url     the MariaDB server (127.0.0.1:3306, root, no password)
The other real parts:
    nginx          the ``Nginx`` runner of the shipped site file
    s3_server      SeaweedFS (``tests.helpers.SeaweedFS``), one per session, credentials in the environment
    storage        the image store of a test: ``local`` (a folder), then ``s3`` (a fresh prefix on s3_server);
                   a test (or module) that asks for it runs on both, and ``settings`` use it
    chromium       ``async with chromium() as browser``: Debian's headless Chromium through Playwright
    sms_providers  stand-ins of Tencent Cloud SMS and Alibaba Cloud SMS that check signatures
                   (``tests.sms_standins.ProviderStandIns``), their credentials in the environment
A missing MariaDB, nginx, SeaweedFS or Chromium skips its tests, unless DEMO_REQUIRE_MYSQL=1 (MariaDB,
nginx), DEMO_REQUIRE_S3=1 (SeaweedFS) or DEMO_REQUIRE_BROWSER=1 (Chromium) makes that a failure; under
CI=true any skip fails (see the end).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tornado.web import Application

from demo.common.infra import migrate
from demo.common.sms import outbox as sms_outbox
from demo.conf import settings as config
from demo.main import make_app, make_server
from tests.helpers import (
    MYSQL_SERVER,
    REQUIRE_MYSQL,
    S3_CREDENTIALS,
    Api,
    FakeClock,
    Nginx,
    SeaweedFS,
    chromium_browser,
    chromium_missing,
    emptied,
    make_test_engine,
    new_mysql_database,
    require_mysql,
    require_s3,
)
from tests.sms_standins import ENVIRON as STANDIN_ENVIRON
from tests.sms_standins import ProviderStandIns

COOKIE_SECRET = "test-secret-" + "x" * 40


@pytest.fixture(scope="session")
def mysql_server_url() -> str:
    """The MariaDB server of the MySQL variants (skipped when unreachable, unless DEMO_REQUIRE_MYSQL=1)."""
    return require_mysql(MYSQL_SERVER)


@pytest.fixture(scope="session")
def sqlite_database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite database for the session (``database_url`` empties it for each test)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.sqlite3'}"
    engine = make_test_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="session")
def mysql_database_url(mysql_server_url: str) -> Iterator[str]:
    """A migrated MariaDB database for the session (``database_url`` empties it for each test)."""
    with new_mysql_database(mysql_server_url) as url:
        engine = make_test_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new database without any table (for migration tests): SQLite, then MariaDB."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    with new_mysql_database(request.getfixturevalue("mysql_server_url")) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def database_url(request: pytest.FixtureRequest) -> str:
    """A migrated, empty database: SQLite, then MariaDB."""
    return emptied(request.getfixturevalue(f"{request.param}_database_url"))


@pytest.fixture(scope="session")
def nginx() -> type[Nginx]:
    """The class that runs Debian's nginx on the shipped site file (``Nginx(folder, upstream_ports, ...)``).
    Skipped when nginx or openssl is missing, unless DEMO_REQUIRE_MYSQL=1 (CI) makes that a failure."""
    reason = Nginx.missing()
    if reason:
        if REQUIRE_MYSQL:
            pytest.fail(f"DEMO_REQUIRE_MYSQL=1 but {reason}")
        pytest.skip(reason)
    return Nginx


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """SeaweedFS for the session, with its bucket; the AWS_* credentials it accepts are set in the
    environment (where demo reads them), for this process and the servers it starts."""
    server = require_s3(tmp_path_factory.mktemp("seaweedfs"))
    saved = {name: os.environ.get(name) for name in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The settings of the test's image store: the folder media_root, then a prefix of its own on SeaweedFS."""
    if request.param == "local":
        return {"storage": ""}
    server: SeaweedFS = request.getfixturevalue("s3_server")
    return server.settings(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def chromium() -> Callable[[], AbstractAsyncContextManager[Any]]:
    """``async with chromium() as browser``: Debian's headless Chromium through Playwright. Skipped when
    missing, unless DEMO_REQUIRE_BROWSER=1 (CI) makes that a failure."""
    reason = chromium_missing()
    if reason:
        if os.environ.get("DEMO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DEMO_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return chromium_browser


@pytest.fixture
def sms_providers(io_loop, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProviderStandIns]:
    """Both SMS provider stand-ins on the test's loop; ``sms_providers.settings("tencent,aliyun")`` are
    the settings that send through them."""
    for name, value in STANDIN_ENVIRON.items():
        monkeypatch.setenv(name, value)
    stand_ins = ProviderStandIns.start()
    yield stand_ins
    io_loop.run_sync(stand_ins.stop)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Outbox:
    """The SMS file backend's output: one JSON object per line.

    Texts go out after the answer to ``POST /users/code`` (the app's outbox sender writes them), so
    ``last`` and ``code`` wait, on the event loop, for a text to the phone that they have not yet
    handed out; ``messages`` is what has been written so far.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handed_out: dict[str, int] = {}  # phone -> texts already returned by last()

    def messages(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    async def last(self, phone: str, timeout: float = 10.0) -> dict[str, Any]:
        """The newest text to ``phone``, waiting until one comes that was not returned before."""
        deadline = time.monotonic() + timeout
        while len(sent := [m for m in self.messages() if m["phone"] == phone]) <= self.handed_out.get(phone, 0):
            assert time.monotonic() < deadline, f"no new SMS to {phone} within {timeout:.0f}s"
            await asyncio.sleep(0.01)
        self.handed_out[phone] = len(sent)
        return sent[-1]

    async def code(self, phone: str, timeout: float = 10.0) -> str:
        code = (await self.last(phone, timeout))["code"]
        assert code, "the last text carried no code"
        return code

    async def after_delivery(self, app, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every text written once ``app``'s outbox has nothing left to send (for "sent nothing" checks)."""
        deadline = time.monotonic() + timeout
        while await app.services.db.run(sms_outbox.backlog):
            assert time.monotonic() < deadline, f"texts still waiting after {timeout:.0f}s"
            await asyncio.sleep(0.01)
        return self.messages()


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path / "outbox.jsonl")


@pytest.fixture
def settings(request: pytest.FixtureRequest, database_url: str, outbox: Outbox, tmp_path: Path) -> config.Settings:
    """Test settings; a test changes some with ``@pytest.mark.settings(name=value, ...)``."""
    marker = request.node.get_closest_marker("settings")
    overrides = marker.kwargs if marker else {}
    store = request.getfixturevalue("storage") if "storage" in request.fixturenames else {}
    return config.defaults(
        database_url=database_url,
        cookie_secret=COOKIE_SECRET,
        sms_backend=f"file:{outbox.path}",
        media_root=str(tmp_path / "media"),
        log_dir="",
        db_pool_size=4,
        **store,
    ).replace(**overrides)


@pytest.fixture
def build_app(clock: FakeClock) -> Iterator[Callable[[config.Settings], Application]]:
    """``build_app(settings)``: an app on the test clock, closed after the test. For a module's own ``app``
    (other settings) and for tests that need a second process on the same database."""
    built: list[Application] = []

    def build(settings: config.Settings) -> Application:
        application = make_app(settings, clock=clock)
        built.append(application)
        return application

    yield build
    for application in built:
        application.services.close()  # again for a test that closed it itself: harmless


@pytest.fixture
def app(build_app: Callable[[config.Settings], Application], settings: config.Settings) -> Application:
    """The app under test, on ``settings`` and the test clock (not listening: see ``http_server``)."""
    return build_app(settings)


@pytest.fixture
def http_server(app, io_loop, _unused_port):
    """The app behind demo's own HTTPServer settings (xheaders, body limits), on a free port, with
    its SMS outbox sender running, as main.serve() runs them."""
    server = make_server(app)
    server.add_socket(_unused_port[0])
    io_loop.run_sync(lambda: app.services.sender.start())
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections)
    io_loop.run_sync(app.services.sender.stop)


@pytest.fixture
def api(http_server, base_url: str) -> Iterator[Api]:
    """The HTTP client (``tests.helpers.Api``: never raises on 4xx/5xx) of ``http_server``."""
    client = Api(base_url)
    yield client
    client.close()


@dataclass
class LoggedInUser:
    phone: str
    password: str
    token: str
    id: str  # the public id: opaque, random
    body: dict[str, Any]


@pytest.fixture
def user(api: Api, outbox: Outbox, io_loop) -> LoggedInUser:
    """A registered user holding a fresh token (the seed's phone and password)."""
    response = io_loop.run_sync(lambda: api.register(outbox))
    assert response.code == 201, response.body
    body = response.json
    return LoggedInUser("+8618866668888", "demo123456", body["token"], body["user"]["id"], body)


# -- CI never skips silently ------------------------------------------------------------------------
# A missing tool or driver turns a test into a skip: handy on a developer's machine, but under CI it
# would hide an untested feature behind a green run. There (CI=true) a skip whose reason matches none
# of the ci_allowed_skips patterns (setup.cfg, each with why it is allowed) fails its test, or the
# collection of its module.
RUNNING_IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "ci_allowed_skips",
        type="linelist",
        default=[],
        help="regular expressions: the skip reasons allowed under CI=true (any other fails)",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, Any, Any]:
    report = yield
    fail_a_skip_under_ci(report, item.config)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, Any]:
    report = yield
    fail_a_skip_under_ci(report, collector.config)
    return report


def fail_a_skip_under_ci(report: pytest.TestReport | pytest.CollectReport, config: pytest.Config) -> None:
    if not (RUNNING_IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if any(re.search(pattern, reason) for pattern in config.getini("ci_allowed_skips")):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true, which allows only the skips listed in ci_allowed_skips (setup.cfg): {reason}"
    )


# -- MariaDB servers of a test module's own ----------------------------------------------------------


@pytest.fixture(scope="module")
def private_mariadb() -> Iterator[Any]:
    """A mariadbd of the module's own (``tests.helpers.PrivateMariaDB``), which its tests may freeze;
    skipped when mariadbd is missing, unless DEMO_REQUIRE_MYSQL=1 makes that a failure."""
    from tests.helpers import require_private_mariadb  # here: this end of the file is appended to

    server = require_private_mariadb()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def galera_node() -> Iterator[Any]:
    """A one-node MariaDB Galera cluster of the module's own (``tests.helpers.PrivateMariaDB``);
    skipped when galera-4 is missing, unless DEMO_REQUIRE_CLUSTER=1 makes that a failure."""
    from tests.helpers import require_private_mariadb

    server = require_private_mariadb(galera=True)
    yield server
    server.stop()
