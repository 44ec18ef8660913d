"""Entry point: ``python -m demo.main`` (or ``python demo/main.py``) with tornado-style options.

main() resolves and checks the settings, binds, migrates the database (once, under a lock), checks
that the media store belongs to that database, then serves in this process or in ``--processes``
forked workers on one port (a SO_REUSEPORT socket each). A refusal to start is one line on stderr
and an exit status per kind of problem (demo/common/infra/startup.py). SIGTERM/SIGINT: stop
accepting, let in-flight requests finish within ``shutdown_grace``, close the pools, exit 0.
SIGHUP: reopen the log files (logrotate). make_app() builds the application; the tests use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # `python demo/main.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tornado.web
from alembic.util import CommandError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from demo.common import housekeeping
from demo.common.errors import Unavailable
from demo.common.images.rules import StoreMismatch, bind_store
from demo.common.images.storage import StoreError, StoreUnavailable, make_store
from demo.common.infra import metrics, migrate
from demo.common.infra.clock import Clock
from demo.common.infra.db import Database, engine_for
from demo.common.infra.logs import log_request, reopen_logs, setup_logging, stop_writer
from demo.common.infra.offload import Offloader
from demo.common.infra.startup import (
    CannotListen,
    ConfigError,
    DatabaseUnavailable,
    StartupError,
    StorageUnusable,
    masked_url,
    reason,
)
from demo.common.services import Services, build_services
from demo.common.web.api import StaticHandler
from demo.common.web.httpserver import DemoHTTPServer
from demo.common.web.locale import tornado_locales
from demo.common.web.proxies import TrustedProxies
from demo.common.web.routing import collect_routes, name_static_routes, route_names
from demo.conf import settings as config
from demo.conf.settings import PACKAGE_DIR, Settings
from demo.conf.validate import check_values, prepare_folders, worker_count

log = logging.getLogger("demo")
GAUGES_EVERY_MS = 1000
RESTART_BACKOFF = 1.0  # seconds between restarts of a worker that keeps dying


class DemoApplication(tornado.web.Application):
    """Owns the route list, the Tornado settings, the process's services and its in-flight count."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.in_flight = 0
        self.stopping = False
        settings = services.settings
        super().__init__(
            collect_routes(),
            debug=settings.debug,
            cookie_secret=services.cookie_secret,
            static_path=str(PACKAGE_DIR / "static"),
            static_handler_class=StaticHandler,  # the contract's headers and JSON errors on /static/ too
            template_path=str(PACKAGE_DIR / "templates"),
            # H5 form posts (tokens bound to the H5 session, no _xsrf cookie: H5PageHandler);
            # Bearer API handlers opt out (ApiHandler.check_xsrf_cookie).
            xsrf_cookies=True,
            serve_traceback=False,  # errors never show internals, even in debug
        )
        self.locales = tornado_locales(services.languages)  # the pages' locale per language (web/locale.py)
        name_static_routes(self.wildcard_router.rules, StaticHandler)
        self.route_names = route_names(self.wildcard_router.rules)  # the metrics' route label: every route named

    def log_request(self, handler: tornado.web.RequestHandler) -> None:
        log_request(handler)
        route = self.route_names.get(type(handler), "unrouted")  # every route is named (refused at start-up)
        self.services.metrics.observe_request(
            route, handler.request.method, handler.get_status(), handler.request.request_time()
        )

    def request_started(self) -> None:
        self.in_flight += 1
        self.services.metrics.in_flight.inc()

    def request_ended(self) -> None:
        self.in_flight -= 1
        self.services.metrics.in_flight.dec()


def make_app(
    settings: Settings | None = None, *, clock: Clock | None = None, services: Services | None = None
) -> DemoApplication:
    """The application for ``settings`` (defaults when None); the database must already be migrated."""
    settings = settings or config.defaults()
    return DemoApplication(services or build_services(settings, clock))


def trusted_proxies(settings: Settings) -> TrustedProxies:
    try:
        return TrustedProxies.parse(settings.trusted_proxies)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def make_server(app: DemoApplication) -> HTTPServer:
    settings = app.services.settings
    return DemoHTTPServer(
        app,
        # Behind nginx: client IP and scheme come from X-Real-IP / X-Forwarded-*, when nginx sent them.
        xheaders=True,
        trusted_proxies=trusted_proxies(settings),
        max_body_size=settings.max_upload_bytes + 64 * 1024,  # multipart framing on top of the file
        # Slow or idle clients cost a socket each, never a thread; these bound how long they may hold one.
        idle_connection_timeout=settings.idle_timeout,  # Tornado also uses it as the header timeout
        body_timeout=settings.body_timeout,
    )


def listen(settings: Settings, workers: int = 1) -> list[list[socket.socket]]:
    """The listening sockets, one set per worker (before migrating: a port in use is found in a moment, not after).

    One process: one set, as ever. Several: one ``SO_REUSEPORT`` set per worker, so that the kernel
    spreads new connections across the workers by a hash of the client's address and port. Workers
    sharing one socket took whatever the first to wake up accepted: one held 45 of wrk's 50
    connections, and its queue made the p99 nearly three times longer (bench/README.md, healthz_2proc).
    """
    try:
        if workers == 1:
            return [bind_sockets(settings.port, settings.address)]
        # A plain bind first, closed at once: SO_REUSEPORT would join any group of this user's sockets on
        # the port (another demo, on another database, would silently get half of our connections),
        # while a plain bind fails on every socket bound there, grouped or not.
        for probe in bind_sockets(settings.port, settings.address):
            probe.close()
        return [bind_sockets(settings.port, settings.address, reuse_port=True) for _ in range(workers)]
    except OSError as error:  # in use, not an address of this machine, a privileged port
        raise CannotListen(
            f"cannot listen on {settings.address}:{settings.port} (--address, --port): {error.strerror or error}"
        ) from None


def prepare_database(settings: Settings) -> None:
    """Migrate, then bind the media store to this database (ConfigError if it belongs to another)."""
    engine = engine_for(settings, pool_size=2, long_work=True)  # one unit at a time; migrations are long
    offloader = Offloader(db_threads=1)  # unused: start-up runs its units in this thread (run_sync)
    try:
        migrate.upgrade(engine)
        bind_store(Database(engine, offloader), make_store(settings), Clock().now())
    except (StoreMismatch, StoreError) as error:
        raise ConfigError(str(error)) from error
    except OSError as error:  # the media folder's DEPLOYMENT file
        raise StorageUnusable(f"--media_root: {error}") from None
    except StoreUnavailable as error:  # the S3 store: down, no such bucket, credentials refused
        cause = str(error.__cause__ or error).splitlines()[0]
        raise StorageUnusable(f"--storage {settings.storage}: {cause}") from None
    except (SQLAlchemyError, CommandError, migrate.MigrationLockTimeout) as error:
        raise DatabaseUnavailable(f"database {masked_url(settings.database_url)}: {reason(error)}") from None
    except Unavailable as error:  # from a unit of work: the driver's error is its cause
        raise DatabaseUnavailable(
            f"database {masked_url(settings.database_url)}: {reason(error.__cause__ or error)}"
        ) from None
    finally:
        offloader.shutdown()
        engine.dispose()


async def serve(settings: Settings, sockets: list[socket.socket]) -> None:
    """One worker: serve on ``sockets`` until SIGTERM/SIGINT, then stop gracefully."""
    app = make_app(settings)
    services = app.services
    swept = await services.offloader.db(services.images.sweep)  # before serving: nothing is in flight
    log.info("start-up sweep: %s", swept)
    server = make_server(app)
    server.add_sockets(sockets)
    services.sender.start()  # texts queued by a process that stopped before sending them go out now

    async def sweep() -> None:
        try:
            counts = await housekeeping.run(services.db, services.images, services.clock.now())
            log.debug("housekeeping: %s", counts)
        except Exception:  # never let clean-up take the process down
            log.exception("housekeeping failed")

    def sample_gauges() -> None:
        pool = services.db.engine.pool
        if isinstance(pool, QueuePool):  # what make_engine makes, for SQLite and MySQL alike
            services.metrics.db_pool_in_use.set(pool.checkedout())
        services.metrics.executor_queue.set(services.offloader.queue_depth())

    timers = [
        PeriodicCallback(sweep, settings.housekeeping_interval * 1000),
        PeriodicCallback(sample_gauges, GAUGES_EVERY_MS),
    ]
    for timer in timers:
        timer.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reopen_logs)
    log.info(
        "demo listening on http://%s:%d (database: %s)",
        settings.address,
        settings.port,
        services.db.engine.url.render_as_string(hide_password=True),
    )
    await stopping.wait()

    log.info("stopping: no new connections; %d in flight get %.0fs", app.in_flight, settings.shutdown_grace)
    app.stopping = True  # answers from now on say "Connection: close"
    server.stop()
    deadline = loop.time() + settings.shutdown_grace
    while app.in_flight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if app.in_flight:
        log.warning("grace period over with %d requests in flight; closing them", app.in_flight)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), 1.0)  # idle keep-alive connections
    for timer in timers:
        timer.stop()
    await services.sender.stop()  # the texts being sent finish; the rest wait in the database
    services.close()
    log.info("stopped")


def supervise(settings: Settings, slots: list[list[socket.socket]]) -> int:
    """Fork one serving process per slot (its own SO_REUSEPORT sockets); restart any that dies, on
    the same slot; forward SIGTERM/SIGINT/SIGHUP.

    The supervisor keeps every slot's sockets open and never accepts on them. A worker that dies
    leaves its slot's sockets listening: the kernel keeps hashing about 1/N of the new connections
    to them, and they wait in that socket's queue (up to its backlog of 128; beyond, the kernel drops
    the SYN and the client sends it again) until the replacement, handed the same sockets, accepts
    them: answered, not refused, RESTART_BACKOFF plus a worker's start-up later (1.1 s in the tests).
    A socket closed instead would reset the connections in its queue, and a replacement binding a new
    socket beside a dead one still open would leave that one's connections hanging for good.
    """
    metrics.enable_multiprocess(tempfile.mkdtemp(prefix="demo-metrics-"))
    children: dict[int, int] = {}  # pid -> slot
    state = {"stopping": False}

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            # Until serve() installs its own: SIGHUP's default action would kill a starting worker
            # (logrotate's postrotate, forwarded by the supervisor, can come at any moment).
            signal.signal(signal.SIGHUP, lambda _signum, _frame: reopen_logs())
            # Only the supervisor and this slot's worker hold its sockets: a worker left running by a
            # killed supervisor must not keep another slot's sockets listening with nobody accepting.
            for other, sockets in enumerate(slots):
                if other != slot:
                    for sock in sockets:
                        sock.close()
            code = 0
            try:
                asyncio.run(serve(settings, slots[slot]))
            except BaseException:  # report, then leave without running the parent's code
                log.exception("worker crashed")
                code = 1
            stop_writer()  # os._exit skips atexit: write out the queued lines first
            logging.shutdown()
            os._exit(code)
        children[pid] = slot
        log.info("worker %d started (slot %d)", pid, slot)

    def forward(signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            state["stopping"] = True
        if signum == signal.SIGHUP:
            reopen_logs()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for slot in range(len(slots)):
        spawn(slot)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        slot = children.pop(pid)
        metrics.mark_worker_dead(pid)
        if not state["stopping"]:
            log.error("worker %d exited (status %d); starting a new one", pid, status)
            time.sleep(RESTART_BACKOFF)  # the supervisor runs no event loop: a crash loop must not spin
            if not state["stopping"]:  # a SIGTERM during the pause: the replacement would run for ever
                spawn(slot)
    log.info("all workers stopped")
    return 0


def prepare_database_in_child(settings: Settings) -> int:
    """``prepare_database`` in a child process; its exit status (0, or the StartupError's).

    The S3 store's client (obstore) runs a tokio runtime whose threads do not survive fork(): a
    supervisor that had used the store itself would fork workers whose every store call hangs for
    good (seen on the cluster test: no worker ever answered /readyz). The child that binds the store
    takes that runtime with it when it exits, so the workers start their own."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            prepare_database(settings)
        except StartupError as error:
            log.error("refusing to start: %s", error)
            code = error.status
        except BaseException:  # report, then leave without running the parent's code
            log.exception("preparing the database failed")
            code = 1
        stop_writer()  # os._exit skips atexit: write out the queued lines first
        logging.shutdown()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 1  # killed by a signal: no status of ours to give


def checked_settings(argv: list[str] | None) -> Settings:
    """The settings, every one checked, and the folders they name ready: nothing else touched yet."""
    try:
        settings = config.load(argv)
    except config.OptionsError as error:
        raise ConfigError(str(error)) from None
    check_values(settings)
    prepare_folders(settings)
    return settings


def main(argv: list[str] | None = None) -> int:
    """Exit statuses: see demo/common/infra/startup.py (2 settings, 3 database, 4 address, 5 storage)."""
    try:
        settings = checked_settings(argv)
    except StartupError as error:
        print(f"demo: refusing to start: {error}", file=sys.stderr)  # logging needs its folder checked first
        return error.status
    workers = worker_count(settings)
    setup_logging(settings.log_dir, settings.log_level, self_rotating=workers == 1)
    try:
        slots = listen(settings, workers)
        if workers == 1:
            prepare_database(settings)  # before serving (and the start-up sweep)
        else:
            status = prepare_database_in_child(settings)  # once, before any worker exists
            if status:
                return status
    except StartupError as error:
        log.error("refusing to start: %s", error)
        return error.status
    if workers == 1:
        asyncio.run(serve(settings, slots[0]))
        return 0
    return supervise(settings, slots)


if __name__ == "__main__":
    sys.exit(main())
