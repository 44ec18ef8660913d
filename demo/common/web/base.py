"""The base of every handler: the auth decision enforced, the caller, the request id, the language of
the answer, error answers.

``ApiHandler`` (api.py) answers JSON, ``H5PageHandler`` (pages.py) HTML. Handlers reach the process's
long-lived objects through typed properties (``services``, ``accounts``, ``images``, ``h5``).
"""

from __future__ import annotations

import logging
import re
import secrets
from asyncio import Future
from collections.abc import Awaitable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import tornado.locale
from tornado.web import HTTPError, RequestHandler

from demo.common.accounts.principal import Principal
from demo.common.errors import DemoError, Unauthorized
from demo.common.web.auth import Auth, auth_of, implemented_methods
from demo.common.web.errors import ErrorAnswer, describe_error, is_disk_full

if TYPE_CHECKING:
    from demo.common.accounts.rules import Accounts
    from demo.common.h5.rules import H5
    from demo.common.i18n import Languages
    from demo.common.images.rules import Images
    from demo.common.services import Services
    from demo.main import DemoApplication

log = logging.getLogger("demo.web")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
H5_COOKIE = "demo_h5"
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class BaseHandler(RequestHandler):
    """Request id, security headers, services and auth; subclasses choose JSON or HTML errors."""

    application: DemoApplication
    _principal: Principal | None = None
    _counted = False
    _language: str | None = None  # see language
    _language_from_header = False

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

    # -- the process's long-lived objects ------------------------------------------------------------

    @property
    def services(self) -> Services:
        return self.application.services

    @property
    def accounts(self) -> Accounts:
        return self.application.services.accounts

    @property
    def images(self) -> Images:
        return self.application.services.images

    @property
    def h5(self) -> H5:
        return self.application.services.h5

    @property
    def languages(self) -> Languages:
        return self.application.services.languages

    # -- the language of the answer -------------------------------------------------------------------

    @property
    def language(self) -> str:
        """The language (a supported BCP 47 tag) this answer's words are in: the one chosen for it
        (``use_language``: an H5 session's), else the client's Accept-Language among the supported
        ones, else ``default_language``. Worked out once, when first asked for: an answer without
        words (an image, a success without a message) never parses the header."""
        if self._language is None:
            self._language = self.languages.negotiate(self.request.headers.get("Accept-Language"))
            self._language_from_header = True
        return self._language

    def use_language(self, lang: str | None) -> None:
        """Answer in ``lang`` (as stored: None or one no longer supported is the default language),
        whatever the request's Accept-Language."""
        self._language, self._language_from_header = self.languages.pick(lang), False
        self.locale = self.get_user_locale()  # a locale taken before this (an early error) is replaced

    def get_user_locale(self) -> tornado.locale.Locale:
        """Tornado's locale of ``language`` (templates' ``locale`` and ``_``), made once per process."""
        return self.application.locales[self.language]

    def translate(self, message: str, params: Mapping[str, object] | None = None) -> str:
        """``message`` (a msgid, ``N_``) in this answer's language, its ``{name}``s from ``params``."""
        return self.languages.translate(self.language, message, params)

    def set_language_headers(self) -> None:
        """Content-Language for an answer with words in it; Vary when the client's header chose them
        (a cache must not hand this answer to a client asking for another language)."""
        self.set_header("Content-Language", self.language)
        if self._language_from_header:
            self.set_header("Vary", "Accept-Language")

    # -- the request ----------------------------------------------------------------------------------

    @property
    def request_id(self) -> str:
        # Kept on the request: set_default_headers runs again whenever the response is cleared.
        rid: str | None = getattr(self.request, "demo_request_id", None)
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

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        if self.application.stopping and not self._headers_written:
            self.set_header("Connection", "close")  # shutting down: keep-alive clients move elsewhere
        return super().finish(chunk)

    # -- who is calling -------------------------------------------------------------------------------

    def auth_rule(self) -> Auth | None:
        """The decision declared on the method this request calls (auth.py)."""
        return auth_of(getattr(self, (self.request.method or "").lower(), None))

    def prepare(self) -> Awaitable[None] | None:
        """Authenticate before the body is read. An awaitable only when a credential must be looked up:
        a public request then completes without a round trip through the event loop (the cost of one:
        bench/README.md, "Figures behind comments in the web base")."""
        rule = self.auth_rule()
        if rule is Auth.SESSION:
            return self._authenticate_bearer()
        if rule is Auth.H5_SESSION:
            return self._authenticate_cookie()
        return None  # public, or the method authenticates the caller itself

    async def _authenticate_bearer(self) -> None:
        self.principal = await self.accounts.authenticate(self.bearer_token())

    async def _authenticate_cookie(self) -> None:
        self.principal = await self.h5.authenticate(self.get_cookie(H5_COOKIE))
        self.use_language(self.principal.lang)  # an H5 session answers in its app's language

    def bearer_token(self) -> str:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized()
        return token.strip()

    @property
    def principal(self) -> Principal:
        """The authenticated caller: set before a method that requires a session runs, or by a method
        that authenticates the caller itself. ``current_user`` is None when there is none."""
        if self._principal is None:
            raise RuntimeError(f"{type(self).__name__}.{self.request.method}: no authenticated caller")
        return self._principal

    @principal.setter
    def principal(self, principal: Principal) -> None:
        self._principal = self.current_user = principal

    def get_current_user(self) -> Principal | None:
        return self._principal

    # -- addresses ------------------------------------------------------------------------------------

    @property
    def client_ip(self) -> str:
        """The client's address: the TCP peer's, or the one a trusted proxy reported (httpserver.py)."""
        return self.request.remote_ip or ""

    def absolute_url(self, path: str) -> str:
        """``DEMO_PUBLIC_URL`` + path, or the scheme and host the client used (through the proxy)."""
        base: str = self.services.settings.public_url.rstrip("/")
        if not base:
            base = f"{self.request.protocol}://{self.request.host}"
        return base + path

    def h5_url(self, ticket: str) -> str:
        return self.absolute_url(f"/h5/home?ticket={ticket}")

    # -- errors ---------------------------------------------------------------------------------------

    def describe_error(self, exc_info: ExcInfo | None) -> ErrorAnswer:
        """(status, JSON error body, extra headers) for whatever ended the request (errors.py)."""
        return describe_error(
            exc_info[1] if exc_info else None,
            status=self.get_status(),
            reason=self._reason,
            request_id=self.request_id,
            allowed_methods=self.allowed_methods,
            translate=self.translate,
        )

    def allowed_methods(self) -> list[str]:
        """The HTTP methods this handler implements (the others are Tornado's 405)."""
        return list(implemented_methods(type(self)))

    def log_exception(
        self, typ: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(value, DemoError):
            return  # an expected answer; the request log already records the status
        if is_disk_full(value):
            log.error(
                "disk full while handling %s %s (request %s): %s",
                self.request.method,
                self.request.path,
                self.request_id,
                value,
            )
            return
        if isinstance(value, HTTPError) and value.status_code < 500:
            return  # a 4xx Tornado raised (404, 405, ...): the request log has it
        log.error(
            "unhandled error in %s %s (request %s)",
            self.request.method,
            self.request.path,
            self.request_id,
            exc_info=value,  # the exception carries its traceback
        )
