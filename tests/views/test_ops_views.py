"""Operations (views/ops_*): health, readiness, database outages, unexpected errors."""

from __future__ import annotations

import time

import pytest

gen_test = pytest.mark.gen_test(timeout=30)


@gen_test
async def test_healthz_and_readyz(api):
    health = await api.get("/healthz")
    assert health.code == 200 and health.json == {"status": "ok"}
    ready = await api.get("/readyz")
    assert ready.code == 200 and ready.json == {"status": "ok", "checks": {"database": "ok", "storage": "ok"}}


@gen_test
async def test_openapi_document_is_served(api):
    response = await api.get("/openapi.yaml")
    assert response.code == 200 and response.headers["Content-Type"].startswith("application/yaml")
    assert response.body.startswith(b"openapi:")


@pytest.fixture
def unreachable_db_app(settings, build_app):
    pytest.importorskip("MySQLdb")
    # Port 9 (discard) on loopback: connection refused at once, like a stopped MariaDB.
    return build_app(settings.replace(database_url="mysql+mysqldb://root@127.0.0.1:9/demo"))


@pytest.fixture
def unreachable_store_app(settings, build_app, s3_server):
    # The S3 store's endpoint on port 9: refused at once, like a stopped store.
    return build_app(settings.replace(**{**s3_server.settings("ready"), "s3_endpoint": "http://127.0.0.1:9"}))


@pytest.fixture
def app(request, settings, build_app):
    """conftest's app, or the one whose database or store is unreachable when a test asks for that."""
    for name in ("unreachable_db_app", "unreachable_store_app"):
        if name in request.fixturenames:
            return request.getfixturevalue(name)
    return build_app(settings)


@gen_test
async def test_database_down_is_a_fast_503(api, unreachable_db_app):
    started = time.monotonic()
    login = await api.post("/users/login", {"phone": "18866668888", "password": "demo123456"})
    assert login.code == 503 and login.error == "unavailable"
    me = await api.get("/users/me", token="A" * 43)
    assert me.code == 503
    ready = await api.get("/readyz")
    assert ready.code == 503
    assert ready.json["checks"] == {"database": "unreachable", "storage": "ok"}
    assert ready.json["error"] == {"code": "unavailable", "message": "database: unreachable"}
    assert time.monotonic() - started < 5  # not a 30 s pool timeout
    assert (await api.get("/healthz")).code == 200  # the process itself is alive


@gen_test
async def test_unexpected_errors_are_json_500_without_internals(api, app, user, caplog, monkeypatch):
    async def explode(principal):
        raise RuntimeError("secret internals: password=hunter2")

    monkeypatch.setattr(app.services.accounts, "profile", explode)
    response = await api.get("/users/me", token=user.token)
    assert response.code == 500 and response.error == "internal_error"
    assert b"secret" not in response.body and b"Traceback" not in response.body
    request_id = response.headers["X-Request-Id"]
    assert request_id in response.json["error"]["message"]
    logged = [r for r in caplog.records if r.name == "demo.web"]
    assert logged and request_id in logged[0].getMessage() and logged[0].exc_info


@gen_test
async def test_a_programming_error_in_sql_is_a_500_with_a_traceback_not_a_503(api, app, user, caplog, monkeypatch):
    from demo.common.infra.db import Sql, sql_unit

    broken = Sql("SELECT no_such_column FROM users WHERE id = :id")  # OperationalError on SQLite and MariaDB

    async def profile(principal):
        return await app.services.db.run(sql_unit(lambda c: c.first(broken, {"id": principal.user_id})))

    monkeypatch.setattr(app.services.accounts, "profile", profile)
    response = await api.get("/users/me", token=user.token)
    assert response.code == 500 and response.error == "internal_error"
    logged = [r for r in caplog.records if r.name == "demo.web"]
    assert logged and logged[0].exc_info and "no_such_column" in str(logged[0].exc_info[1])


@gen_test
async def test_metrics_count_requests_uploads_and_texts(api, user, outbox):
    await api.get("/healthz")
    await api.post("/images", body=b"not an image", token=user.token, headers={"Content-Type": "image/png"})
    assert (await api.post("/users/logout", token=user.token)).code == 204
    response = await api.get("/metrics")
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/plain")
    text = response.body.decode()
    # Labelled by route name (views/*_urls.py): the users and H5 logouts are two series.
    assert 'demo_requests_total{method="GET",route="ops.healthz",status="200"} 1.0' in text
    assert 'demo_requests_total{method="POST",route="users.regist",status="201"} 1.0' in text
    assert 'demo_requests_total{method="POST",route="users.logout",status="204"} 1.0' in text
    assert 'demo_request_duration_seconds_bucket{le="0.005",method="GET",route="ops.healthz"}' in text
    assert "demo_sms_sent_total 1.0" in text and "demo_sms_failed_total 0.0" in text
    assert "demo_upload_bytes_total 12.0" in text
    for gauge in ("demo_requests_in_flight", "demo_db_pool_in_use", "demo_executor_queue_depth"):
        assert f"# TYPE {gauge} gauge" in text


@gen_test
async def test_an_unreachable_image_store_makes_the_host_unready_fast(api, unreachable_store_app):
    """A load balancer stops sending uploads to a host that cannot reach its S3 store."""
    started = time.monotonic()
    ready = await api.get("/readyz")
    assert time.monotonic() - started < 2
    assert ready.code == 503 and ready.json["checks"] == {"database": "ok", "storage": "unreachable"}
    assert ready.json["error"] == {"code": "unavailable", "message": "storage: unreachable"}
