"""The URL router: every ``demo/views/*_urls.py`` contributes its ``urls`` list; a JSON 404 comes last.

Start-up checks: every HTTP method a handler implements declares who may call it (``@public``,
``@requires_session``, ``@requires_h5_session`` or ``@authenticates_itself``, auth.py), and every route
has a name, unique. A forgotten decision or name stops the app from starting.

Route names (``url(..., name="users.login")``) label the request metrics; ``route_names`` maps each
handler class to its route's name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from types import ModuleType

from tornado.routing import Rule, URLSpec
from tornado.web import RequestHandler

from demo.common.web.api import NotFoundHandler
from demo.common.web.auth import auth_of, implemented_methods


class UndeclaredAuth(RuntimeError):
    """A handler method has no auth decision (auth.py)."""


class AmbiguousRouteName(RuntimeError):
    """Two routes share a name, one handler class is on two routes with different names, or a route
    has no name (its requests would have no metric label)."""


STATIC_ROUTE = "static"  # the name of Tornado's own static routes (/static/, /favicon.ico, /robots.txt)


def name_static_routes(rules: Iterable[Rule], static_handler: type[RequestHandler]) -> None:
    """Name the routes Tornado adds for ``static_path`` (unnamed, all to ``static_handler``)."""
    for rule in rules:
        if rule.name is None and rule.target is static_handler:
            rule.name = STATIC_ROUTE


def url_modules(package: str = "demo.views") -> list[ModuleType]:
    pkg = importlib.import_module(package)
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.endswith("_urls"))
    return [importlib.import_module(f"{package}.{name}") for name in names]


def collect_routes(package: str = "demo.views") -> list[URLSpec]:
    """Every ``urls`` entry (a ``tornado.web.url`` or a ``(pattern, handler[, kwargs[, name]])`` tuple)
    as a URLSpec, checked; the JSON 404 last."""
    routes = [
        route if isinstance(route, URLSpec) else URLSpec(*route)
        for module in url_modules(package)
        for route in module.urls
    ]
    routes.append(URLSpec(r"/.*", NotFoundHandler, name="not_found"))
    check_auth_declared(routes)
    route_names(routes)  # refuses ambiguous names
    return routes


def handler_of(rule: Rule) -> type[RequestHandler]:
    target = rule.target
    if not (isinstance(target, type) and issubclass(target, RequestHandler)):
        raise TypeError(f"route {rule!r} does not lead to a RequestHandler")
    return target


def check_auth_declared(routes: Iterable[Rule]) -> None:
    missing = []
    for route in routes:
        handler = handler_of(route)
        for method, impl in implemented_methods(handler).items():
            if auth_of(impl) is None:
                missing.append(f"{handler.__module__}.{handler.__name__}.{method.lower()}")
    if missing:
        raise UndeclaredAuth(
            "handler methods without an auth decision (@public, @requires_session, ...): " + ", ".join(missing)
        )


def route_names(rules: Iterable[Rule]) -> dict[type[RequestHandler], str]:
    """Handler class -> the name of its route (``Application.wildcard_router.rules`` or
    ``collect_routes()``); a route without a name is refused (``AmbiguousRouteName``)."""
    names: dict[type[RequestHandler], str] = {}
    owners: dict[str, type[RequestHandler]] = {}
    for rule in rules:
        name = rule.name
        handler = handler_of(rule)
        if name is None:
            raise AmbiguousRouteName(
                f"route {rule.matcher.regex.pattern if hasattr(rule.matcher, 'regex') else rule.matcher!r}"
                f' ({handler.__name__}) has no name: url(..., name="area.what") labels its metrics'
            )
        if owners.setdefault(name, handler) is not handler or names.get(handler, name) != name:
            raise AmbiguousRouteName(
                f"route name {name!r} ({handler.__name__}): one name per handler class, one class per name"
            )
        names[handler] = name
    return names
