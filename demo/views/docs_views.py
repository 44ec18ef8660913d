"""API reference handlers: Swagger UI from the openapi-ui-bundles package, served by the app itself
(no CDN: the page's CSP allows only this origin), reading the contract from ``/openapi.yaml``."""

from __future__ import annotations

from collections.abc import Awaitable
from importlib import metadata

import openapi_ui_bundles

from demo.common.web.api import ApiHandler, StaticHandler
from demo.common.web.auth import public

# Swagger UI 5 (the first to read OpenAPI 3.1). The package's version is in the assets' URLs: they
# change with it, so browsers may keep the files for ever.
ASSETS = openapi_ui_bundles.swagger_ui.static_path
ASSETS_VERSION = metadata.version("openapi-ui-bundles")
# Swagger UI draws its icons from data: URLs and sets styles through the DOM (not inline <style>).
DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>demo API reference</title>
<link rel="stylesheet" href="/docs/swagger-ui.css?v={version}">
</head>
<body>
<div id="swagger-ui" data-url="/openapi.yaml"></div>
<script src="/docs/swagger-ui-bundle.js?v={version}"></script>
<script src="{init}"></script>
</body>
</html>
"""


class RootHandler(ApiHandler):
    @public
    def get(self) -> None:
        """The site root has nothing of its own: send people to the API reference."""
        self.redirect("/docs")


class DocsPageHandler(ApiHandler):
    @public
    def get(self) -> None:
        """The API reference page; its start-up script is a file too (no inline script under the CSP)."""
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "public, max-age=300")
        self.set_header("Content-Security-Policy", DOCS_CSP)
        self.set_header("Referrer-Policy", "same-origin")
        self.finish(PAGE.format(version=ASSETS_VERSION, init=self.static_url("docs/init.js")))


class DocsAssetHandler(StaticHandler):
    """Swagger UI's script and style sheet, straight from the installed package (the route gives
    ``path=ASSETS``)."""

    @public
    async def get(self, path: str, include_body: bool = True) -> None:
        await super().get(path, include_body)

    @public
    def head(self, path: str) -> Awaitable[None]:
        return super().head(path)
