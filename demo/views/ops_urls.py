"""Operations: liveness, readiness, metrics and the machine-readable contract."""

from tornado.web import url

from demo.views import ops_views as v

urls = [
    url(r"/healthz", v.HealthHandler, name="ops.healthz"),
    url(r"/readyz", v.ReadyHandler, name="ops.readyz"),
    url(r"/openapi.yaml", v.OpenApiHandler, name="ops.openapi"),
    url(r"/metrics", v.MetricsHandler, name="ops.metrics"),
]
