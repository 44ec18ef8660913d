"""The one error map: what ended a request -> HTTP status, the contract's JSON error body, extra headers.

Domain errors (demo/common/errors.py) carry a ``code``; ``ERROR_STATUS`` gives its status. Errors Tornado
raises by itself (``HTTPError``) get a code from their status. A full disk is a 507 the client may retry.

The one place messages are translated: ``translate`` gives a msgid (and its parameters) in the request's
language (common/i18n.py); codes and fields never change with it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from tornado.web import HTTPError

from demo.common.errors import DemoError, InsufficientStorage
from demo.common.i18n import N_

# The contract's error table: code -> status. Anything raised as a DemoError is answered from here.
ERROR_STATUS: dict[str, int] = {
    "invalid_json": 400,
    "invalid_field": 422,
    "invalid_phone": 422,
    "weak_password": 422,
    "invalid_code": 400,
    "phone_taken": 409,
    "invalid_credentials": 401,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "unsupported_media_type": 415,
    "invalid_image": 422,
    "quota_exceeded": 403,
    "account_disabled": 403,
    "rate_limited": 429,
    "unavailable": 503,
    "range_not_satisfiable": 416,
    "insufficient_storage": 507,
}
# Errors Tornado raises by itself (HTTPError) get a code from their status.
STATUS_CODE: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    503: "unavailable",
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# The reason phrases a 4xx without a message of its own is answered with (Tornado's, from http.HTTPStatus),
# listed for the catalogue; one missing from it is answered in English.
REASONS = (
    N_("Bad Request"),
    N_("Unauthorized"),
    N_("Forbidden"),
    N_("Not Found"),
    N_("Method Not Allowed"),
    N_("Request Entity Too Large"),
    N_("Content Too Large"),
    N_("Unsupported Media Type"),
    N_("Request Header Fields Too Large"),
)
INTERNAL_ERROR = N_("Internal error (request {request_id}).")

Translate = Callable[[str, Mapping[str, object] | None], str]


def untranslated(message: str, params: Mapping[str, object] | None = None) -> str:
    """The English text: the msgid with its parameters."""
    return message.format_map(params) if params else message


class ErrorAnswer(NamedTuple):
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """``{"error": {"code", "message"[, "field"]}}``: the contract's shape of every error."""
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"error": error}


def is_disk_full(error: BaseException | None) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL


def describe_error(
    error: BaseException | None,
    *,
    status: int,
    reason: str,
    request_id: str,
    allowed_methods: Callable[[], Sequence[str]],
    translate: Translate = untranslated,
) -> ErrorAnswer:
    """The answer to ``error`` (None: the handler set an error ``status`` itself, with its ``reason``),
    its message given by ``translate`` (a msgid and its parameters -> the text in the reader's language).

    ``allowed_methods`` is asked only for a 405, which must say which methods the resource supports
    (RFC 9110 15.5.6).
    """
    if is_disk_full(error):
        error = InsufficientStorage()  # the disk (or quota) is full: retry later, nothing was kept
    if isinstance(error, DemoError):
        message = translate(error.template, error.params)
        return ErrorAnswer(ERROR_STATUS[error.code], error_body(error.code, message, error.field), error.headers())
    if isinstance(error, HTTPError):
        status = error.status_code
        # A log message with arguments is a template for the log (the static handler's holds file
        # paths): the client gets the status's reason instead.
        message = error.log_message if error.log_message and not error.args and status < 500 else reason
        extra = {"Allow": ", ".join(allowed_methods())} if status == 405 else {}
        return ErrorAnswer(status, error_body(STATUS_CODE.get(status, "error"), translate(message, None)), extra)
    if status < 500:
        return ErrorAnswer(status, error_body(STATUS_CODE.get(status, "error"), translate(reason, None)), {})
    return ErrorAnswer(500, error_body("internal_error", translate(INTERNAL_ERROR, {"request_id": request_id})), {})
