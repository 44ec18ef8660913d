"""JSON handlers: ``ApiHandler`` (JSON in, JSON out, errors in the contract's shape), the JSON body and
its text fields, the catch-all JSON 404, and the static file handler with the contract's headers."""

from __future__ import annotations

import json
from typing import Any

from tornado.web import HTTPError, StaticFileHandler

from demo.common.errors import InvalidField, InvalidJson, TooLarge, UnsupportedMediaType
from demo.common.i18n import N_
from demo.common.web.auth import public
from demo.common.web.base import BaseHandler

MAX_JSON_BYTES = 64 * 1024
JSON_MEDIA_TYPE = "application/json"


class ApiHandler(BaseHandler):
    """JSON in, JSON out; every error in the contract's shape."""

    def check_xsrf_cookie(self) -> None:
        """Bearer API calls are exempt: browsers never attach an Authorization header by themselves."""

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def compute_etag(self) -> str | None:
        return None  # API answers are per-user and no-store; hashing them is wasted work

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object, or UnsupportedMediaType (415) / TooLarge (413) / InvalidJson (400).

        Only ``application/json``: a browser sends that cross-site only after a CORS preflight, which
        this API never grants, so another site's page cannot make its visitors call us (a text/plain
        or form post needs no preflight).
        """
        media_type = self.request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if media_type != JSON_MEDIA_TYPE:
            raise UnsupportedMediaType(N_("Send the body as Content-Type: application/json."))
        if len(self.request.body) > MAX_JSON_BYTES:
            raise TooLarge(N_("JSON bodies are limited to 64 KiB."))
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
        self.set_language_headers()  # the message is in the client's language
        self.finish(json.dumps(body, ensure_ascii=False))


def text_field(body: dict[str, Any], name: str, *, default: str | None = None, max_length: int = 1024) -> str:
    """A string field of a JSON body; a missing or non-string value is a 422 naming the field.

    A field with a ``default`` is optional: absent, it is the default; sent as ``null``, it is of the
    wrong type (422).
    """
    if name not in body:
        if default is not None:
            return default
        raise InvalidField(N_("'{name}' is required."), field=name, params={"name": name})
    value = body[name]
    if not isinstance(value, str):
        raise InvalidField(N_("'{name}' must be a string."), field=name, params={"name": name})
    if len(value) > max_length:
        raise InvalidField(N_("'{name}' is too long."), field=name, params={"name": name})
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 consumer (argon2, the database) takes
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidField(N_("'{name}' is not valid Unicode text."), field=name, params={"name": name}) from None
    return value


class NotFoundHandler(ApiHandler):
    """Last route: any unknown path is a JSON 404 (any method)."""

    @public
    def get(self, *_: str) -> None:
        """Unknown route."""
        raise HTTPError(404, N_("No such resource."))

    post = put = patch = delete = head = options = get


# StaticFileHandler's initialize(path) and compute_etag (the file's hash) come first, as intended.
class StaticHandler(StaticFileHandler, ApiHandler):  # type: ignore[misc]
    """``/static/*`` (H5 CSS and JS) straight from the app: Tornado's file serving, with the contract's
    headers on every answer and its JSON shape on errors (nginx serves these itself in production)."""

    def set_default_headers(self) -> None:
        BaseHandler.set_default_headers(self)  # a file keeps its own Content-Type and caching

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        ApiHandler.set_default_headers(self)  # an error is JSON, never cached
        super().write_error(status_code, **kwargs)
