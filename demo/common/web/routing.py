"""The URL router: every ``demo/views/*_urls.py`` contributes its ``urls`` list; a JSON 404 comes last.

Start-up check: every HTTP method a handler implements must be declared ``@public`` or
``@authenticated`` (or ``@h5_session`` for H5 pages). A forgotten decision stops the app from starting.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from tornado.web import RequestHandler

from demo.common.web.handlers import NotFoundHandler

AUTH_RULES = {"public", "bearer", "h5"}


class UndeclaredAuth(RuntimeError):
    """A handler method has no @public / @authenticated decision."""


def url_modules(package: str = "demo.views") -> list[ModuleType]:
    pkg = importlib.import_module(package)
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.endswith("_urls"))
    return [importlib.import_module(f"{package}.{name}") for name in names]


def collect_routes(package: str = "demo.views") -> list[tuple[Any, ...]]:
    routes: list[tuple[Any, ...]] = []
    for module in url_modules(package):
        routes.extend(module.urls)
    check_auth_declared(routes)
    routes.append((r"/.*", NotFoundHandler))
    return routes


def check_auth_declared(routes: list[tuple[Any, ...]]) -> None:
    missing = []
    for route in routes:
        handler = route[1]
        for method in handler.SUPPORTED_METHODS:
            name = method.lower()
            impl = getattr(handler, name, None)
            if impl is None or impl is getattr(RequestHandler, name, None):
                continue  # not implemented: Tornado answers 405
            if getattr(impl, "auth", None) not in AUTH_RULES:
                missing.append(f"{handler.__module__}.{handler.__name__}.{name}")
    if missing:
        raise UndeclaredAuth("handler methods without @public/@authenticated: " + ", ".join(missing))
