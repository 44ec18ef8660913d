"""demo's HTTP server: Tornado's, with forwarded headers believed from trusted proxies only, and a
431 answer (not a silent close) to a request whose header block is too large."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Awaitable
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, UnsatisfiableReadError

from demo.common.web.errors import error_body
from demo.common.web.proxies import TrustedProxies

NO_PROXIES = TrustedProxies(())
# nginx tells the app where its internal location to the object store is (see images_views): the app
# then answers with an internal redirect there. Believed from trusted proxies only, like X-Forwarded-*:
# anyone else could make the app hand out presigned URLs to the store.
STORE_LOCATION = "X-Demo-Store-Location"


class DemoHTTPServer(HTTPServer):
    """``xheaders=True`` applies only to requests whose TCP peer is in ``trusted_proxies``: from any
    other peer, the connection's own address and scheme count, whatever headers it sends (by default,
    no peer is trusted), and its ``STORE_LOCATION`` header is removed before any handler sees it."""

    def initialize(self, *args: Any, trusted_proxies: TrustedProxies = NO_PROXIES, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.trusted_proxies = trusted_proxies

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        # The context still holds the peer's own address here: Tornado applies the headers (and
        # undoes them after each request) only inside the delegate that super() wraps around ours.
        peer = request_conn.context.remote_ip  # type: ignore[attr-defined]
        if self.xheaders and peer in self.trusted_proxies:
            return super().start_request(server_conn, request_conn)
        delegate = self.request_callback.start_request(server_conn, request_conn)  # type: ignore[union-attr]
        return _Untrusted(delegate)

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if type(stream) is IOStream:  # plain TCP, as behind nginx (TLS would be an SSLIOStream: left alone)
            stream = _HeaderLimitStream(
                stream.socket, max_buffer_size=stream.max_buffer_size, read_chunk_size=stream.read_chunk_size
            )
        super().handle_stream(stream, address)


class _Untrusted(httputil.HTTPMessageDelegate):
    """A request from a peer that is no trusted proxy: the headers only a proxy may send are dropped."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate) -> None:
        self.delegate = delegate

    def headers_received(
        self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine, headers: httputil.HTTPHeaders
    ) -> Awaitable[None] | None:
        if STORE_LOCATION in headers:
            del headers[STORE_LOCATION]  # every copy of it
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()


def headers_too_large_response() -> bytes:
    """The contract's JSON error for a header block over ``max_header_size``, as raw HTTP/1.1."""
    body = json.dumps(error_body("headers_too_large", "The request's headers are too large.")).encode()
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"Content-Type: application/json; charset=utf-8\r\n"
        b"Cache-Control: no-store\r\n"
        b"X-Content-Type-Options: nosniff\r\n"
        b"X-Request-Id: " + secrets.token_hex(16).encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: close\r\n\r\n" + body
    )


class _HeaderLimitStream(IOStream):
    """An IOStream that answers 431 before it closes over a too-large header block.

    Tornado reads a request's header block with ``read_until_regex(max_bytes=max_header_size)`` and
    nothing else that way (chunk-size lines use ``read_until``); past the limit the stream closes
    itself with an UnsatisfiableReadError, and the client saw only a reset connection.
    """

    reading_headers = False

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        self.reading_headers = True
        return super().read_until_regex(regex, max_bytes)

    def read_until(self, delimiter: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        self.reading_headers = False
        return super().read_until(delimiter, max_bytes)

    def close(self, exc_info: Any = False) -> None:
        if (
            self.reading_headers
            and isinstance(exc_info, UnsatisfiableReadError)
            and not self.closed()
            and not self.writing()
        ):
            with contextlib.suppress(OSError):  # a few hundred bytes into an idle socket: sent at once, or not at all
                self.socket.send(headers_too_large_response())
        super().close(exc_info)
