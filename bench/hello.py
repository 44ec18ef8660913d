"""The framework ceiling: Tornado's hello world, one process, the HTTPServer settings demo uses.

``python bench/hello.py PORT``. Same Tornado, same event loop (asyncio), same ``xheaders=True``;
nothing else: no database, no logging per request, no middleware. SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import tornado.web
from tornado.httpserver import HTTPServer


class HelloHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("Hello, world")


async def main(port: int) -> None:
    app = tornado.web.Application([(r"/", HelloHandler)])
    server = HTTPServer(app, xheaders=True)
    server.listen(port, "127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"hello listening on http://127.0.0.1:{port}/", flush=True)
    await stop.wait()
    server.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
