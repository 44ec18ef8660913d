"""The web base (web/base.py) without a server: handlers made on the ``app`` fixture's application
from a hand-built request; the request id, the security headers, auth, the caller, URLs and errors."""

from __future__ import annotations

import errno
import logging
import re
from types import SimpleNamespace

import pytest
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from tornado.web import HTTPError

from demo.common.errors import NotFound, Unauthorized
from demo.common.web.auth import Auth, public, requires_h5_session, requires_session
from demo.common.web.base import BaseHandler


class Thing(BaseHandler):
    @public
    def get(self) -> None:
        pass

    @requires_session
    def post(self) -> None:
        pass

    @requires_h5_session
    def delete(self) -> None:
        pass


class Connection:
    """What a handler needs of its connection when nothing is sent."""

    def __init__(self, remote_ip: str, protocol: str) -> None:
        self.context = SimpleNamespace(remote_ip=remote_ip, protocol=protocol)
        self.close_callback = None

    def set_close_callback(self, callback) -> None:
        self.close_callback = callback


def handler(app, method: str = "GET", uri: str = "/thing", *, protocol: str = "http", **headers: str) -> Thing:
    request = HTTPServerRequest(
        start_line=RequestStartLine(method, uri, "HTTP/1.1"),
        headers=HTTPHeaders({"Host": "api.example.com:8443", **{k.replace("_", "-"): v for k, v in headers.items()}}),
        connection=Connection("203.0.113.9", protocol),
    )
    return Thing(app, request)


def exc_info(error: Exception):
    """As sys.exc_info() would give it while handling ``error``."""
    return type(error), error, error.__traceback__


# -- the request id and the default headers -------------------------------------------------------


def test_a_well_formed_incoming_request_id_is_kept_and_answered(app):
    made = handler(app, X_Request_Id="abc-DEF_123.xyz")
    assert made.request_id == "abc-DEF_123.xyz" and made._headers["X-Request-Id"] == "abc-DEF_123.xyz"


@pytest.mark.parametrize("incoming", ["", "short", "has space inside", "x" * 65, "semi;colon12", "<script>alert"])
def test_a_bad_incoming_request_id_is_replaced_by_a_random_one(app, incoming):
    made = handler(app, X_Request_Id=incoming)
    assert re.fullmatch(r"[0-9a-f]{32}", made.request_id) and made.request_id != incoming


def test_the_request_id_stays_the_same_when_the_response_is_cleared(app):
    made = handler(app)
    first = made.request_id
    made.clear()  # what send_error does before an error answer: the default headers are set again
    assert made.request_id == first == made._headers["X-Request-Id"]
    assert handler(app).request_id != first  # another request, another id


def test_the_answer_hides_the_server_and_forbids_sniffing(app):
    made = handler(app)
    assert "Server" not in made._headers and made._headers["X-Content-Type-Options"] == "nosniff"


# -- in-flight count -------------------------------------------------------------------------------


def test_a_request_is_counted_in_flight_until_it_ends_once(app):
    before = app.in_flight
    made = handler(app)
    assert app.in_flight == before + 1
    made.on_finish()
    assert app.in_flight == before
    made.on_connection_close()  # the client went away after the answer: not counted down twice
    assert app.in_flight == before


def test_a_closed_connection_ends_the_count(app):
    before = app.in_flight
    made = handler(app)
    made.request.connection.close_callback()
    assert app.in_flight == before


# -- auth ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "rule"),
    [("GET", Auth.PUBLIC), ("POST", Auth.SESSION), ("DELETE", Auth.H5_SESSION), ("PUT", None), ("PATCH", None)],
)
def test_the_auth_rule_is_the_called_methods_own(app, method, rule):
    assert handler(app, method).auth_rule() is rule


def test_a_public_request_is_prepared_without_an_awaitable(app):
    assert handler(app, "GET").prepare() is None


def test_a_session_request_is_prepared_by_a_lookup(app):
    pending = handler(app, "POST").prepare()  # no Authorization: the lookup refuses (when awaited)
    assert pending is not None and hasattr(pending, "__await__")
    pending.close()  # never awaited here


@pytest.mark.parametrize(
    ("authorization", "token"), [("Bearer abc.def", "abc.def"), ("bearer   t0k ", "t0k"), ("BEARER x", "x")]
)
def test_the_bearer_token_is_read_whatever_the_scheme_case(app, authorization, token):
    assert handler(app, Authorization=authorization).bearer_token() == token


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer    ", "Basic dXNlcjpwdw==", "Token abc"])
def test_no_bearer_token_is_unauthorized(app, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    with pytest.raises(Unauthorized):
        handler(app, **headers).bearer_token()


def test_the_principal_is_refused_until_one_is_set(app):
    made = handler(app, "POST")
    assert made.get_current_user() is None and made.current_user is None
    with pytest.raises(RuntimeError, match="Thing.POST: no authenticated caller"):
        made.principal  # noqa: B018
    caller = SimpleNamespace(user_id="u-1")
    made.principal = caller
    assert made.principal is caller and made.current_user is caller


# -- addresses -------------------------------------------------------------------------------------


def test_the_client_ip_is_the_peers(app):
    assert handler(app).client_ip == "203.0.113.9"


def test_without_a_public_url_links_use_the_scheme_and_host_asked(app):
    made = handler(app, protocol="https")
    assert made.absolute_url("/x") == "https://api.example.com:8443/x"
    assert made.h5_url("T1") == "https://api.example.com:8443/h5/home?ticket=T1"


@pytest.mark.settings(public_url="https://public.example.org/")
def test_a_public_url_replaces_the_host_asked(app):
    assert handler(app).absolute_url("/y") == "https://public.example.org/y"


# -- errors ----------------------------------------------------------------------------------------


def test_the_allowed_methods_are_those_implemented(app):
    assert sorted(handler(app).allowed_methods()) == ["DELETE", "GET", "POST"]


def test_a_405_says_which_methods_are_allowed(app):
    made = handler(app, "PUT")
    status, body, headers = made.describe_error(exc_info(HTTPError(405)))
    assert status == 405 and body["error"]["code"]
    assert sorted(headers["Allow"].split(", ")) == ["DELETE", "GET", "POST"]


def test_a_demo_error_is_its_own_answer(app):
    status, body, _ = handler(app).describe_error(exc_info(NotFound()))
    assert status == 404 and body["error"]["code"] == "not_found"


def test_an_unexpected_error_is_a_500_naming_the_request(app):
    made = handler(app, X_Request_Id="req-00000001")
    made.set_status(500)
    status, body, headers = made.describe_error(exc_info(RuntimeError("secret internals")))
    assert status == 500 and headers == {}
    assert "req-00000001" in body["error"]["message"] and "secret internals" not in str(body)


def test_a_full_disk_is_a_507_not_a_500(app):
    status, body, _ = handler(app).describe_error(exc_info(OSError(errno.ENOSPC, "No space left on device")))
    assert status == 507 and "No space" not in str(body)


def test_a_status_set_without_an_exception_is_described(app):
    made = handler(app)
    made.set_status(404)
    status, body, _ = made.describe_error(None)
    assert status == 404 and body["error"]["message"] == "Not Found"


@pytest.mark.parametrize(
    ("error", "logged"),
    [
        (NotFound(), None),
        (HTTPError(404), None),
        (HTTPError(405), None),
        (HTTPError(502), "unhandled error in PUT /thing"),
        (RuntimeError("boom"), "unhandled error in PUT /thing"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk full while handling PUT /thing"),
    ],
)
def test_only_unexpected_errors_are_logged(app, caplog, error, logged):
    caplog.set_level(logging.DEBUG, logger="demo.web")
    made = handler(app, "PUT", X_Request_Id="req-00000002")
    made.log_exception(*exc_info(error))
    lines = [record.getMessage() for record in caplog.records if record.name == "demo.web"]
    if logged is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(logged) and "req-00000002" in lines[0]
