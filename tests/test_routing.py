"""The router (common/web/routing.py): URL tables collected, auth decided for every method, JSON 404/405."""
from __future__ import annotations

import re

import pytest

from demo.common.web.handlers import ApiHandler, public
from demo.common.web.routing import UndeclaredAuth, check_auth_declared, collect_routes


class Forgotten(ApiHandler):
    @public
    def get(self):
        """Fine."""

    def post(self):
        """No decision: must stop the app from starting."""


def test_every_urls_module_is_collected_and_404_comes_last():
    routes = collect_routes()
    patterns = [r[0] for r in routes]
    assert "/users/regist" in patterns and "/healthz" in patterns
    assert patterns[-1] == r"/.*"


def test_an_undeclared_method_refuses_to_start():
    with pytest.raises(UndeclaredAuth, match="Forgotten.post"):
        check_auth_declared([(r"/x", Forgotten)])


@pytest.mark.gen_test
async def test_unknown_routes_and_methods_answer_json(api):
    missing = await api.get("/no/such/thing")
    assert missing.code == 404 and missing.json == {"error": {"code": "not_found", "message": "No such resource."}}
    for method in ("POST", "DELETE", "PUT"):
        response = await api.request(method, "/nowhere", body=b"" if method != "DELETE" else None)
        assert response.code == 404 and response.error == "not_found"
    wrong_method = await api.request("PUT", "/users/login", body=b"{}")
    assert wrong_method.code == 405 and wrong_method.error == "method_not_allowed"
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
