"""The human-readable API reference (Swagger UI over /openapi.yaml); the site root points to it."""

from tornado.web import url

from demo.views import docs_views as v

urls = [
    url(r"/", v.RootHandler, name="docs.root"),
    url(r"/docs", v.DocsPageHandler, name="docs.page"),
    url(
        r"/docs/(swagger-ui\.css|swagger-ui-bundle\.js)", v.DocsAssetHandler, {"path": str(v.ASSETS)}, name="docs.asset"
    ),
]
