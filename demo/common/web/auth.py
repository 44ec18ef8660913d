"""Who may call a handler method: every method a handler implements carries one decision.

The decorators only record the decision on the method; ``BaseHandler.prepare`` enforces it before a
byte of the body is read, and the router (routing.py) refuses to start an app with a method that has
none. (Unlike ``tornado.web.authenticated``, none of them wraps the method.)
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

from tornado.web import RequestHandler

F = TypeVar("F", bound=Callable[..., Any])
_ATTRIBUTE = "demo_auth"


class Auth(enum.Enum):
    PUBLIC = "public"
    SESSION = "session"  # an app session: Authorization: Bearer <token>
    H5_SESSION = "h5_session"  # the H5 session cookie (WebView pages)
    SELF = "self"  # the method authenticates the caller itself (the H5 home page: a ticket or the cookie)


def _declare(method: F, auth: Auth) -> F:
    setattr(method, _ATTRIBUTE, auth)
    return method


def public(method: F) -> F:
    """Anyone may call this method."""
    return _declare(method, Auth.PUBLIC)


def requires_session(method: F) -> F:
    """Callers must send ``Authorization: Bearer <token>`` of a live app session (else 401)."""
    return _declare(method, Auth.SESSION)


def requires_h5_session(method: F) -> F:
    """Callers must hold the H5 session cookie (else the 401 page); form posts also need the XSRF token."""
    return _declare(method, Auth.H5_SESSION)


def authenticates_itself(method: F) -> F:
    """Nothing is checked before the method: it authenticates the caller itself (the H5 home page,
    with a one-time ticket or the H5 session cookie)."""
    return _declare(method, Auth.SELF)


def auth_of(method: object) -> Auth | None:
    """The decision declared on ``method``, or None."""
    auth = getattr(method, _ATTRIBUTE, None)
    return auth if isinstance(auth, Auth) else None


def implemented_methods(handler: type[RequestHandler]) -> dict[str, Callable[..., Any]]:
    """HTTP method (upper case) -> implementation, for the methods ``handler`` implements (Tornado
    answers the others with 405)."""
    methods = {}
    for method in handler.SUPPORTED_METHODS:
        impl = getattr(handler, method.lower(), None)
        if impl is not None and impl is not getattr(RequestHandler, method.lower(), None):
            methods[method] = impl
    return methods
