"""Tornado base handlers: the one place where domain errors become HTTP errors.

Every handler method declares who may call it with ``@public`` or ``@authenticated``; the router
refuses to start the app when a method has neither (see routing.py).
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tornado.template import Loader
from tornado.web import HTTPError, RequestHandler, StaticFileHandler

from demo.common.errors import (DemoError, InsufficientStorage, InvalidField, InvalidJson, TooLarge, Unauthorized,
                                UnsupportedMediaType)
from demo.common.accounts.principal import Principal

log = logging.getLogger("demo.web")
F = TypeVar("F", bound=Callable[..., Any])

# The contract's error table: code -> status. Anything raised as a DemoError is answered from here.
ERROR_STATUS: dict[str, int] = {
    "invalid_json": 400, "invalid_field": 422, "invalid_phone": 422, "weak_password": 422,
    "invalid_code": 400, "phone_taken": 409, "invalid_credentials": 401, "unauthorized": 401,
    "not_found": 404, "method_not_allowed": 405, "too_large": 413, "unsupported_media_type": 415,
    "invalid_image": 422, "quota_exceeded": 403, "rate_limited": 429, "unavailable": 503,
    "range_not_satisfiable": 416, "insufficient_storage": 507,
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Errors Tornado raises by itself (HTTPError) get a code from their status.
STATUS_CODE: dict[int, str] = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type", 503: "unavailable",
}
MAX_JSON_BYTES = 64 * 1024
JSON_MEDIA_TYPE = "application/json"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")

PUBLIC, BEARER, H5 = "public", "bearer", "h5"
H5_COOKIE = "demo_h5"


def public(method: F) -> F:
    """Anyone may call this method."""
    method.auth = PUBLIC  # type: ignore[attr-defined]
    return method


def authenticated(method: F) -> F:
    """Callers must send ``Authorization: Bearer <token>``; checked in ``prepare`` before the body."""
    method.auth = BEARER  # type: ignore[attr-defined]
    return method


def h5_session(method: F) -> F:
    """Callers must hold the H5 session cookie (WebView pages); form posts also need the XSRF token."""
    method.auth = H5  # type: ignore[attr-defined]
    return method


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"error": error}


class BaseHandler(RequestHandler):
    """Request id, security headers, services and auth; subclasses choose JSON or HTML errors."""

    principal: Principal | None = None
    _counted = False

    def initialize(self) -> None:
        # Counted so a graceful stop can wait for in-flight requests (see main.serve).
        self._counted = True
        self.application.request_started()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.application.request_ended()

    def on_finish(self) -> None:
        self._uncount()

    def on_connection_close(self) -> None:
        self._uncount()
        super().on_connection_close()

    @property
    def services(self):  # demo.common.services.Services
        return self.application.services

    @property
    def request_id(self) -> str:
        # Kept on the request: set_default_headers runs again whenever the response is cleared.
        rid = getattr(self.request, "demo_request_id", None)
        if rid is None:
            incoming = self.request.headers.get("X-Request-Id", "")
            # 128 random bits each: a prefix and a counter would tell how many requests a process served.
            rid = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(16)
            self.request.demo_request_id = rid  # type: ignore[attr-defined]
        return rid

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # Tornado's name and version help nobody but an attacker
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Request-Id", self.request_id)

    def finish(self, chunk: Any = None) -> Any:
        if self.application.stopping and not self._headers_written:
            self.set_header("Connection", "close")  # shutting down: keep-alive clients move elsewhere
        return super().finish(chunk)

    def auth_rule(self) -> str | None:
        method = getattr(self, self.request.method.lower(), None)
        return getattr(method, "auth", None)

    def prepare(self) -> Awaitable[None] | None:
        """Authenticate before the body is read. An awaitable only when a credential must be looked
        up: a public request then completes without a round trip through the event loop (profiled:
        ~12% of a /healthz request went to Tornado's bookkeeping for an asynchronous prepare)."""
        rule = self.auth_rule()
        if rule == BEARER:
            return self._authenticate_bearer()
        if rule == H5 and not self.skips_cookie_check():
            return self._authenticate_cookie()
        return None

    async def _authenticate_bearer(self) -> None:
        self.principal = await self.services.accounts.authenticate(self.bearer_token())

    async def _authenticate_cookie(self) -> None:
        self.principal = await self.services.h5.authenticate(self.get_cookie(H5_COOKIE))

    def skips_cookie_check(self) -> bool:
        """True where a handler authenticates the visitor itself (the ticket exchange)."""
        return False

    def bearer_token(self) -> str:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized()
        return token.strip()

    def get_current_user(self) -> Principal | None:
        return self.principal

    def absolute_url(self, path: str) -> str:
        """``DEMO_PUBLIC_URL`` + path, or the scheme and host the client used (through the proxy)."""
        base = self.services.settings.public_url.rstrip("/")
        if not base:
            base = f"{self.request.protocol}://{self.request.host}"
        return base + path

    def h5_url(self, ticket: str) -> str:
        return self.absolute_url(f"/h5/home?ticket={ticket}")

    def describe_error(self, exc_info: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON error body, extra headers) for whatever ended the request."""
        error = exc_info[1] if exc_info else None
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            error = InsufficientStorage()  # the disk (or quota) is full: retry later, nothing was kept
        if isinstance(error, DemoError):
            return ERROR_STATUS[error.code], error_body(error.code, error.message, error.field), error.headers()
        status = self.get_status()
        if isinstance(error, HTTPError):
            status = error.status_code
            # A log message with arguments is a template for the log (the static handler's holds file
            # paths): the client gets the status's reason instead.
            message = error.log_message if error.log_message and not error.args and status < 500 else self._reason
            # RFC 9110 15.5.6: a 405 must say which methods the resource does support.
            extra = {"Allow": ", ".join(self.allowed_methods())} if status == 405 else {}
            return status, error_body(STATUS_CODE.get(status, "error"), message), extra
        if status < 500:
            return status, error_body(STATUS_CODE.get(status, "error"), self._reason), {}
        return 500, error_body("internal_error", f"Internal error (request {self.request_id})."), {}

    def allowed_methods(self) -> list[str]:
        """The HTTP methods this handler implements (the others are Tornado's 405)."""
        own = type(self)
        return [m for m in self.SUPPORTED_METHODS
                if getattr(own, m.lower(), None) is not getattr(RequestHandler, m.lower(), None)]

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, DemoError):
            return  # an expected answer; the request log already records the status
        if isinstance(value, OSError) and value.errno in DISK_FULL:
            log.error("disk full while handling %s %s (request %s): %s", self.request.method, self.request.path,
                      self.request_id, value)
            return
        if isinstance(value, HTTPError) and value.status_code < 500:
            return  # a 4xx Tornado raised (404, 405, ...): the request log has it
        log.error("unhandled error in %s %s (request %s)", self.request.method, self.request.path,
                  self.request_id, exc_info=(typ, value, tb))


class ApiHandler(BaseHandler):
    """JSON in, JSON out; every error in the contract's shape."""

    def check_xsrf_cookie(self) -> None:
        """Bearer API calls are exempt: browsers never attach an Authorization header by themselves."""

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def compute_etag(self) -> None:
        return None  # API answers are per-user and no-store; hashing them is wasted work

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object, or UnsupportedMediaType (415) / TooLarge (413) / InvalidJson (400).

        Only ``application/json``: a browser sends that cross-site only after a CORS preflight, which
        this API never grants, so another site's page cannot make its visitors call us (a text/plain
        or form post needs no preflight).
        """
        media_type = self.request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if media_type != JSON_MEDIA_TYPE:
            raise UnsupportedMediaType("Send the body as Content-Type: application/json.")
        if len(self.request.body) > MAX_JSON_BYTES:
            raise TooLarge("JSON bodies are limited to 64 KiB.")
        try:
            body = json.loads(self.request.body or b"")
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... nested too deep
            raise InvalidJson() from None
        if not isinstance(body, dict):
            raise InvalidJson()
        return body

    def write_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(payload, ensure_ascii=False, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        status, body, headers = self.describe_error(kwargs.get("exc_info"))
        self.set_status(status)
        for name, value in headers.items():
            self.set_header(name, value)
        self.finish(json.dumps(body, ensure_ascii=False))


def text_field(body: dict[str, Any], name: str, *, required: bool = True, default: str | None = None,
               max_length: int = 1024) -> str:
    """A string field of a JSON body; a missing or non-string value is a 422 naming the field.

    An optional field that is absent gets ``default``; sent as ``null`` it is of the wrong type (422).
    """
    if name not in body:
        if not required:
            return default  # type: ignore[return-value]
        raise InvalidField(f"'{name}' is required.", field=name)
    value = body[name]
    if not isinstance(value, str):
        raise InvalidField(f"'{name}' must be a string.", field=name)
    if len(value) > max_length:
        raise InvalidField(f"'{name}' is too long.", field=name)
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 consumer (argon2, the database) takes
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidField(f"'{name}' is not valid Unicode text.", field=name) from None
    return value


class NotFoundHandler(ApiHandler):
    """Last route: any unknown path is a JSON 404 (any method)."""

    @public
    def get(self, *_: Any) -> None:
        """Unknown route."""
        raise HTTPError(404, "No such resource.")

    post = put = patch = delete = head = options = get


class StaticHandler(StaticFileHandler, ApiHandler):
    """``/static/*`` (H5 CSS and JS) straight from the app: Tornado's file serving, with the contract's
    headers on every answer and its JSON shape on errors (nginx serves these itself in production)."""

    def set_default_headers(self) -> None:
        BaseHandler.set_default_headers(self)  # a file keeps its own Content-Type and caching

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        ApiHandler.set_default_headers(self)  # an error is JSON, never cached
        super().write_error(status_code, **kwargs)


class H5PageHandler(BaseHandler):
    """WebView pages: HTML in and out, errors rendered from templates, a strict CSP, XSRF on posts."""

    ERROR_TITLES = {
        401: ("Open this page from the app", "Your session has ended or the link was already used. "
                                             "Go back to the app and open the page again."),
        404: ("Page not found", "There is nothing at this address."),
        500: ("Something went wrong", "Please try again in a moment."),
        # The words of nginx's page (static/h5/unavailable.html) when no process answers at all.
        503: ("Try again in a moment", "The service is restarting or busy. Please try again in a few seconds."),
    }

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")  # personal pages: never cached by the WebView
        # A ticket in the URL never leaks to another site. Not no-referrer: under it browsers send
        # "Origin: null" with our own form posts, and the cross-site check must refuse that value.
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("Content-Security-Policy", self.content_security_policy())

    @property
    def xsrf_token(self) -> bytes:
        """The forms' token, bound to the visitor's H5 session (``H5.xsrf_token``). Not Tornado's:
        its token only has to match an ``_xsrf`` cookie, and a cookie can be planted."""
        token = getattr(self, "_session_xsrf_token", None)
        if token is None:
            token = self._session_xsrf_token = self.services.h5.xsrf_token(self.get_cookie(H5_COOKIE)).encode()
        return token

    def check_xsrf_cookie(self) -> None:
        check_h5_form(self)

    def set_session_cookie(self, cookie: str) -> None:
        self.set_cookie(H5_COOKIE, cookie, **self._session_cookie_options())

    def clear_session_cookie(self) -> None:
        self.clear_cookie(H5_COOKIE, **self._session_cookie_options())

    def _session_cookie_options(self) -> dict[str, Any]:
        return {"path": "/h5", "httponly": True, "samesite": "Lax", "secure": self.request.protocol == "https"}

    def content_security_policy(self) -> str:
        return _content_security_policy(self.services.settings.public_url.rstrip("/"))

    def compute_etag(self) -> None:
        return None  # personal, no-store pages: hashing each one for an ETag is wasted work

    def static_url(self, path: str, include_host: bool | None = None, **kwargs: Any) -> str:
        """Tornado's, remembered per path: the versioned URL cannot change while the process runs
        (outside debug, where Tornado re-hashes the file on every call)."""
        if include_host or kwargs or not self.settings.get("static_hash_cache", True):
            return super().static_url(path, include_host, **kwargs)
        url = _static_urls.get(path)
        if url is None:
            url = _static_urls[path] = super().static_url(path, include_host=False)
        return url

    def render_page(self, template_name: str, **values: Any) -> None:
        """Render and finish, with only what our templates use besides ``values``: ``static_url`` and
        ``xsrf_form_html``. Tornado's ``render`` also resolves the locale (parsing Accept-Language),
        the current user and the UI-module namespace, and scans the page for module CSS/JS: a third
        of the home page's event-loop CPU (bench/README.md)."""
        template = _template_loader(self.get_template_path(), self).load(template_name)
        self.finish(template.generate(static_url=self.static_url, xsrf_form_html=self.xsrf_form_html, **values))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        status, body, headers = self.describe_error(kwargs.get("exc_info"))
        self.set_status(status)
        for name, value in headers.items():
            self.set_header(name, value)
        title, text = self.ERROR_TITLES.get(status, (None, None))
        if title is None:
            title, text = "Request refused", body["error"]["message"]
        self.render_page("h5/error.html", status=status, title=title, text=text, code=body["error"]["code"])


def check_h5_form(handler: BaseHandler) -> None:
    """Every state-changing request of an H5 page (Tornado calls ``check_xsrf_cookie`` before
    ``prepare``): not made by a browser for another site, and carrying the token of the H5 session its
    cookie names. Also used by the page upload, which answers JSON."""
    if is_cross_site(handler.request.headers, page_origins(handler)):
        raise HTTPError(403, "Cross-site requests are refused.")
    token = handler.get_argument("_xsrf", None) or handler.request.headers.get("X-XSRFToken")
    if not token:
        raise HTTPError(403, "'_xsrf' argument missing from POST")
    if not handler.services.h5.xsrf_matches(handler.get_cookie(H5_COOKIE), token):
        raise HTTPError(403, "The form token does not belong to this session.")


def page_origins(handler: BaseHandler) -> frozenset[str]:
    """The origins our own pages post from: the one the client reached, and DEMO_PUBLIC_URL's."""
    reached = f"{handler.request.protocol}://{handler.request.host}".lower()
    public = _origin_of(handler.services.settings.public_url)
    return frozenset((reached, public) if public else (reached,))


def is_cross_site(headers: Any, own_origins: frozenset[str]) -> bool:
    """Whether a browser sent this request for another site: ``Sec-Fetch-Site: cross-site``, or an
    ``Origin`` that is not one of ours (``null`` included)."""
    if headers.get("Sec-Fetch-Site") == "cross-site":
        return True
    origin = headers.get("Origin")
    return origin is not None and origin.lower() not in own_origins


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else None


_loaders: dict[str, Loader] = {}
_static_urls: dict[str, str] = {}


def _template_loader(path: str, handler: RequestHandler) -> Loader:
    """One loader per template folder, as Tornado keeps; a fresh one per call in debug (live edits)."""
    loader = _loaders.get(path)
    if loader is None or not handler.settings.get("compiled_template_cache", True):
        loader = _loaders[path] = handler.create_template_loader(path)
    return loader


@functools.lru_cache(maxsize=4)
def _content_security_policy(public_url: str) -> str:
    images = f"'self' {public_url}" if public_url else "'self'"
    return (f"default-src 'self'; img-src {images}; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")


class H5NotFoundHandler(H5PageHandler):
    """Unknown paths under /h5/: the HTML 404 page."""

    @public
    def get(self, *_: Any) -> None:
        """Unknown H5 page."""
        raise HTTPError(404)

    post = get
