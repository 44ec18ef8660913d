"""H5 pages (the app's WebView): HTML in and out, rendered by Tornado's ``render`` from demo/templates,
errors as pages, a strict CSP, and form tokens (XSRF) bound to the H5 session."""

from __future__ import annotations

import functools
from asyncio import Future
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import cachetools
from tornado.web import HTTPError

from demo.common.i18n import N_
from demo.common.infra.caches import Cache
from demo.common.web.auth import public
from demo.common.web.base import H5_COOKIE, BaseHandler

# The versioned URL of a static file, per path (bounded: a path comes from a template, never a client).
_static_urls: Cache[str, str] = Cache(cachetools.LRUCache(maxsize=512))


class H5PageHandler(BaseHandler):
    """WebView pages: HTML in and out, errors rendered from templates, a strict CSP, XSRF on posts.

    Pages are rendered with Tornado's ``render``: templates get its namespace (``current_user``,
    ``locale``, ``_``, ``static_url``, ``xsrf_form_html`` with this session's token, ...) and ``lang``,
    the page's language: the H5 session's (its ticket's, the app's), else the WebView's Accept-Language.
    """

    ERROR_TITLES = {
        401: (
            N_("Open this page from the app"),
            N_("Your session has ended or the link was already used. Go back to the app and open the page again."),
        ),
        404: (N_("Page not found"), N_("There is nothing at this address.")),
        500: (N_("Something went wrong"), N_("Please try again in a moment.")),
        # The words of nginx's page (static/h5/unavailable.html) when no process answers at all.
        503: (N_("Try again in a moment"), N_("The service is restarting or busy. Please try again in a few seconds.")),
    }
    REFUSED = N_("Request refused")

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")  # personal pages: never cached by the WebView
        # A ticket in the URL never leaks to another site. Not no-referrer: under it browsers send
        # "Origin: null" with our own form posts, and the cross-site check must refuse that value.
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("Content-Security-Policy", self.content_security_policy())

    # -- form tokens ----------------------------------------------------------------------------------

    @property
    def xsrf_token(self) -> bytes:
        """The forms' token, bound to the visitor's H5 session (``H5.xsrf_token``). Not Tornado's:
        its token only has to match an ``_xsrf`` cookie, and a cookie can be planted. Tornado's
        ``xsrf_form_html`` (in every page's namespace) writes this one."""
        token: bytes | None = getattr(self, "_session_xsrf_token", None)
        if token is None:
            token = self._session_xsrf_token = self.h5.xsrf_token(self.get_cookie(H5_COOKIE)).encode()
        return token

    def check_xsrf_cookie(self) -> None:
        check_h5_form(self)  # the session-bound token, not Tornado's _xsrf cookie (see xsrf_token)

    # -- the session cookie ---------------------------------------------------------------------------

    def set_session_cookie(self, cookie: str) -> None:
        self.set_cookie(H5_COOKIE, cookie, **self._session_cookie_options())

    def clear_session_cookie(self) -> None:
        self.clear_cookie(H5_COOKIE, **self._session_cookie_options())

    def _session_cookie_options(self) -> dict[str, Any]:
        return {"path": "/h5", "httponly": True, "samesite": "Lax", "secure": self.request.protocol == "https"}

    # -- rendering ------------------------------------------------------------------------------------

    def content_security_policy(self) -> str:
        return _content_security_policy(self.services.settings.public_url.rstrip("/"))

    def compute_etag(self) -> str | None:
        return None  # personal, no-store pages: hashing each one for an ETag is wasted work

    def static_url(self, path: str, include_host: bool | None = None, **kwargs: Any) -> str:
        """Tornado's, remembered per path: the versioned URL cannot change while the process runs
        (outside debug, where Tornado re-hashes the file on every call)."""
        if include_host or kwargs or not self.settings.get("static_hash_cache", True):
            return super().static_url(path, include_host, **kwargs)
        url = _static_urls.get(path)
        if url is None:
            url = super().static_url(path, include_host=False)
            _static_urls.put(path, url)
        return url

    def get_template_namespace(self) -> dict[str, Any]:
        namespace = super().get_template_namespace()
        namespace["lang"] = self.language  # <html lang>
        return namespace

    def render(self, template_name: str, **kwargs: Any) -> Future[None]:
        """Tornado's, with the page's Content-Language (and Vary when the WebView's header chose it)."""
        self.set_language_headers()
        return super().render(template_name, **kwargs)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        status, body, headers = self.describe_error(kwargs.get("exc_info"))  # the message is translated
        self.set_status(status)
        for name, value in headers.items():
            self.set_header(name, value)
        title, text = self.ERROR_TITLES.get(status, (None, None))
        if title is None or text is None:
            title, text = self.REFUSED, None
        words = {"title": self.translate(title), "text": self.translate(text) if text else body["error"]["message"]}
        self.render("h5/error.html", status=status, code=body["error"]["code"], **words)


def check_h5_form(handler: BaseHandler) -> None:
    """Every state-changing request of an H5 page (Tornado calls ``check_xsrf_cookie`` before
    ``prepare``): not made by a browser for another site, and carrying the token of the H5 session its
    cookie names. Also for cookie-authenticated handlers that answer JSON (the page upload)."""
    if is_cross_site(handler.request.headers, own_origins(handler)):
        raise HTTPError(403, N_("Cross-site requests are refused."))
    token = handler.get_argument("_xsrf", None) or handler.request.headers.get("X-XSRFToken")
    if not token:
        raise HTTPError(403, N_("'_xsrf' argument missing from POST"))
    if not handler.h5.xsrf_matches(handler.get_cookie(H5_COOKIE), token):
        raise HTTPError(403, N_("The form token does not belong to this session."))


def own_origins(handler: BaseHandler) -> frozenset[str]:
    """The origins our own pages post from: the one the client reached, and DEMO_PUBLIC_URL's."""
    reached = f"{handler.request.protocol}://{handler.request.host}".lower()
    public = _origin_of(handler.services.settings.public_url)
    return frozenset((reached, public) if public else (reached,))


def is_cross_site(headers: Mapping[str, str], own_origins: frozenset[str]) -> bool:
    """Whether a browser sent this request for another site: ``Sec-Fetch-Site: cross-site``, or an
    ``Origin`` that is not one of ours (``null`` included)."""
    if headers.get("Sec-Fetch-Site") == "cross-site":
        return True
    origin = headers.get("Origin")
    return origin is not None and origin.lower() not in own_origins


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else None


@functools.lru_cache(maxsize=4)
def _content_security_policy(public_url: str) -> str:
    images = f"'self' {public_url}" if public_url else "'self'"
    return (
        f"default-src 'self'; img-src {images}; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    )


class H5NotFoundHandler(H5PageHandler):
    """Unknown paths under /h5/: the HTML 404 page."""

    @public
    def get(self, *_: str) -> None:
        """Unknown H5 page."""
        raise HTTPError(404)

    post = get
