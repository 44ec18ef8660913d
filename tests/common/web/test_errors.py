"""The one error map (common/web/errors.py), without HTTP: what ended a request -> status, body, headers."""

from __future__ import annotations

import errno

import pytest
from tornado.web import HTTPError

from demo.common import errors
from demo.common.web.errors import ERROR_STATUS, STATUS_CODE, describe_error, error_body, is_disk_full


def describe(error: BaseException | None, status: int = 500, reason: str = "Internal Server Error"):
    return describe_error(
        error, status=status, reason=reason, request_id="rid-1234", allowed_methods=lambda: ["GET", "POST"]
    )


def domain_errors() -> list[type[errors.DemoError]]:
    found, todo = [], [errors.DemoError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not errors.DemoError:
            found.append(cls)
    return found


def test_every_domain_error_has_a_status():
    codes = {cls.code for cls in domain_errors()}
    assert codes and codes <= set(ERROR_STATUS), codes - set(ERROR_STATUS)


def test_a_domain_error_is_answered_from_the_table():
    status, body, headers = describe(errors.PhoneTaken())
    assert status == 409 and headers == {}
    assert body == {"error": {"code": "phone_taken", "message": errors.PhoneTaken.message}}
    status, body, _ = describe(errors.InvalidField("'phone' is required.", field="phone"))
    assert status == 422 and body["error"] == {
        "code": "invalid_field",
        "message": "'phone' is required.",
        "field": "phone",
    }


def test_a_full_disk_is_507_and_names_no_path():
    for number in (errno.ENOSPC, errno.EDQUOT):
        error = OSError(number, "No space left on device", "/srv/media/secret")
        assert is_disk_full(error)
        status, body, _ = describe(error)
        assert status == 507 and body["error"]["code"] == "insufficient_storage" and "/srv" not in str(body)
    assert not is_disk_full(OSError(errno.EACCES, "denied")) and not is_disk_full(None)


def test_tornado_errors_get_a_code_from_their_status():
    status, body, headers = describe(HTTPError(405), 405, "Method Not Allowed")
    assert status == 405 and body["error"]["code"] == "method_not_allowed" and headers == {"Allow": "GET, POST"}
    _, body, _ = describe(HTTPError(404, "No such resource."), 404, "Not Found")
    assert body["error"]["message"] == "No such resource."
    # A log message with arguments is for the log (it may hold paths): the client gets the reason.
    _, body, _ = describe(HTTPError(404, "file %s missing", "/etc/secret"), 404, "Not Found")
    assert body == error_body("not_found", "Not Found")
    _, body, _ = describe(HTTPError(418), 418, "I'm a Teapot")
    assert body["error"]["code"] == "error" and 418 not in STATUS_CODE


@pytest.mark.parametrize("error", [None, RuntimeError("database password is hunter2")])
def test_anything_else_is_500_with_the_request_id_only(error):
    status, body, headers = describe(error)
    assert status == 500 and headers == {}
    assert body == error_body("internal_error", "Internal error (request rid-1234).")


def test_a_status_set_by_the_handler_keeps_its_reason():
    assert describe(None, 404, "Not Found") == (404, error_body("not_found", "Not Found"), {})


def test_every_message_goes_through_translate_with_its_parameters():
    """The one place messages are translated: a domain error's template and values, a Tornado error's
    message or reason, the 500's; codes and fields stay as they are."""
    asked: list[tuple[str, dict | None]] = []

    def translate(message: str, params=None) -> str:
        asked.append((message, params))
        return f"<{message}>"

    def answer(error, status=500, reason="Internal Server Error"):
        return describe_error(
            error,
            status=status,
            reason=reason,
            request_id="rid-1",
            allowed_methods=lambda: ["GET"],
            translate=translate,
        )

    error = errors.InvalidField("'{name}' is required.", field="phone", params={"name": "phone"})
    assert str(error) == error.message == "'phone' is required."  # the logs' English
    assert answer(error).body == error_body("invalid_field", "<'{name}' is required.>", "phone")
    assert asked[-1] == ("'{name}' is required.", {"name": "phone"})
    assert answer(errors.PhoneTaken()).body["error"]["message"] == f"<{errors.PhoneTaken.message}>"
    assert (
        answer(HTTPError(404, "No such resource."), 404, "Not Found").body["error"]["message"] == "<No such resource.>"
    )
    assert answer(HTTPError(405), 405, "Method Not Allowed").body["error"]["message"] == "<Method Not Allowed>"
    assert answer(None, 404, "Not Found").body["error"]["message"] == "<Not Found>"
    assert answer(RuntimeError("boom")).body == error_body("internal_error", "<Internal error (request {request_id}).>")
    assert asked[-1] == ("Internal error (request {request_id}).", {"request_id": "rid-1"})
