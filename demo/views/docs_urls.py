"""The human-readable API reference (Swagger UI over /openapi.yaml); the site root points to it."""
from demo.views import docs_views as v

urls = [
    (r"/", v.RootHandler),
    (r"/docs", v.DocsPageHandler),
    (r"/docs/(swagger-ui\.css|swagger-ui-bundle\.js)", v.DocsAssetHandler),
]
