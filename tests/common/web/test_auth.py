"""Auth decisions (common/web/auth.py) and where the base handler enforces them (base.py ``prepare``)."""

from __future__ import annotations

from tornado.web import RequestHandler

from demo.common.web.api import ApiHandler
from demo.common.web.auth import (
    Auth,
    auth_of,
    authenticates_itself,
    implemented_methods,
    public,
    requires_h5_session,
    requires_session,
)


class Handler(ApiHandler):
    @public
    def get(self) -> None:
        """Anyone."""

    @requires_session
    async def post(self) -> None:
        """App session."""

    @requires_h5_session
    async def put(self) -> None:
        """H5 cookie."""

    @authenticates_itself
    async def patch(self) -> None:
        """Checks its own credential."""

    def delete(self) -> None:
        """No decision."""


def test_the_decorators_record_the_decision_and_return_the_method_itself():
    assert auth_of(Handler.get) is Auth.PUBLIC and auth_of(Handler.post) is Auth.SESSION
    assert auth_of(Handler.put) is Auth.H5_SESSION and auth_of(Handler.patch) is Auth.SELF
    assert auth_of(Handler.delete) is None and auth_of(None) is None
    assert Handler.get.__qualname__ == "Handler.get"  # not wrapped (unlike tornado.web.authenticated)


def test_implemented_methods_skip_what_tornado_answers_with_405():
    assert list(implemented_methods(Handler)) == ["GET", "POST", "DELETE", "PATCH", "PUT"]
    assert implemented_methods(RequestHandler) == {}
