"""The router (common/web/routing.py): URL tables collected, auth decided for every method, route names
for the metrics, JSON 404/405."""

from __future__ import annotations

import re

import pytest
from tornado.routing import URLSpec
from tornado.web import RequestHandler, url

from demo.common.web.api import ApiHandler, NotFoundHandler
from demo.common.web.auth import Auth, auth_of, implemented_methods, public, requires_session
from demo.common.web.pages import H5NotFoundHandler
from demo.common.web.routing import (
    STATIC_ROUTE,
    AmbiguousRouteName,
    UndeclaredAuth,
    check_auth_declared,
    collect_routes,
    route_names,
)


class Forgotten(ApiHandler):
    @public
    def get(self) -> None:
        """Fine."""

    def post(self) -> None:
        """No decision: must stop the app from starting."""


class Declared(ApiHandler):
    @requires_session
    def delete(self) -> None:
        """Fine."""


def test_every_urls_module_is_collected_and_404_comes_last():
    routes = collect_routes()
    patterns = [r.regex.pattern for r in routes]
    assert "/users/regist$" in patterns and "/healthz$" in patterns and "/h5/home$" in patterns
    assert "/images$" in patterns
    assert patterns[-1] == r"/.*$" and routes[-1].target is NotFoundHandler


def test_an_undeclared_method_refuses_to_start():
    with pytest.raises(UndeclaredAuth, match="Forgotten.post"):
        check_auth_declared([url(r"/x", Forgotten)])
    check_auth_declared([url(r"/x", Declared)])


def test_every_routed_method_has_a_decision():
    """Through the URL rules and each handler's own methods (public API): none is missed, and the
    walk does find the handlers (a walk that found nothing would pass for any app)."""
    routes = collect_routes()
    decided = {
        (r.target, method): auth_of(impl) for r in routes for method, impl in implemented_methods(r.target).items()
    }
    assert len(decided) >= 20
    assert all(isinstance(auth, Auth) for auth in decided.values())
    assert decided[(NotFoundHandler, "GET")] is Auth.PUBLIC and decided[(H5NotFoundHandler, "POST")] is Auth.PUBLIC


def test_implemented_methods_are_the_overridden_ones():
    assert list(implemented_methods(Forgotten)) == ["GET", "POST"]
    assert list(implemented_methods(Declared)) == ["DELETE"]
    assert implemented_methods(RequestHandler) == {}


def test_route_names_label_each_handler_class():
    names = route_names(collect_routes())
    by_name = {name: handler for handler, name in names.items()}
    assert len(by_name) == len(names)  # one name per handler class
    assert by_name["users.logout"].__module__ == "demo.views.users_views"
    assert by_name["h5.logout"].__module__ == "demo.views.h5_views"
    assert by_name["users.logout"] is not by_name["h5.logout"]
    assert names[NotFoundHandler] == "not_found" and names[H5NotFoundHandler] == "h5.not_found"


def test_ambiguous_route_names_refuse_to_start():
    with pytest.raises(AmbiguousRouteName, match="'x'"):
        route_names([url(r"/a", Forgotten, name="x"), url(r"/b", Declared, name="x")])
    with pytest.raises(AmbiguousRouteName, match="'y'"):
        route_names([url(r"/a", Forgotten, name="x"), url(r"/b", Forgotten, name="y")])
    assert route_names([url(r"/a", Forgotten, name="x"), url(r"/b", Forgotten, name="x")]) == {Forgotten: "x"}


def test_a_route_without_a_name_refuses_to_start():
    with pytest.raises(AmbiguousRouteName, match="/b.*no name"):
        route_names([url(r"/a", Forgotten, name="x"), url(r"/b", Declared)])
    with pytest.raises(AmbiguousRouteName, match="no name"):
        route_names([URLSpec(*(r"/b", Declared))])  # as collect_routes makes a plain (pattern, handler) tuple


def test_every_route_of_the_app_is_named_tornados_static_ones_too(app):
    rules = app.wildcard_router.rules
    assert all(rule.name for rule in rules)
    statics = [rule for rule in rules if rule.name == STATIC_ROUTE]
    assert len(statics) == 3  # /static/, /favicon.ico, /robots.txt
    assert app.route_names[NotFoundHandler] == "not_found"


@pytest.mark.gen_test
async def test_unknown_routes_and_methods_answer_json(api):
    missing = await api.get("/no/such/thing")
    assert missing.code == 404 and missing.json == {"error": {"code": "not_found", "message": "No such resource."}}
    for method in ("POST", "DELETE", "PUT"):
        response = await api.request(method, "/nowhere", body=b"" if method != "DELETE" else None)
        assert response.code == 404 and response.error == "not_found"
    wrong_method = await api.request("PUT", "/users/login", body=b"{}")
    assert wrong_method.code == 405 and wrong_method.error == "method_not_allowed"
    assert wrong_method.headers["Allow"] == "POST"
    assert wrong_method.headers["Content-Type"].startswith("application/json")
    assert wrong_method.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.gen_test
async def test_request_id_is_echoed_when_sane_and_made_otherwise(api):
    echoed = await api.get("/healthz", headers={"X-Request-Id": "nginx-req-12345678"})
    assert echoed.headers["X-Request-Id"] == "nginx-req-12345678"
    replaced = await api.get("/healthz", headers={"X-Request-Id": "<script>"})
    made = [(await api.get("/healthz")).headers["X-Request-Id"] for _ in range(3)]
    assert replaced.headers["X-Request-Id"] != "<script>" and len(set(made + [replaced.headers["X-Request-Id"]])) == 4
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in made)
