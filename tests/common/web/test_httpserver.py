"""demo's HTTPServer (common/web/httpserver.py): the headers only a trusted proxy may send reach a
handler from such a proxy alone. (Forwarded addresses and the 431 answer: test_http_edges.py.)"""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from demo.common.web.httpserver import STORE_LOCATION, DemoHTTPServer
from demo.common.web.proxies import TrustedProxies

gen_test = pytest.mark.gen_test(timeout=30)


class Echo(RequestHandler):
    def get(self) -> None:
        self.write({"location": self.request.headers.get_list(STORE_LOCATION), "ip": self.request.remote_ip})


async def echoed(trusted: str, xheaders: bool = True) -> dict:
    server = DemoHTTPServer(
        Application([("/", Echo)]), xheaders=xheaders, trusted_proxies=TrustedProxies.parse(trusted)
    )
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    try:
        response = await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}/", headers={STORE_LOCATION: "/_store/", "X-Real-IP": "203.0.113.9"}
        )
        return json.loads(response.body)
    finally:
        server.stop()


@gen_test
async def test_the_store_location_reaches_handlers_from_a_trusted_proxy():
    assert await echoed("127.0.0.1") == {"location": ["/_store/"], "ip": "203.0.113.9"}


@pytest.mark.parametrize("trusted, xheaders", [("10.9.9.9", True), ("", True), ("127.0.0.1", False)])
@gen_test
async def test_the_store_location_from_anyone_else_is_dropped(trusted, xheaders):
    """Or a client could make the app hand out presigned URLs of the store."""
    assert await echoed(trusted, xheaders) == {"location": [], "ip": "127.0.0.1"}
