"""Operations: liveness, readiness and the machine-readable contract."""
from demo.views import ops_views as v

urls = [
    (r"/healthz", v.HealthHandler),
    (r"/readyz", v.ReadyHandler),
    (r"/openapi.yaml", v.OpenApiHandler),
    (r"/metrics", v.MetricsHandler),
]
