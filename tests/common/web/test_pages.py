"""H5 pages (common/web/pages.py) render through Tornado's ``render``: its namespace, the default
locale, the session-bound form token; and the base's ``prepare`` awaits only where a credential is checked."""

from __future__ import annotations

import re
from unittest import mock

import pytest
import tornado.locale
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

from demo.common.accounts import tokens
from demo.common.accounts.principal import Principal
from demo.common.web.auth import authenticates_itself, public, requires_h5_session, requires_session
from demo.common.web.pages import H5PageHandler


class Page(H5PageHandler):
    @public
    def get(self) -> None:
        """Public."""

    @requires_h5_session
    def post(self) -> None:
        """Cookie."""

    @requires_session
    def put(self) -> None:
        """Bearer."""

    @authenticates_itself
    def patch(self) -> None:
        """Its own check."""


def page(app, method: str = "GET", **headers: str) -> Page:
    connection = mock.Mock()
    connection.context = mock.Mock(remote_ip="127.0.0.1", protocol="http")
    request = HTTPServerRequest(
        start_line=RequestStartLine(method, "/h5/x", "HTTP/1.1"),
        headers=HTTPHeaders({"Host": "localhost", **headers}),
        connection=connection,
    )
    return Page(app, request)


def test_templates_get_tornados_namespace_with_the_caller_and_the_locale(app):
    handler = page(app, **{"Accept-Language": "fr-FR,fr;q=0.9"})
    caller = Principal(user_id=7, session_id=3, phone="+8618866668888", h5_session_id=5)
    handler.principal = caller
    namespace = handler.get_template_namespace()
    assert namespace["current_user"] is caller and namespace["handler"] is handler
    # No French catalogue: the default language, English, whose locale translates nothing.
    assert namespace["lang"] == "en" and namespace["locale"] is app.locales["en"]
    assert isinstance(namespace["locale"], tornado.locale.Locale) and namespace["_"]("Visits") == "Visits"
    assert namespace["static_url"]("h5/h5.css").startswith("/static/h5/h5.css?v=")


def test_templates_speak_the_language_of_the_webview_or_the_one_chosen(app):
    handler = page(app, **{"Accept-Language": "fr-FR,zh-CN;q=0.8,en;q=0.5"})
    namespace = handler.get_template_namespace()
    assert namespace["lang"] == "zh-CN" and namespace["_"]("Visits") == "访问次数"
    handler = page(app, **{"Accept-Language": "zh-CN"})
    handler.use_language("en")  # an H5 session's (its ticket's) language wins over the WebView's
    namespace = handler.get_template_namespace()
    assert namespace["lang"] == "en" and namespace["_"]("Visits") == "Visits"


def test_the_form_token_is_the_h5_sessions(app):
    cookie, other = tokens.new_secret()[0], tokens.new_secret()[0]
    form = page(app, Cookie=f"demo_h5={cookie}").get_template_namespace()["xsrf_form_html"]()
    token = re.fullmatch(r'<input type="hidden" name="_xsrf" value="([^"]+)"/>', form).group(1)
    assert app.services.h5.xsrf_matches(cookie, token) and not app.services.h5.xsrf_matches(other, token)


def test_there_is_no_caller_before_authentication(app):
    handler = page(app)
    assert handler.current_user is None
    with pytest.raises(RuntimeError, match="no authenticated caller"):
        handler.principal  # noqa: B018


@pytest.mark.parametrize(("method", "checks"), [("GET", False), ("PATCH", False), ("POST", True), ("PUT", True)])
def test_prepare_waits_only_to_check_a_credential(app, method, checks):
    pending = page(app, method).prepare()
    assert (pending is not None) == checks
    if pending is not None:
        pending.close()  # a coroutine, never awaited here
