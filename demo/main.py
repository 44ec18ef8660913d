"""Entry point: ``python -m demo.main`` (or ``python demo/main.py``) with tornado-style options.

main() resolves the settings, migrates the database, binds, then serves until SIGTERM/SIGINT.
make_app() builds the Tornado application; the tests use it directly.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python demo/main.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from demo.common import housekeeping, migrate
from demo.common.clock import Clock
from demo.common.db import make_engine
from demo.common.logs import log_request, setup_logging
from demo.common.routing import collect_routes
from demo.common.services import ConfigError, Services, build_services, resolve_cookie_secret
from demo.conf import settings as config
from demo.conf.settings import PACKAGE_DIR, Settings

log = logging.getLogger("demo")
HOUSEKEEPING_EVERY_MS = 10 * 60 * 1000


class DemoApplication(tornado.web.Application):
    """Owns the route list, the Tornado settings and the process's services."""

    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings
        super().__init__(
            collect_routes(),
            debug=settings.debug,
            cookie_secret=services.cookie_secret,
            static_path=str(PACKAGE_DIR / "static"),
            template_path=str(PACKAGE_DIR / "templates"),
            log_function=log_request,
            xsrf_cookies=True,  # H5 form posts; Bearer API handlers opt out (ApiHandler.check_xsrf_cookie)
            xsrf_cookie_kwargs={"httponly": True, "samesite": "Lax"},
            serve_traceback=False,  # errors never show internals, even in debug
        )


def make_app(settings: Settings | None = None, *, clock: Clock | None = None,
             services: Services | None = None) -> DemoApplication:
    """The application for ``settings`` (defaults when None); the database must already be migrated."""
    settings = settings or config.defaults()
    return DemoApplication(services or build_services(settings, clock))


def make_server(app: DemoApplication) -> HTTPServer:
    settings = app.services.settings
    return HTTPServer(
        app,
        xheaders=True,  # behind nginx: client IP and scheme come from X-Real-IP / X-Forwarded-*
        max_body_size=settings.max_upload_bytes + 64 * 1024,  # multipart framing on top of the file
        idle_connection_timeout=60,
    )


def migrate_database(settings: Settings) -> None:
    engine = make_engine(settings.database_url, pool_size=1, connect_timeout=settings.db_connect_timeout)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()


async def serve(settings: Settings, sockets: list[Any]) -> None:
    app = make_app(settings)
    services = app.services
    swept = await services.offloader.db(services.images.sweep)  # before serving: nothing is in flight
    log.info("start-up sweep: %s", swept)
    server = make_server(app)
    server.add_sockets(sockets)

    async def sweep() -> None:
        try:
            counts = await services.db.run(housekeeping.sweep, services.clock.now())
            log.debug("housekeeping: %s", counts)
        except Exception:  # never let clean-up take the process down
            log.exception("housekeeping failed")

    sweeper = PeriodicCallback(sweep, HOUSEKEEPING_EVERY_MS)
    sweeper.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("demo listening on http://%s:%d (database: %s)", settings.address, settings.port,
             services.db.engine.url.render_as_string(hide_password=True))
    await stopping.wait()

    log.info("stopping: no new connections; in-flight requests get %.0fs", settings.shutdown_grace)
    sweeper.stop()
    server.stop()
    try:
        await asyncio.wait_for(server.close_all_connections(), settings.shutdown_grace)
    except asyncio.TimeoutError:
        log.warning("grace period over; closing remaining connections")
    services.close()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = config.load(argv)
    except config.OptionsError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    setup_logging(settings.log_dir, settings.log_level)
    try:
        resolve_cookie_secret(settings, warn=False)  # refuse to start unsafe, before touching anything
        migrate_database(settings)
    except ConfigError as error:
        log.error("refusing to start: %s", error)
        return 2
    sockets = bind_sockets(settings.port, settings.address)
    asyncio.run(serve(settings, sockets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
