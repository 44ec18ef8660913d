"""Operations handlers: liveness, readiness, the OpenAPI document."""

from __future__ import annotations

from importlib import resources

from prometheus_client import CONTENT_TYPE_LATEST

from demo.common.web.api import ApiHandler
from demo.common.web.auth import public
from demo.common.web.errors import error_body


class HealthHandler(ApiHandler):
    @public
    def get(self) -> None:
        """Liveness: the process runs and its event loop answers."""
        self.write_json({"status": "ok"})

    head = get  # monitors and `curl -I` ask with HEAD; Tornado sends the headers without the body


class ReadyHandler(ApiHandler):
    @public
    async def get(self) -> None:
        """Readiness: the database and the image store answered in time, within the last second."""
        report = await self.services.readiness.report()
        checks = {name: "ok" if ok else "unreachable" for name, ok in report.items()}
        if not all(report.values()):
            failing = ", ".join(f"{name}: unreachable" for name, ok in report.items() if not ok)
            self.write_json(
                {"status": "unavailable", "checks": checks, **error_body("unavailable", failing)}, status=503
            )
            return
        self.write_json({"status": "ok", "checks": checks})

    head = get


class OpenApiHandler(ApiHandler):
    _document: bytes | None = None

    @public
    def get(self) -> None:
        """The contract, machine-readable."""
        if OpenApiHandler._document is None:
            OpenApiHandler._document = resources.files("demo").joinpath("static/openapi.yaml").read_bytes()
        self.set_header("Content-Type", "application/yaml; charset=utf-8")
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(OpenApiHandler._document)


class MetricsHandler(ApiHandler):
    @public
    async def get(self) -> None:
        """Prometheus text format (nginx keeps this path off the public server)."""
        await self.services.cost_guard.refresh_metrics(self.services.clock.now())
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.services.metrics.exposition())
